"""`tandem generate`: decode from a checkpoint written by `tandem train`, with TP and/or PP.

The prompt is space-separated token ids (the synthetic task's vocabulary is integers), e.g.
``--prompt "3 7 11"`` continues the progression: 15 19 23 ...
"""


from tandem.cli import common


def add_parser(sub):
    p = sub.add_parser("generate", help="decode from a trained checkpoint (TP and/or pipelined inference)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory written by `tandem train`")
    p.add_argument("--prompt", required=True, help='space-separated token ids, e.g. "3 7 11"')
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(run=run)


def validate(args):
    from tandem import checkpoint
    from tandem.models import GPTConfig

    try:
        extra = checkpoint.read_extra(args.checkpoint)
    except FileNotFoundError as e:
        raise common.UsageError(str(e))
    if "config" not in extra:
        raise common.UsageError(f"{args.checkpoint}: not written by `tandem train` (no model config)")
    cfg = GPTConfig(**{k: v for k, v in extra["config"].items()})
    try:
        prompt = [int(t) for t in args.prompt.split()]
    except ValueError:
        raise common.UsageError(f"--prompt must be space-separated token ids, got {args.prompt!r}")
    if not prompt or any(not 0 <= t < cfg.vocab_size for t in prompt):
        raise common.UsageError(f"--prompt needs 1 or more token ids in [0, {cfg.vocab_size})")
    for name in ("tp", "pp", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if len(prompt) + args.max_new_tokens > cfg.max_seq_len:
        raise common.UsageError(f"prompt ({len(prompt)}) + --max-new-tokens ({args.max_new_tokens}) exceeds the "
                                f"model's max_seq_len={cfg.max_seq_len}")
    try:
        cfg.check_tp(args.tp)
    except ValueError as e:
        raise common.UsageError(str(e))
    if cfg.num_layers + 2 < args.pp:
        raise common.UsageError(f"--pp {args.pp} exceeds the model's {cfg.num_layers + 2} layers")
    return cfg, prompt


def run(args) -> int:
    try:
        cfg, prompt = validate(args)
    except common.UsageError as e:
        common.fail(str(e))
    world = args.tp * args.pp
    if world > 1 and not common.under_launcher():
        return common.relaunch(world, args.argv)
    from tandem.cli.generate_loop import generate

    return generate(args, cfg, prompt)
