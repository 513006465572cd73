"""The options of `tandem train` for a long job: data, learning-rate schedule, evaluation,
checkpoints and resume, restarts, and what it reports; and their checks before any process
starts (bad input: one line, exit code 2)."""

import os

from tandem.cli import common
from tandem.pipeline.schedules import SCHEDULES as _BY_NAME
from tandem.pipeline.schedules import schedule_by_name

__all__ = ["add_options", "validate_job", "KILL_ENV", "VALIDATED_ENV"]

KILL_ENV = "TANDEM_TEST_KILL"  # tests only: "RANK:STEP" or "RANK:STEP:save" (see train_job)
VALIDATED_ENV = "TANDEM_TRAIN_VALIDATED"  # set for the workers of a self-launch: the data was checked
SCHEDULES = tuple(sorted(_BY_NAME))  # --schedule's names


def add_options(p) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data", default="synthetic", metavar="PATH|synthetic",
                   help="a token file (train.bin from `tandem prepare-data`, or any flat uint16/uint32 array of "
                   "token ids); default: the synthetic task (arithmetic progressions)")
    d.add_argument("--data-dtype", choices=("uint16", "uint32"), default=None,
                   help="dtype of a token file without a side file (default uint16, nanoGPT's convention)")
    d.add_argument("--val-data", default=None, metavar="PATH", help="a validation token file (e.g. val.bin)")
    d.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="hold out the last F of --data for validation instead")
    d.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="validation loss every N steps and at the end (0: never)")
    d.add_argument("--eval-batches", type=int, default=4, metavar="K",
                   help="validation windows: K batches of --batch-size per dp replica, fixed, spread over the "
                   "validation data (default 4)")

    s = p.add_argument_group("learning rate (AdamW)")
    s.add_argument("--min-lr", type=float, default=None, help="the rate decay ends at (default: --lr / 10)")
    s.add_argument("--warmup-steps", type=int, default=0, help="steps of linear warmup to --lr (default 0)")
    s.add_argument("--decay", choices=("cosine", "linear", "constant"), default="cosine",
                   help="after warmup, from --lr to --min-lr over the remaining steps (default cosine)")
    s.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="forward/backward passes of --batch-size per dp replica per optimizer step (default 1)")

    c = p.add_argument_group("checkpoints, resume and restarts")
    c.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="write OUT/checkpoints/step-N every N steps (model, optimizer, LR schedule, step, data "
                   "position, every RNG state; atomic); the last step is always saved")
    c.add_argument("--keep", type=int, default=2, metavar="K",
                   help="keep the newest K checkpoints (0: all; default 2)")
    c.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue from a checkpoint: DIR (a checkpoint, or a run directory: its newest), or "
                   "without DIR the newest complete checkpoint in --out")
    c.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="when a rank dies, restart every rank up to K times, resuming from the newest complete "
                   "checkpoint (torchrun's elastic restart)")

    r = p.add_argument_group("reporting")
    r.add_argument("--log-every", type=int, default=10, metavar="N",
                   help="a log line every N steps when the output is not a terminal (default 10; a terminal "
                   "gets a progress bar)")
    r.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                   help="the device's peak TFLOP/s for MFU (default: a table of known GPUs; none on CPU)")


def _check_numbers(args) -> None:
    for name in ("eval_every", "save_every", "keep", "max_restarts", "warmup_steps"):
        if getattr(args, name) < 0:
            raise common.UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("eval_batches", "grad_accum", "log_every"):
        if getattr(args, name) < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise common.UsageError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.resume is not None and args.init_from is not None:
        raise common.UsageError("give --resume or --init-from, not both (a resumed run has its own weights)")


def schedule_for(name: str, pp: int, microbatches: int):
    """The pipeline schedule --schedule names, for pp stages (interleaved: 2 per rank)."""
    return schedule_by_name(name, pp, microbatches, virtual_stages=2)


def schedule(args):
    """The LRSchedule of the arguments (UsageError when they do not make one)."""
    from tandem.lr import LRSchedule

    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    try:
        return LRSchedule(lr=args.lr, min_lr=min_lr, warmup_steps=args.warmup_steps, decay=args.decay,
                          total_steps=args.steps)
    except ValueError as e:
        raise common.UsageError(str(e).replace("LRSchedule: ", "learning rate: "))


def open_data(args, cfg, *, check: bool = True):
    """(training TokenFile or None for synthetic, validation TokenFile or None), checked."""
    from tandem import data

    synthetic = args.data == "synthetic"
    if synthetic and (args.val_data or args.val_fraction is not None or args.data_dtype):
        raise common.UsageError("--val-data, --val-fraction and --data-dtype need a token file as --data")
    if args.val_data and args.val_fraction is not None:
        raise common.UsageError("give --val-data or --val-fraction, not both")
    if synthetic:
        return None, None
    seq, vocab = cfg.max_seq_len, cfg.vocab_size
    try:
        train = data.TokenFile(args.data, dtype=args.data_dtype, vocab_size=vocab, check=check, what="--data")
        val = None
        if args.val_fraction is not None:
            train, val = data.split(train, args.val_fraction)
        elif args.val_data:
            val = data.TokenFile(args.val_data, dtype=args.data_dtype, vocab_size=vocab, check=check,
                                 what="--val-data")
        train.check_length(seq)
        if val is not None:
            val.check_length(seq)
    except data.DataError as e:
        raise common.UsageError(str(e))
    if args.eval_every and val is None:
        raise common.UsageError("--eval-every needs validation data: --val-data PATH or --val-fraction F")
    return train, val


def validate_job(args, cfg, dp: int):
    """Every check of these options that can run before any process starts, but --resume's
    (train_job.check_resumable, which needs the returned training data)."""
    _check_numbers(args)
    schedule(args)
    validated = os.environ.get(VALIDATED_ENV) == "1"  # a self-launched worker: checked by the launcher
    train, val = open_data(args, cfg, check=not validated)
    if val is not None and args.eval_every:
        from tandem import data

        try:
            data.eval_starts(len(val), cfg.max_seq_len, args.eval_batches * args.batch_size * dp)
        except data.DataError as e:
            raise common.UsageError(f"--eval-batches {args.eval_batches}: {e}")
    if args.max_restarts and common.under_launcher() and common.is_rank0() \
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) < args.max_restarts:
        import sys

        print("tandem: note: under torchrun, --max-restarts is torchrun's option (with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1); a restarted worker resumes by itself", file=sys.stderr)
    return train
