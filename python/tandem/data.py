"""Training data: token files read with ``np.memmap``, and a sampler that is a pure function of
(seed, step, dp rank).

A token file is the raw ``.bin`` that nanoGPT and many pipelines write: token ids back to
back, little-endian ``uint16`` by default (nanoGPT's convention), ``uint32`` for vocabularies
over 65,536. Files written by `tandem prepare-data` carry a side file ``PATH.json`` with
their dtype, token count, largest id and tokenizer, so tandem never guesses their dtype.

    train = TokenFile("data/train.bin", vocab_size=256)     # checked: one clear DataError
    sampler = Sampler(num_tokens=len(train), seq_len=128, batch_size=8, dp=2, seed=0)
    inputs, targets = train.batch(sampler.starts(step, dp_rank), 128)   # [8, 128] each

The sampler cuts the file into non-overlapping windows of ``seq_len`` tokens (plus the one
target token after each) and reads them in a random order that is a fixed permutation per
epoch (a Feistel network over the window indices, so no index array is built however large
the file): global sample ``i`` of step ``k`` is the same window whatever the process, so
resuming at step k reads exactly what an uninterrupted run reads there, dp ranks read
disjoint windows, and every window is read once per epoch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["DataError", "DTYPES", "TokenFile", "Sampler", "eval_starts", "read_meta", "write_meta", "meta_path",
           "dtype_for_vocab", "unigram_entropy", "permute", "split"]

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_FORMAT = "tandem-tokens"
_SCAN = 1 << 24  # tokens per chunk when scanning a file


class DataError(ValueError):
    """Bad training data: the message names the file and what is wrong."""


def meta_path(path: str) -> str:
    """The side file of the token file ``path``: ``PATH.json``."""
    return path + ".json"


def dtype_for_vocab(vocab_size: int) -> str:
    """"uint16" when every id fits in 16 bits, else "uint32"."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_meta(path: str, *, dtype: str, num_tokens: int, max_id: int, vocab_size: int, tokenizer,
               **more) -> None:
    """Write the side file of the token file ``path``."""
    meta = {"format": _FORMAT, "version": 1, "dtype": dtype, "num_tokens": int(num_tokens),
            "max_id": int(max_id), "vocab_size": int(vocab_size), "tokenizer": tokenizer, **more}
    with open(meta_path(path), "w") as f:
        json.dump(meta, f, indent=1)


def read_meta(path: str) -> Optional[dict]:
    """The side file of ``path`` as a dict, or None when there is none."""
    side = meta_path(path)
    if not os.path.exists(side):
        return None
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"'{side}': not a readable side file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("dtype") not in DTYPES:
        raise DataError(f"'{side}': not a tandem token side file (format {_FORMAT!r} with a dtype in {sorted(DTYPES)})")
    return meta


class TokenFile:
    """A flat file of token ids, memory-mapped, or a contiguous part of one (:meth:`part`).

    ``dtype``: "uint16" or "uint32"; None takes the side file's, else "uint16". A dtype given
    that differs from the side file's is refused. ``vocab_size``: when given (and ``check``),
    every id is checked to be below it (the side file's largest id when it has one, else a
    scan; the first bad id is named with its offset). ``what`` names the file's option in
    errors (e.g. "--data").
    """

    def __init__(self, path: str, *, dtype: Optional[str] = None, vocab_size: Optional[int] = None,
                 check: bool = True, what: str = "token file"):
        self.path, self.what = path, what
        where = f"{what} '{path}'"
        if dtype is not None and dtype not in DTYPES:
            raise DataError(f"{where}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not os.path.exists(path):
            raise DataError(f"{where}: no such file")
        if not os.path.isfile(path):
            raise DataError(f"{where}: not a file")
        size = os.path.getsize(path)
        self.meta = read_meta(path)
        if self.meta is not None:
            if dtype is not None and dtype != self.meta["dtype"]:
                raise DataError(f"{where}: holds {self.meta['dtype']} tokens (its side file {meta_path(path)} says "
                                f"so), not {dtype}; drop --data-dtype or make it {self.meta['dtype']}")
            dtype = self.meta["dtype"]
        self.dtype = dtype or "uint16"
        item = DTYPES[self.dtype].itemsize
        if size == 0:
            raise DataError(f"{where}: the file is empty")
        if self.meta is not None and size != self.meta["num_tokens"] * item:
            raise DataError(f"{where}: {size} bytes, but its side file says {self.meta['num_tokens']} {self.dtype} "
                            f"tokens ({self.meta['num_tokens'] * item} bytes); the file was cut short or rewritten")
        if size % item:
            raise DataError(f"{where}: {size} bytes is not a whole number of {self.dtype} tokens; is the dtype "
                            f"right (--data-dtype)?")
        self.tokens = np.memmap(path, dtype=DTYPES[self.dtype], mode="r")  # (num_tokens,)
        self.begin, self.end = 0, len(self.tokens)
        if vocab_size is not None and check:
            self.check_ids(vocab_size)

    def __len__(self) -> int:
        return self.end - self.begin

    def part(self, begin: int, end: int) -> "TokenFile":
        """Tokens [begin, end) of this file, as a TokenFile sharing its memory map."""
        if not 0 <= begin <= end <= len(self):
            raise ValueError(f"TokenFile.part: [{begin}, {end}) is not within [0, {len(self)})")
        view = object.__new__(TokenFile)
        view.__dict__.update(self.__dict__)
        view.begin, view.end = self.begin + begin, self.begin + end
        return view

    def check_ids(self, vocab_size: int) -> None:
        """Raise DataError naming the first token id >= ``vocab_size`` and its offset."""
        if self.meta is not None and self.begin == 0 and self.end == self.meta["num_tokens"] \
                and self.meta["max_id"] < vocab_size:
            return  # the side file vouches for every id
        for lo in range(self.begin, self.end, _SCAN):
            chunk = self.tokens[lo:min(lo + _SCAN, self.end)]
            if chunk.size and int(chunk.max()) >= vocab_size:
                i = int(np.argmax(chunk >= vocab_size))
                hint = "" if self.meta is not None else f" (is the dtype, {self.dtype}, right? --data-dtype)"
                raise DataError(f"{self.what} '{self.path}': token id {int(chunk[i])} at offset {lo + i} is >= the "
                                f"model's vocab_size {vocab_size}{hint}")

    def check_length(self, seq_len: int) -> None:
        """Raise DataError when the file holds less than one sequence (seq_len + 1 tokens)."""
        if len(self) < seq_len + 1:
            raise DataError(f"{self.what} '{self.path}': {len(self)} tokens, shorter than one sequence "
                            f"(seq_len + 1 = {seq_len + 1} tokens)")

    def batch(self, starts, seq_len: int):
        """(inputs, targets) as int64 torch tensors [len(starts), seq_len]: the windows that
        begin at ``starts`` (offsets into this file or part) and the same shifted by one."""
        import torch

        rows = np.stack([np.asarray(self.tokens[self.begin + s:self.begin + s + seq_len + 1], dtype=np.int64)
                         for s in np.asarray(starts).tolist()])  # (b, s + 1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


# --- a permutation of [0, n) that is a pure function of (key, index) -------------------------
_M64 = (1 << 64) - 1


def _mix(x):
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _round_keys(key: int, rounds: int) -> list:
    out, x = [], key & _M64
    for r in range(rounds):
        x = (x + 0x9E3779B97F4A7C15 * (r + 1)) & _M64
        out.append(int(_mix(np.array([x], dtype=np.uint64))[0]))
    return out


def permute(index, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """``index`` (ints in [0, n)) through a bijection of [0, n) chosen by ``key``: a balanced
    Feistel network on the next even power of two, cycle-walked back into [0, n)."""
    index = np.atleast_1d(np.asarray(index, dtype=np.uint64))
    if n <= 1:
        return index.astype(np.int64)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)  # the domain 2^(2 half) >= n
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = [np.uint64(k) for k in _round_keys(key, rounds)]
    x = index.copy()
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():  # cycle walking: a permutation of the domain, so this ends
        left, right = x[todo] >> shift, x[todo] & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[todo] = (left << shift) | right
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def _key(seed: int, epoch: int) -> int:
    return (int(seed) * 0x100000001B3 + int(epoch) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _M64


@dataclass(kw_only=True, frozen=True)
class Sampler:
    """Where the training windows of each step start: a pure function of (seed, step, dp rank).

    Global sample ``i = ((step * accum + micro) * dp + dp_rank) * batch_size + j`` is window
    ``permute(i mod W, W, key(seed, i // W))`` of the W = (num_tokens - 1) // seq_len
    non-overlapping windows: the global batch of a step is the same for any dp that keeps
    ``batch_size * dp`` (and ``accum``), and each window is read once per epoch.
    """

    num_tokens: int
    """tokens of the data (a file or a part of one)"""
    seq_len: int
    """tokens per sequence; a window is seq_len + 1 tokens (the last is only a target)"""
    batch_size: int
    """sequences per dp rank and micro-step"""
    dp: int = 1
    """data-parallel replicas"""
    accum: int = 1
    """micro-steps (gradient accumulation) per step"""
    seed: int = 0
    """picks the order of the windows"""

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "dp", "accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"Sampler: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_tokens < self.seq_len + 1:
            raise ValueError(f"Sampler: num_tokens={self.num_tokens} is shorter than one window "
                             f"(seq_len + 1 = {self.seq_len + 1})")

    @property
    def num_windows(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    @property
    def samples_per_step(self) -> int:
        """Sequences per step over all dp ranks and micro-steps (the global batch)."""
        return self.batch_size * self.dp * self.accum

    def epoch(self, step: int) -> float:
        """Passes over the data completed before ``step`` (fractional)."""
        return step * self.samples_per_step / self.num_windows

    def starts(self, step: int, dp_rank: int = 0, micro: int = 0) -> np.ndarray:
        """Token offsets [batch_size] of dp rank ``dp_rank``'s windows at ``step``, micro-step ``micro``."""
        if step < 0 or not 0 <= dp_rank < self.dp or not 0 <= micro < self.accum:
            raise ValueError(f"Sampler.starts: step={step}, dp_rank={dp_rank}, micro={micro} out of range "
                             f"(dp={self.dp}, accum={self.accum})")
        first = ((step * self.accum + micro) * self.dp + dp_rank) * self.batch_size
        i = np.arange(first, first + self.batch_size, dtype=np.int64)
        w = self.num_windows
        epochs = i // w
        out = np.empty_like(i)
        for e in np.unique(epochs).tolist():  # a batch spans at most two epochs
            sel = epochs == e
            out[sel] = permute(i[sel] % w, w, _key(self.seed, e))
        return out * self.seq_len


def eval_starts(num_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """``count`` non-overlapping validation windows spread evenly over ``num_tokens`` tokens
    (token offsets); DataError when there are fewer windows than that."""
    windows = (num_tokens - 1) // seq_len
    if count > windows:
        raise DataError(f"the validation data holds {windows} windows of seq_len + 1 = {seq_len + 1} tokens "
                        f"({num_tokens} tokens), fewer than the {count} one evaluation needs")
    return (np.arange(count, dtype=np.int64) * windows // count) * seq_len


def unigram_entropy(tokens: TokenFile) -> float:
    """Entropy in nats of the tokens' frequencies: the loss of the best model that ignores
    context, on these tokens."""
    counts = None
    for lo in range(tokens.begin, tokens.end, _SCAN):
        c = np.bincount(np.asarray(tokens.tokens[lo:min(lo + _SCAN, tokens.end)], dtype=np.int64))
        if counts is None:
            counts = c
        else:
            if len(c) > len(counts):
                c, counts = counts, c
            counts[:len(c)] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def split(tokens: TokenFile, fraction: float) -> tuple[TokenFile, TokenFile]:
    """(training part, validation part) of ``tokens``: the last ``fraction`` of them are held
    out for validation."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {fraction}")
    held = int(round(len(tokens) * fraction))
    if held < 1 or held >= len(tokens):
        raise DataError(f"--val-fraction {fraction} of {tokens.what} '{tokens.path}' ({len(tokens)} tokens) leaves "
                        f"{held} tokens for validation and {len(tokens) - held} for training")
    return tokens.part(0, len(tokens) - held), tokens.part(len(tokens) - held, len(tokens))
