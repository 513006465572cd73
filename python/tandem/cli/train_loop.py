"""The training loop of `tandem train`, run on every rank."""

import time

import torch

from tandem.cli import common


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
    loss with gradients averaged over dp, timeline() -> records, the PipelineRunner or None)."""
    from tandem.dp import all_reduce_grads
    from tandem.models import GPT
    from tandem.optim import MixedPrecisionOptimizer, precision_dtype

    torch.manual_seed(args.seed)  # identical full weights on every rank, as the reference
    model = (GPT(cfg, mesh=mesh) if args.init_from is None else _from_hf(args, mesh)).to(precision_dtype(args.precision))
    if mesh.pp > 1:
        from tandem.cli.train_pipeline import build_pipeline

        stages, opt, step, runner = build_pipeline(args, cfg, mesh, model,
                                                   lambda modules: _optimizer(args, mesh, modules))
        return model, stages, opt, step, runner.resolve_timeline, runner
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
        del records[:-2 * args.grad_accum]  # the last step's (a picture of every step is unreadable)
        if not tandem_opt:  # a tandem optimizer reduces its buckets over dp itself
            all_reduce_grads(model.parameters(), mesh)  # average over dp
        loss = loss.detach().float()
        if mesh.dp > 1:  # the global batch's loss: the mean over replicas
            mesh.dp_comm.all_reduce(loss).wait()
            loss /= mesh.dp
        return loss

    return model, model, opt, step, lambda: records, None


def repr_optimizer(opt) -> str:
    from tandem.optim import MixedPrecisionOptimizer

    return repr(opt) if isinstance(opt, MixedPrecisionOptimizer) else f"torch.optim.{type(opt).__name__}"


def _from_hf(args, mesh):
    """The Hugging Face model's weights, in float32; at pp > 1 each rank reads only the layers
    of its stage(s) (every layer with the interleaved schedule's finer cut)."""
    import tandem.hf

    whole = mesh.pp > 1 and args.schedule == "interleaved"
    return tandem.hf.load_model(args.init_from, mesh, dtype=torch.float32, whole=whole)


def _reference_losses(args, cfg, job) -> list:
    """Loss per step of the tp=pp=dp=1 model on the same data (all dp shards in one batch),
    with the same learning-rate schedule, accumulation, weight decay and clipping."""
    from tandem.mesh import Mesh
    from tandem.models import GPT
    from tandem.optim import weight_decay_groups

    torch.manual_seed(args.seed)
    model = GPT(cfg, mesh=Mesh.single()) if args.init_from is None else _from_hf(args, Mesh.single())
    opt = torch.optim.AdamW([g for g in weight_decay_groups(model, args.weight_decay) if g["params"]], lr=args.lr)
    losses = []
    for step in range(args.steps):
        job.schedule.apply(opt, step)
        total = 0.0
        for micro in range(job.accum):
            inputs, targets = job.reference_batch(step, micro)
            loss = model(inputs, targets)
            loss.backward()
            total += loss.item()
        _average_accumulated(opt, model.parameters(), job.accum)
        if args.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        opt.zero_grad()
        losses.append(total / job.accum)
    return losses


def _average_accumulated(opt, params, accum: int) -> None:
    """Gradients summed over ``accum`` micro-steps -> their mean (a tandem optimizer's fp32
    buffers, or ``param.grad``)."""
    from tandem.optim import MixedPrecisionOptimizer

    if accum == 1:
        return
    if isinstance(opt, MixedPrecisionOptimizer):
        opt.scale_grads(1.0 / accum)
        return
    for p in params:
        if p.grad is not None:
            p.grad.div_(accum)


def _micro_steps(job, step_fn, meter, mesh, step: int, opt, params) -> float:
    """Forward and backward of every micro-step of ``step``; returns the mean loss. A tandem
    optimizer reduces its buckets over dp once, with the last micro-step."""
    import contextlib

    from tandem.optim import MixedPrecisionOptimizer

    total = 0.0
    for micro in range(job.accum):
        inputs, targets = job.batch(step, micro)
        last = micro == job.accum - 1
        accumulate = opt.no_sync() if isinstance(opt, MixedPrecisionOptimizer) and not last \
            else contextlib.nullcontext()
        with accumulate, meter.measure():  # the saved activations' peak
            loss = step_fn(inputs.to(mesh.device), targets.to(mesh.device))
        total += loss.item()
    _average_accumulated(opt, params, job.accum)
    return total / job.accum


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


def _unigram(job):
    from tandem import data

    tokens = job.val_data if job.val_data is not None else job.train_data
    return None if tokens is None else data.unigram_entropy(tokens)


def train(args, cfg, tp: int, pp: int, dp: int) -> int:
    import tandem
    from tandem.cli.train_eval import evaluator
    from tandem.cli.train_job import Job
    from tandem.cli.train_report import Reporter

    mesh = tandem.init_mesh(tp=tp, pp=pp, dp=dp, timeout=args.timeout)
    rank0 = mesh.rank == 0
    if rank0:
        print(mesh.describe(), flush=True)
    model, module, opt, step_fn, timeline, runner = _build(args, cfg, mesh)
    params = [p for p in module.parameters() if p.requires_grad]
    job = Job(args, cfg, mesh, model, params, opt)
    start, resumed_from = job.start()
    report = Reporter(args, cfg, mesh, params, opt, unigram_entropy=_unigram(job) if rank0 else None)
    report.begin(start, resumed_from)
    evaluate = evaluator(cfg, mesh, model, runner) if args.eval_every else None
    eval_batches = job.eval_batches() if evaluate is not None else None
    began, records, memory = time.perf_counter(), [], None
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        lr = job.before_step(step)
        loss = _micro_steps(job, step_fn, report.meter, mesh, step, opt, params)
        norm, stepped = _optimizer_step(args, opt, module, mesh)
        if memory is None:
            memory = _memory(opt, params)
        # before zero_grad: the gradients count in the memory
        report.step(step, loss, lr, time.perf_counter() - t0, grad_norm=norm,
                    more={"stepped": stepped, "loss_scale": getattr(opt, "loss_scale", 1.0)})
        if not stepped:
            report.note(f"step {step}: skipped, gradient norm {norm} (inf/nan gradients)"
                        + (f"; loss scale now {opt.loss_scale:g}" if getattr(opt, "scaler", None) is not None else ""))
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done == args.steps:
            records = timeline()  # the last training step's, before an evaluation's forward passes
        if args.save_every and done % args.save_every == 0:
            job.save(done)
        if evaluate is not None and (done % args.eval_every == 0 or done == args.steps):
            report.eval(step, evaluate(eval_batches))
    elapsed = time.perf_counter() - began
    report.close()
    if job.saved_step != args.steps:
        job.save(args.steps)
    if rank0:
        job.link_final(args.steps)
    from tandem.cli.outputs import write_outputs

    write_outputs(args, cfg, mesh, report, records, elapsed, args.steps - start,
                  _reference_losses(args, cfg, job) if (args.check and rank0) else None, memory, repr_optimizer(opt))
    common.finish()
    return 0
