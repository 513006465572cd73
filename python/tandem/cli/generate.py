"""`tandem generate`: decode with TP and/or PP, from a Hugging Face model (text in, text out)
or from a checkpoint written by `tandem train` (token ids).

    tandem generate --model path/to/Llama --prompt "The capital of France is" --tp 2 --pp 2
    tandem generate --checkpoint runs/demo/checkpoint --prompt "3 7 11"

Text prompts are tokenized with the model's ``tokenizer.json`` and the new text is streamed;
several ``--prompt``s are decoded together (left-padded, one batch). ``--prompt-ids`` gives
token ids instead of text. Decoding stops at the model's end-of-sequence token.
"""

from tandem.cli import common

DTYPES = ("float32", "bfloat16", "float16", "float64")


def add_parser(sub):
    p = sub.add_parser("generate", help="decode text from a Hugging Face model or a `tandem train` checkpoint "
                       "(TP and/or pipelined inference)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    src.add_argument("--checkpoint", help="a checkpoint directory written by `tandem train`")
    p.add_argument("--prompt", action="append", default=None,
                   help="text (repeat for a batch) with --model or a checkpoint of a model trained on a token file; "
                   "space-separated token ids with a checkpoint of the synthetic task")
    p.add_argument("--prompt-ids", action="append", default=None, help='space-separated token ids, e.g. "1 450 7483"')
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the most likely tokens adding up to p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype of --model (default float32)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(run=run)


def _ids(text: str, what: str) -> list:
    try:
        ids = [int(t) for t in text.split()]
    except ValueError:
        raise common.UsageError(f"{what} must be space-separated token ids, got {text!r}")
    if not ids:
        raise common.UsageError(f"{what} is empty")
    return ids


def _source(args):
    """(GPTConfig, tokenizer or None) of --model or --checkpoint."""
    if args.model:
        from tandem.hf import read_config, to_gpt_config

        try:
            _, cfg = to_gpt_config(read_config(args.model))
        except (FileNotFoundError, ValueError) as e:
            raise common.UsageError(str(e))
        tok = None
        if args.prompt:
            from tandem.hf.tokenizer import Tokenizer

            try:
                tok = Tokenizer.from_dir(args.model)
            except (FileNotFoundError, ValueError) as e:
                raise common.UsageError(str(e))
        return cfg, tok
    from tandem import checkpoint
    from tandem.models import GPTConfig

    try:
        extra = checkpoint.read_extra(args.checkpoint)
    except FileNotFoundError as e:
        raise common.UsageError(str(e))
    if "config" not in extra:
        raise common.UsageError(f"{args.checkpoint}: not written by `tandem train` (no model config)")
    return GPTConfig(**extra["config"]), _trained_tokenizer(extra.get("tokenizer"))


def _trained_tokenizer(spec):
    """The tokenizer of the data a `tandem train` checkpoint learned (from the token file's
    side file): bytes, a Hugging Face directory, or None (token ids: the synthetic task)."""
    if spec == "bytes":
        from tandem.hf.tokenizer import ByteTokenizer

        return ByteTokenizer()
    if isinstance(spec, dict) and spec.get("type") == "huggingface":
        from tandem.hf.tokenizer import Tokenizer

        try:
            return Tokenizer.from_dir(spec["path"])
        except (FileNotFoundError, ValueError) as e:
            raise common.UsageError(f"the checkpoint's tokenizer: {e}")
    return None


def validate(args):
    """-> (cfg, prompts as lists of ids, tokenizer or None), or UsageError."""
    cfg, tok = _source(args)
    if not (args.prompt or args.prompt_ids):
        raise common.UsageError("give --prompt (text, or token ids for the synthetic task) or --prompt-ids")
    if args.prompt and args.prompt_ids:
        raise common.UsageError("give --prompt or --prompt-ids, not both")
    if args.prompt_ids:
        prompts = [_ids(p, "--prompt-ids") for p in args.prompt_ids]
    elif tok is None:  # a `tandem train` checkpoint of the synthetic task: its vocabulary is integers
        prompts = [_ids(p, "--prompt") for p in args.prompt]
    else:
        prompts = [tok.encode(p) for p in args.prompt]
        if any(not p for p in prompts):
            raise common.UsageError("--prompt: a prompt encodes to no tokens")
    if any(not 0 <= t < cfg.vocab_size for p in prompts for t in p):
        raise common.UsageError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    for name in ("tp", "pp", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be >= 1")
    longest = max(len(p) for p in prompts)
    if longest + args.max_new_tokens > cfg.max_seq_len:
        raise common.UsageError(f"prompt ({longest}) + --max-new-tokens ({args.max_new_tokens}) exceeds the "
                                f"model's max_seq_len={cfg.max_seq_len}")
    from tandem.models.sampling import Sampling

    try:
        Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        cfg.check_tp(args.tp)
    except ValueError as e:
        raise common.UsageError(str(e))
    if cfg.num_layers + 2 < args.pp:
        raise common.UsageError(f"--pp {args.pp} exceeds the model's {cfg.num_layers + 2} layers")
    return cfg, prompts, tok


def run(args) -> int:
    try:
        cfg, prompts, tok = validate(args)
    except common.UsageError as e:
        common.fail(str(e))
    world = args.tp * args.pp
    if world > 1 and not common.under_launcher():
        return common.relaunch(world, args.argv)
    from tandem.cli.generate_loop import generate

    return generate(args, cfg, prompts, tok)
