"""`tandem prepare-data`: text files to the token files `tandem train --data` reads.

    tandem prepare-data README.md docs/ --tokenizer bytes --out data/
    tandem prepare-data corpus/ --tokenizer path/to/Llama --out data/ --val-fraction 0.01

Each input file is one document (a directory stands for every text file under it, in
sorted order; hidden files and files that are not UTF-8 text are skipped). A document is
tokenized whole (byte-level: its UTF-8 bytes; a Hugging Face ``tokenizer.json``: with the
special tokens its template adds, and its end-of-sequence token after it), and the last
``--val-fraction`` of its tokens go to ``val.bin``, the rest to ``train.bin``: validation
text comes from every document, never seen in training. Both files get a side file
(``train.bin.json``) with their dtype, token count, largest id and tokenizer, and appear
complete or not at all (written as ``.partial``, then renamed).
"""

import os
import sys

from tandem.cli import common

__all__ = ["add_parser", "run"]


def add_parser(sub):
    p = sub.add_parser("prepare-data", help="tokenize text files into train.bin / val.bin for `tandem train --data`",
                       description="Tokenize text files into train.bin and val.bin (token ids, with side files "
                       "giving their dtype and tokenizer): the last --val-fraction of every file goes to val.bin.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, or directories (their text files, sorted)")
    p.add_argument("--tokenizer", default="bytes", metavar="bytes|HF_DIR",
                   help='"bytes" (byte-level, ids 0-255) or a Hugging Face model directory with tokenizer.json '
                   "(default: bytes)")
    p.add_argument("--out", required=True, metavar="DIR", help="where train.bin, val.bin and their side files go")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="the tail of every document held out for val.bin (default 0.05; 0: no val.bin)")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token dtype (default: uint16 when the vocabulary fits, else uint32)")
    p.set_defaults(run=run)


def _is_text(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a character cut by the 64 KiB window is fine
    return True


def documents(inputs: list, out: str) -> tuple[list, int]:
    """(files in order, each once, number of non-text files skipped under directories);
    UsageError for a missing input or when nothing is left. The output directory ``out`` is
    never read."""
    files, skipped, seen = [], 0, set()
    out = os.path.realpath(out)

    def take(path):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append(path)

    for item in inputs:
        if os.path.isfile(item):
            take(item)
        elif os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                                 and os.path.realpath(os.path.join(root, d)) != out)
                if os.path.realpath(root) == out:
                    continue
                for name in sorted(names):
                    path = os.path.join(root, name)
                    if name.startswith(".") or not os.path.isfile(path):
                        continue
                    if _is_text(path):
                        take(path)
                    else:
                        skipped += 1
        else:
            raise common.UsageError(f"prepare-data: input '{item}' does not exist")
    if not files:
        raise common.UsageError(f"prepare-data: no text files in {inputs}")
    return files, skipped


class _Bytes:
    name, vocab_size = "bytes", 256

    def ids(self, raw: bytes, path: str) -> list:
        return list(raw)

    def describe(self):
        return "bytes"


class _HF:
    def __init__(self, path: str):
        from tandem.hf.tokenizer import Tokenizer

        try:
            self.tok = Tokenizer.from_dir(path)
        except (FileNotFoundError, ValueError) as e:
            raise common.UsageError(f"prepare-data --tokenizer: {e}")
        self.path = os.path.abspath(path)
        self.vocab_size = self.tok.vocab_size
        self.eos = self.tok.eos_token_ids[0] if self.tok.eos_token_ids else None

    def ids(self, raw: bytes, path: str) -> list:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise common.UsageError(f"prepare-data: '{path}' is not UTF-8 text (byte {e.start}); a Hugging Face "
                                    "tokenizer takes text")
        ids = self.tok.encode(text)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return ids

    def describe(self):
        return {"type": "huggingface", "path": self.path, "vocab_size": self.vocab_size}


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not sys.stderr.isatty(),
                dynamic_ncols=True)


def run(args) -> int:
    try:
        if not 0 <= args.val_fraction < 1:
            raise common.UsageError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
        files, skipped = documents(args.inputs, args.out)
        tok = _Bytes() if args.tokenizer == "bytes" else _HF(args.tokenizer)
        return _write(args, files, skipped, tok)
    except common.UsageError as e:
        common.fail(str(e))


def _write(args, files: list, skipped: int, tok) -> int:
    import numpy as np

    from tandem import data

    dtype = data.dtype_for_vocab(tok.vocab_size) if args.dtype == "auto" else args.dtype
    if tok.vocab_size > np.iinfo(data.DTYPES[dtype]).max + 1:
        raise common.UsageError(f"--dtype {dtype} cannot hold the tokenizer's {tok.vocab_size} ids; use uint32")
    os.makedirs(args.out, exist_ok=True)
    names = ["train.bin"] + (["val.bin"] if args.val_fraction > 0 else [])
    paths = {n: os.path.join(args.out, n) for n in names}
    counts, top = {n: 0 for n in names}, {n: -1 for n in names}
    outs = {n: open(p + ".partial", "wb") for n, p in paths.items()}
    total = sum(os.path.getsize(f) for f in files)
    try:
        with _progress(total) as bar:
            for path in files:
                with open(path, "rb") as f:
                    raw = f.read()
                ids = np.asarray(tok.ids(raw, path), dtype=data.DTYPES[dtype])  # (n,)
                held = int(round(len(ids) * args.val_fraction))
                parts = {"train.bin": ids[:len(ids) - held], "val.bin": ids[len(ids) - held:]}
                for n in names:
                    if len(parts[n]):
                        parts[n].tofile(outs[n])
                        counts[n] += len(parts[n])
                        top[n] = max(top[n], int(parts[n].max()))
                bar.update(len(raw))
    finally:
        for f in outs.values():
            f.close()
    for n in names:
        if counts[n] == 0:
            for p in paths.values():
                os.remove(p + ".partial")
            raise common.UsageError(f"prepare-data: {n} would be empty ({sum(counts.values())} tokens in all); "
                                    "give more text or another --val-fraction")
    for n, p in paths.items():
        data.write_meta(p, dtype=dtype, num_tokens=counts[n], max_id=top[n], vocab_size=tok.vocab_size,
                        tokenizer=tok.describe(), documents=len(files))
        os.replace(p + ".partial", p)  # the side file first: the token file never appears without it
    note = f", {skipped} non-text files skipped" if skipped else ""
    print(f"prepare-data: {len(files)} files ({total:,} bytes{note}), tokenizer "
          f"{'bytes' if isinstance(tok, _Bytes) else tok.path} (vocab {tok.vocab_size}), {dtype}")
    for n, p in paths.items():
        print(f"  {p}: {counts[n]:,} tokens")
    return 0
