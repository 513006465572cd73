"""The training loop of `tandem train`, run on every rank."""

import os
import time

import torch

from tandem.cli import common, data


def _build(args, cfg, mesh):
    """(full model, this rank's trainable modules, step(inputs, targets) -> global loss with
    gradients averaged over dp, timeline() -> records)."""
    from tandem.dp import all_reduce_grads
    from tandem.models import GPT

    torch.manual_seed(args.seed)  # identical full weights on every rank, as the reference
    model = GPT(cfg, mesh=mesh) if args.init_from is None else _from_hf(args, mesh)
    if mesh.pp > 1:
        from tandem.cli.train_pipeline import build_pipeline

        stages, step, runner = build_pipeline(args, cfg, mesh, model)
        return model, stages, step, runner.resolve_timeline
    records = []

    def step(inputs, targets):
        t0 = time.perf_counter()
        loss = model(inputs, targets)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        records.append(("F", t0, t1))
        records.append(("B", t1, t2))
        all_reduce_grads(model.parameters(), mesh)  # average over dp
        loss = loss.detach().float()
        if mesh.dp > 1:  # the global batch's loss: the mean over replicas
            mesh.dp_comm.all_reduce(loss).wait()
            loss /= mesh.dp
        return loss

    return model, model, step, lambda: records


def _from_hf(args, mesh):
    """The Hugging Face model's weights, in float32; at pp > 1 each rank reads only the layers
    of its stage(s) (every layer with the interleaved schedule's finer cut)."""
    import tandem.hf

    whole = mesh.pp > 1 and args.schedule == "interleaved"
    return tandem.hf.load_model(args.init_from, mesh, dtype=torch.float32, whole=whole)


def _reference_losses(args, cfg, dp: int) -> list:
    """Loss per step of the tp=pp=dp=1 model on the same data (all dp shards in one batch)."""
    from tandem.mesh import Mesh
    from tandem.models import GPT

    torch.manual_seed(args.seed)
    model = GPT(cfg, mesh=Mesh.single()) if args.init_from is None else _from_hf(args, Mesh.single())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        parts = [data.batch(step, args.batch_size, cfg.max_seq_len, cfg.vocab_size, seed=args.seed, shard=r)
                 for r in range(dp)]
        inputs = torch.cat([p[0] for p in parts])
        targets = torch.cat([p[1] for p in parts])
        loss = model(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def train(args, cfg, tp: int, pp: int, dp: int) -> int:
    import tandem

    mesh = tandem.init_mesh(tp=tp, pp=pp, dp=dp, timeout=args.timeout)
    rank0 = mesh.rank == 0
    if rank0:
        print(mesh.describe(), flush=True)
    model, module, step_fn, timeline = _build(args, cfg, mesh)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    tokens_per_step = args.batch_size * cfg.max_seq_len * dp
    history = []
    bar = None
    if rank0:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc="train", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        inputs, targets = data.batch(step, args.batch_size, cfg.max_seq_len, cfg.vocab_size, seed=args.seed,
                                     shard=mesh.dp_rank)
        loss = step_fn(inputs.to(mesh.device), targets.to(mesh.device))
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        history.append({"step": step, "loss": loss.item(), "step_time_s": dt, "tokens_per_s": tokens_per_step / dt})
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", step_ms=f"{dt * 1e3:.0f}")
            bar.update()
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    os.makedirs(args.out, exist_ok=True)
    from tandem import checkpoint

    # the full model's names; each rank writes the parameters its stage trains
    checkpoint.save(model, os.path.join(args.out, "checkpoint"), params=params,
                    extra={"config": cfg.__dict__, "tp": tp, "pp": pp, "dp": dp})
    from tandem.cli.outputs import write_outputs

    write_outputs(args, cfg, mesh, history, timeline(), elapsed, tokens_per_step,
                  _reference_losses(args, cfg, dp) if (args.check and rank0) else None)
    common.finish()
    return 0
