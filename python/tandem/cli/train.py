"""`tandem train`: train tandem's GPT on a synthetic task under TP x PP x DP.

Started without torchrun, it launches itself on --nproc local processes (gloo on CPU, NCCL
on GPUs). Every argument is checked before any process starts: a bad one is one line on
stderr and exit code 2.
"""

import json
import os

from tandem.cli import common, train_options

MODELS = {
    "tiny": dict(vocab_size=64, max_seq_len=32, num_layers=4, hidden_size=64, num_heads=4, ffn_hidden_size=256),
    "small": dict(vocab_size=256, max_seq_len=128, num_layers=8, hidden_size=256, num_heads=8,
                  ffn_hidden_size=1024),
    # byte-level Llama-class (RMSNorm, RoPE, SwiGLU, GQA): the demo's model of real text
    "byte-llama": dict(vocab_size=256, max_seq_len=256, num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=352, norm="rmsnorm", position="rope", activation="swiglu", bias=False),
}


def add_parser(sub):
    p = sub.add_parser("train", help="train a GPT under TP x PP x DP on token files (or a synthetic task)",
                       description="Train tandem's GPT under TP x PP x DP on a token file (see `tandem "
                       "prepare-data`) or the synthetic task; checkpoints, resume and restarts for long jobs.")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--dp", type=int, default=None, help="data-parallel replicas (default: nproc / (tp*pp))")
    p.add_argument("--nproc", type=int, default=None, help="processes to launch (default: tp*pp*dp)")
    p.add_argument("--schedule", default="1f1b", choices=sorted(train_options.SCHEDULES), help="pipeline schedule")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches per step (default: 2*pp)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of the whole run (default 150)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per dp replica per forward/backward pass "
                   "(a step makes --grad-accum of them; default 16)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW's peak learning rate (default 3e-3)")
    p.add_argument("--model", default="tiny", help="tiny, small, byte-llama, or a GPTConfig as JSON (a file or a "
                   "string)")
    p.add_argument("--init-from", default=None, metavar="HF_DIR",
                   help="start from a Hugging Face model's weights and config (Llama, Mistral, Qwen2, GPT-2); "
                   "each rank reads only its shards")
    p.add_argument("--seed", type=int, default=0, help="initial weights and the data order (default 0)")
    p.add_argument("--out", default="runs/train", help="output directory")
    p.add_argument("--check", action="store_true", help="also train the tp=pp=dp=1 reference on the same data "
                   "and report the largest loss difference")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any rank waits for another")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="parameters and compute; bf16/fp16 keep fp32 master weights and fp32 gradient "
                   "accumulation (fp16: dynamic loss scaling)")
    p.add_argument("--recompute", default=None, choices=["none", "selective", "full"],
                   help="activation recomputation: selective = attention core, full = whole blocks "
                   "(default: the model config's, else none)")
    p.add_argument("--zero1", action="store_true", help="distributed optimizer: fp32 masters and AdamW states "
                   "sharded over dp (ZeRO-1), gradients reduce-scattered")
    p.add_argument("--clip-grad", type=float, default=1.0, help="clip the global gradient norm (over tp x pp x dp) "
                   "to this; 0 disables")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of the linear layers' "
                   "weights (norms, biases and embeddings take none)")
    train_options.add_options(p)
    p.set_defaults(run=run)


def model_config(spec: str):
    from tandem.models import GPTConfig

    if spec in MODELS:
        return GPTConfig(**MODELS[spec])
    text = spec
    if os.path.exists(spec):
        with open(spec) as f:
            text = f.read()
    try:
        fields = json.loads(text)
    except json.JSONDecodeError:
        raise common.UsageError(f"--model {spec!r}: not one of {sorted(MODELS)}, an existing JSON file, or JSON")
    try:
        return GPTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise common.UsageError(f"--model: {e}")


def _hf_config(path: str):
    from tandem.hf import read_config, to_gpt_config

    try:
        return to_gpt_config(read_config(path))[1]
    except (FileNotFoundError, ValueError) as e:
        raise common.UsageError(f"--init-from: {e}")


def _world(args) -> tuple[int, int, int, int]:
    """(tp, pp, dp, nproc), validated."""
    for name in ("tp", "pp", "dp", "nproc", "microbatches", "steps", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("clip_grad", "weight_decay"):
        v = getattr(args, name)
        if not v >= 0 or v == float("inf"):
            raise common.UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    tp, pp = args.tp, args.pp
    if common.under_launcher():
        world = int(os.environ["WORLD_SIZE"])
    else:
        world = args.nproc or tp * pp * (args.dp or 1)
    dp = args.dp or world // (tp * pp) or 1
    if tp * pp * dp != world:
        raise common.UsageError(f"tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp} does not match the {world} "
                                f"processes; use --nproc {tp * pp * dp} or change --tp/--pp/--dp")
    return tp, pp, dp, world


def validate(args):
    """Everything checkable before any process starts. Returns (cfg, tp, pp, dp, world)."""
    cfg = model_config(args.model) if args.init_from is None else _hf_config(args.init_from)
    if args.recompute is not None:
        cfg.recompute = args.recompute
    tp, pp, dp, world = _world(args)
    try:
        cfg.check_tp(tp)
    except ValueError as e:
        raise common.UsageError(str(e))
    if args.microbatches is None:
        args.microbatches = 2 * pp if pp > 1 else 1
    if args.batch_size % args.microbatches:
        raise common.UsageError(f"--batch-size {args.batch_size} is not divisible by --microbatches "
                                f"{args.microbatches}")
    if cfg.sequence_parallel and cfg.max_seq_len % tp:
        raise common.UsageError(f"sequence parallelism needs max_seq_len={cfg.max_seq_len} divisible by tp={tp}")
    if pp > 1:
        try:
            schedule = train_options.schedule_for(args.schedule, pp, args.microbatches)
        except ValueError as e:
            raise common.UsageError(f"--schedule {args.schedule}: {e}")
        units = cfg.num_layers + 2  # embedding, blocks, head
        if units < schedule.num_stages:
            raise common.UsageError(f"the model has {units} layers (embedding + {cfg.num_layers} blocks + head), "
                                    f"fewer than the {schedule.num_stages} pipeline stages of {args.schedule}")
    train = train_options.validate_job(args, cfg, dp)
    if args.resume is not None and os.environ.get(train_options.VALIDATED_ENV) != "1":
        from tandem.cli.train_job import check_resumable

        check_resumable(args, cfg, dp, train)
    return cfg, tp, pp, dp, world


def run(args) -> int:
    try:
        cfg, tp, pp, dp, world = validate(args)
    except common.UsageError as e:
        common.fail(str(e))
    if (world > 1 or args.max_restarts) and not common.under_launcher():
        return common.relaunch(world, args.argv, max_restarts=args.max_restarts,
                               env={train_options.VALIDATED_ENV: "1"})
    from tandem.cli.train_loop import train

    return train(args, cfg, tp, pp, dp)
