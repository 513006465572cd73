"""The pipelined model of `tandem train`: this rank's stage(s) of the GPT and its runner."""

from torch import nn


def build_pipeline(args, cfg, mesh, model, make_optimizer):
    """(this rank's stages as one module, optimizer, step(inputs, targets) -> global loss, runner).

    ``make_optimizer(modules)`` builds the optimizer over the stages. The runner sums
    tied-embedding gradients between first and last stage and averages gradients and the
    loss over dp at the end of each step (a tandem optimizer's buckets: during the last
    backward).
    """
    from tandem.optim import MixedPrecisionOptimizer

    from tandem.cli.train_options import schedule_for
    from tandem.nn import vocab_parallel_cross_entropy
    from tandem.pipeline import PipelineRunner, partition, split

    schedule = schedule_for(args.schedule, mesh.pp, args.microbatches)
    stage_ids = schedule.layout.stages_of(mesh.pp_rank)
    layers = model.layers()
    cut = partition(layers, schedule.num_stages, balance="params")
    stages = [split(layers, schedule.num_stages, balance=cut, stage=s, mesh=mesh) for s in stage_ids]
    if mesh.rank == 0:
        print(cut, flush=True)
    opt = make_optimizer(stages)
    runner = PipelineRunner(stages if len(stages) > 1 else stages[0], mesh=mesh, schedule=schedule,
                            loss_fn=lambda logits, t: vocab_parallel_cross_entropy(logits, t, mesh=mesh),
                            num_microbatches=args.microbatches, timeout=args.timeout,
                            optimizer=opt if isinstance(opt, MixedPrecisionOptimizer) else None)
    first, last = 0 in stage_ids, schedule.num_stages - 1 in stage_ids

    def step(inputs, targets):
        return runner.step(inputs if first else None, targets if last else None)

    return nn.ModuleList(stages), opt, step, runner
