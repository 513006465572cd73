"""Decoding for `tandem generate`, run on every rank: tokens are streamed by rank 0."""


import torch

from tandem.cli import common


def generate(args, cfg, prompt: list) -> int:
    import tandem
    from tandem import checkpoint
    from tandem.models import GPT

    mesh = tandem.init_mesh(tp=args.tp, pp=args.pp, dp=1, timeout=args.timeout)
    model = GPT(cfg, mesh=mesh)
    checkpoint.load(model, args.checkpoint)
    model.eval()
    ids = torch.tensor([prompt], device=mesh.device)
    from tandem.pipeline import generate as pipelined, split

    # the last stage's first TP rank has the tokens first: it streams them
    printer = mesh.pp_rank == mesh.pp - 1 and mesh.tp_rank == 0
    if printer:
        print(" ".join(map(str, prompt)), end="", flush=True)

    def stream(rows, tokens):
        if printer:
            print(f" {tokens[0].item()}", end="", flush=True)

    stage = split(model.layers(), mesh.pp, balance="params", mesh=mesh)
    pipelined(stage, ids, args.max_new_tokens, mesh=mesh, temperature=args.temperature, seed=args.seed,
              timeout=args.timeout, on_token=stream)
    if printer:
        print(flush=True)
    common.finish()
    return 0
