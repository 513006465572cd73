"""Decoding for `tandem generate`, run on every rank: the last stage's first TP rank prints."""

import torch

from tandem.cli import common


def _model(args, cfg, mesh):
    """(this rank's stage of the model, its architecture or None)."""
    from tandem.pipeline import split

    if args.model:
        import tandem.hf

        model = tandem.hf.load_model(args.model, mesh, dtype=getattr(torch, args.dtype))
        balance = model.partition if mesh.pp > 1 else "params"
    else:
        from tandem import checkpoint
        from tandem.models import GPT

        model = GPT(cfg, mesh=mesh)
        checkpoint.load(model, args.checkpoint)
        balance = "params"
    model.eval()
    return split(model.layers(), mesh.pp, balance=balance, mesh=mesh)


def _batch(prompts: list, pad: int):
    """Left-padded ids [B, longest] and their attention mask."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    return ids, (mask if (mask == 0).any() else None)


def generate(args, cfg, prompts: list, tok) -> int:
    import tandem
    from tandem.pipeline import generate as pipelined

    mesh = tandem.init_mesh(tp=args.tp, pp=args.pp, dp=1, timeout=args.timeout)
    stage = _model(args, cfg, mesh)
    eos = tok.eos_token_ids if tok is not None else None
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else (eos[0] if eos else 0)
    ids, mask = _batch(prompts, pad)
    printer = mesh.pp_rank == mesh.pp - 1 and mesh.tp_rank == 0  # has the tokens first: it streams them
    single = len(prompts) == 1
    stream = None
    if printer and single:
        if tok is None:
            print(" ".join(map(str, prompts[0])), end="", flush=True)
        else:
            print(args.prompt[0], end="", flush=True)
            stream = tok.stream()
            for t in prompts[0]:
                stream.step(t)  # the prompt's text is already out
    ended = [False]

    def on_token(rows, tokens):
        if not (printer and single) or ended[0]:
            return
        t = int(tokens[0])
        if eos and t in eos:
            ended[0] = True
        elif stream is None:
            print(f" {t}", end="", flush=True)
        else:
            print(stream.step(t), end="", flush=True)

    out = pipelined(stage, ids, args.max_new_tokens, mesh=mesh, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, attention_mask=mask, eos_token_id=eos, pad_token_id=pad,
                    timeout=args.timeout, on_token=on_token)
    if printer:
        if single:
            print(flush=True)
        else:  # a batch: each completion once decoding is over
            for i, p in enumerate(prompts):
                new = _until_eos(out[i, ids.shape[1]:].tolist(), eos)
                text = tok.decode(p + new) if tok is not None else " ".join(map(str, p + new))
                print(f"[{i}] {text}", flush=True)
    common.finish()
    return 0


def _until_eos(tokens: list, eos) -> list:
    for i, t in enumerate(tokens):
        if eos and t in eos:
            return tokens[:i]
    return tokens
