"""Decoding for `tandem generate`, run on every rank: tokens are streamed by rank 0."""

import os

import torch


def generate(args, cfg, prompt: list) -> int:
    import tandem
    from tandem import checkpoint
    from tandem.models import GPT

    mesh = tandem.init_mesh(tp=args.tp, pp=args.pp, dp=1, timeout=args.timeout)
    rank0 = mesh.rank == 0
    model = GPT(cfg, mesh=mesh)
    checkpoint.load(model, args.checkpoint)
    model.eval()
    ids = torch.tensor([prompt], device=mesh.device)
    gen = torch.Generator().manual_seed(args.seed)
    if rank0:
        print(" ".join(map(str, prompt)), end="", flush=True)

    def stream(token):
        if rank0:
            print(f" {token[0].item()}", end="", flush=True)

    if mesh.pp == 1:
        model.generate(ids, args.max_new_tokens, temperature=args.temperature, generator=gen, on_token=stream)
    else:
        from tandem.pipeline import generate as pipelined

        pipelined(model, ids, args.max_new_tokens, mesh=mesh, temperature=args.temperature, generator=gen,
                  on_token=stream)
    if rank0:
        print(flush=True)
    return 0
