"""The training loop of `tandem train`, run on every rank."""

import time

import torch

from tandem.cli import common


def _build(args, cfg, mesh):
    """(full model, this rank's trainable modules, step(inputs, targets) -> global loss with
    gradients averaged over dp, timeline() -> records, the PipelineRunner or None)."""
    from tandem.dp import all_reduce_grads
    from tandem.models import GPT

    torch.manual_seed(args.seed)  # identical full weights on every rank, as the reference
    model = GPT(cfg, mesh=mesh) if args.init_from is None else _from_hf(args, mesh)
    if mesh.pp > 1:
        from tandem.cli.train_pipeline import build_pipeline

        stages, step, runner = build_pipeline(args, cfg, mesh, model)
        return model, stages, step, runner.resolve_timeline, runner
    records = []

    def step(inputs, targets):
        t0 = time.perf_counter()
        loss = model(inputs, targets)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        records.append(("F", t0, t1))
        records.append(("B", t1, t2))
        del records[:-2 * args.grad_accum]  # the last step's (a picture of every step is unreadable)
        all_reduce_grads(model.parameters(), mesh)  # average over dp
        loss = loss.detach().float()
        if mesh.dp > 1:  # the global batch's loss: the mean over replicas
            mesh.dp_comm.all_reduce(loss).wait()
            loss /= mesh.dp
        return loss

    return model, model, step, lambda: records, None


def _from_hf(args, mesh):
    """The Hugging Face model's weights, in float32; at pp > 1 each rank reads only the layers
    of its stage(s) (every layer with the interleaved schedule's finer cut)."""
    import tandem.hf

    whole = mesh.pp > 1 and args.schedule == "interleaved"
    return tandem.hf.load_model(args.init_from, mesh, dtype=torch.float32, whole=whole)


def _reference_losses(args, cfg, job) -> list:
    """Loss per step of the tp=pp=dp=1 model on the same data (all dp shards in one batch),
    with the same learning-rate schedule and accumulation."""
    from tandem.mesh import Mesh
    from tandem.models import GPT

    torch.manual_seed(args.seed)
    model = GPT(cfg, mesh=Mesh.single()) if args.init_from is None else _from_hf(args, Mesh.single())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        job.schedule.apply(opt, step)
        total = 0.0
        for micro in range(job.accum):
            inputs, targets = job.reference_batch(step, micro)
            loss = model(inputs, targets)
            loss.backward()
            total += loss.item()
        _average_accumulated(model.parameters(), job.accum)
        opt.step()
        opt.zero_grad()
        losses.append(total / job.accum)
    return losses


def _average_accumulated(params, accum: int) -> None:
    """Gradients summed over ``accum`` micro-steps -> their mean."""
    if accum > 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(accum)


def _micro_steps(job, step_fn, meter, mesh, step: int, params) -> float:
    """Forward and backward of every micro-step of ``step``; returns the mean loss."""
    total = 0.0
    for micro in range(job.accum):
        inputs, targets = job.batch(step, micro)
        with meter.measure():  # the saved activations' peak
            loss = step_fn(inputs.to(mesh.device), targets.to(mesh.device))
        total += loss.item()
    _average_accumulated(params, job.accum)
    return total / job.accum


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
    model, module, step_fn, timeline, runner = _build(args, cfg, mesh)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    job = Job(args, cfg, mesh, model, params, opt)
    start, resumed_from = job.start()
    report = Reporter(args, cfg, mesh, params, opt, unigram_entropy=_unigram(job) if rank0 else None)
    report.begin(start, resumed_from)
    evaluate = evaluator(cfg, mesh, model, runner) if args.eval_every else None
    eval_batches = job.eval_batches() if evaluate is not None else None
    began, records = time.perf_counter(), []
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        lr = job.before_step(step)
        loss = _micro_steps(job, step_fn, report.meter, mesh, step, params)
        opt.step()
        report.step(step, loss, lr, time.perf_counter() - t0)  # before zero_grad: gradients count
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
                  _reference_losses(args, cfg, job) if (args.check and rank0) else None)
    common.finish()
    return 0
