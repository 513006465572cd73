"""The training loop of `tandem train`, run on every rank."""

import os
import time

import torch

from tandem.cli import common, data


def _optimizer(args, mesh, modules):
    """AdamW over ``modules`` as --precision, --zero1 and --weight-decay ask: a tandem
    optimizer (fp32 masters, fp32 gradient buffers; ZeRO-1 with --zero1) or torch's."""
    from tandem.optim import DistributedOptimizer, MixedPrecisionOptimizer, weight_decay_groups

    groups = [g for g in weight_decay_groups(modules, args.weight_decay) if g["params"]]
    if args.zero1:
        return DistributedOptimizer(groups, torch.optim.AdamW, mesh=mesh, lr=args.lr)
    if args.precision != "fp32":
        return MixedPrecisionOptimizer(groups, torch.optim.AdamW, mesh=mesh, lr=args.lr)
    return torch.optim.AdamW(groups, lr=args.lr)


def _build(args, cfg, mesh):
    """(full model, this rank's trainable modules, optimizer, step(inputs, targets) -> global
    loss with gradients averaged over dp, timeline() -> records)."""
    from tandem.dp import all_reduce_grads
    from tandem.models import GPT
    from tandem.optim import MixedPrecisionOptimizer, precision_dtype

    torch.manual_seed(args.seed)  # identical full weights on every rank, as the reference
    model = (GPT(cfg, mesh=mesh) if args.init_from is None else _from_hf(args, mesh)).to(precision_dtype(args.precision))
    if mesh.pp > 1:
        from tandem.cli.train_pipeline import build_pipeline

        stages, opt, step, runner = build_pipeline(args, cfg, mesh, model,
                                                   lambda modules: _optimizer(args, mesh, modules))
        return model, stages, opt, step, runner.resolve_timeline
    opt = _optimizer(args, mesh, [model])
    tandem_opt = isinstance(opt, MixedPrecisionOptimizer)
    records = []

    def step(inputs, targets):
        t0 = time.perf_counter()
        loss = model(inputs, targets)
        t1 = time.perf_counter()
        (opt.scale_loss(loss) if tandem_opt else loss).backward()
        t2 = time.perf_counter()
        records.append(("F", t0, t1))
        records.append(("B", t1, t2))
        if not tandem_opt:  # a tandem optimizer reduces its buckets over dp itself
            all_reduce_grads(model.parameters(), mesh)  # average over dp
        loss = loss.detach().float()
        if mesh.dp > 1:  # the global batch's loss: the mean over replicas
            mesh.dp_comm.all_reduce(loss).wait()
            loss /= mesh.dp
        return loss

    return model, model, opt, step, lambda: records


def repr_optimizer(opt) -> str:
    from tandem.optim import MixedPrecisionOptimizer

    return repr(opt) if isinstance(opt, MixedPrecisionOptimizer) else f"torch.optim.{type(opt).__name__}"


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

    from tandem.optim import weight_decay_groups

    torch.manual_seed(args.seed)
    model = GPT(cfg, mesh=Mesh.single()) if args.init_from is None else _from_hf(args, Mesh.single())
    opt = torch.optim.AdamW([g for g in weight_decay_groups(model, args.weight_decay) if g["params"]], lr=args.lr)
    losses = []
    for step in range(args.steps):
        parts = [data.batch(step, args.batch_size, cfg.max_seq_len, cfg.vocab_size, seed=args.seed, shard=r)
                 for r in range(dp)]
        inputs = torch.cat([p[0] for p in parts])
        targets = torch.cat([p[1] for p in parts])
        loss = model(inputs, targets)
        loss.backward()
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _optimizer_step(args, opt, target, mesh) -> tuple:
    """Clip (--clip-grad) and step; (gradient norm or None, whether the step was taken). A
    step whose gradients hold inf/nan is skipped on every rank (fp16: the loss scale backs off)."""
    import math

    import tandem
    from tandem.optim import MixedPrecisionOptimizer

    norm = None
    if args.clip_grad > 0:
        norm = tandem.clip_grad_norm_(opt if isinstance(opt, MixedPrecisionOptimizer) else target,
                                      args.clip_grad, mesh=mesh).item()
    if isinstance(opt, MixedPrecisionOptimizer) and opt.scaler is not None:
        return norm, opt.step()  # it agrees over the mesh on inf/nan gradients
    if norm is not None and not math.isfinite(norm):
        return norm, False  # the same norm on every rank: all skip
    opt.step()
    return norm, True


def _memory(opt, params) -> dict:
    """Bytes on this rank: parameters, gradients, fp32 masters, optimizer states."""
    from tandem.optim import MixedPrecisionOptimizer

    out = {"parameters": sum(p.numel() * p.element_size() for p in params)}
    if isinstance(opt, MixedPrecisionOptimizer):
        out["gradients"] = sum(b.grad.numel() * 4 for b in opt.layout.buckets)
        out["masters"] = opt.master_bytes()
        out["optimizer_states"] = opt.state_bytes()
    else:
        out["gradients"] = out["parameters"]
        out["masters"] = 0
        out["optimizer_states"] = sum(v.numel() * v.element_size() for st in opt.state.values()
                                      for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return out


def train(args, cfg, tp: int, pp: int, dp: int) -> int:
    import tandem

    mesh = tandem.init_mesh(tp=tp, pp=pp, dp=dp, timeout=args.timeout)
    rank0 = mesh.rank == 0
    if rank0:
        print(mesh.describe(), flush=True)
    model, module, opt, step_fn, timeline = _build(args, cfg, mesh)
    params = [p for p in module.parameters() if p.requires_grad]
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
        norm, stepped = _optimizer_step(args, opt, module, mesh)
        if step == 0:
            memory = _memory(opt, params)
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        history.append({"step": step, "loss": loss.item(), "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                        "grad_norm": norm, "stepped": stepped, "loss_scale": getattr(opt, "loss_scale", 1.0)})
        if not stepped and rank0:
            (bar.write if bar is not None else print)(
                f"step {step}: skipped, gradient norm {norm} (inf/nan gradients)"
                + (f"; loss scale now {opt.loss_scale:g}" if getattr(opt, "scaler", None) is not None else ""))
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", step_ms=f"{dt * 1e3:.0f}")
            bar.update()
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    os.makedirs(args.out, exist_ok=True)
    from tandem import checkpoint

    # the full model's names; each rank writes the parameters its stage trains
    from tandem.optim import MixedPrecisionOptimizer

    checkpoint.save(model, os.path.join(args.out, "checkpoint"), params=params,
                    extra={"config": cfg.__dict__, "tp": tp, "pp": pp, "dp": dp, "precision": args.precision},
                    optimizer=opt if isinstance(opt, MixedPrecisionOptimizer) else None)
    from tandem.cli.outputs import write_outputs

    write_outputs(args, cfg, mesh, history, timeline(), elapsed, tokens_per_step,
                  _reference_losses(args, cfg, dp) if (args.check and rank0) else None, memory, repr_optimizer(opt))
    common.finish()
    return 0
