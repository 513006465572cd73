"""Text in, text out: a checkpoint's ``tokenizer.json`` through the ``tokenizers`` package.

    tok = Tokenizer.from_dir("path/to/model")
    ids = tok.encode("Hello")             # with the BOS token the tokenizer adds, if any
    tok.decode(ids)                       # -> "Hello"
    stream = tok.stream()                 # incremental decoding for streaming output
    for t in new_ids: print(stream.step(t), end="")

The special tokens (BOS, EOS, padding) come from ``tokenizer_config.json``,
``generation_config.json`` and ``config.json``, in that order of precedence. Nothing is
downloaded: the files must be in the directory.
"""

from __future__ import annotations

import json
import os
from typing import Optional

__all__ = ["Tokenizer", "ByteTokenizer"]


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_id(tok, value) -> Optional[int]:
    """A special token given as an id, a string or a {"content": ...} dict -> its id."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        return _token_id(tok, value[0]) if value else None
    if isinstance(value, dict):
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


class Tokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``) with the model's special tokens."""

    def __init__(self, tok, *, bos_token_id=None, eos_token_id=None, pad_token_id=None):
        self._tok = tok
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id
        eos = eos_token_id if isinstance(eos_token_id, list) else ([] if eos_token_id is None else [eos_token_id])
        self.eos_token_ids = [e for e in eos if e is not None]

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        from tokenizers import Tokenizer as _Fast

        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"tandem.hf: no tokenizer.json in '{path}' (a fast tokenizer is needed; use "
                                    "--prompt-ids to give token ids)")
        try:
            tok = _Fast.from_file(file)
        except Exception as e:
            raise ValueError(f"tandem.hf: cannot read '{file}': {e}") from None
        cfg = {**_read_json(os.path.join(path, "config.json")), **_read_json(os.path.join(path, "generation_config.json"))}
        tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        ids = {}
        for name in ("bos", "eos", "pad"):
            token = tcfg.get(f"{name}_token")
            ids[name] = _token_id(tok, token) if token is not None else None
            if ids[name] is None:
                ids[name] = cfg.get(f"{name}_token_id")
        eos = cfg.get("eos_token_id", ids["eos"])  # generation_config may list several
        return cls(tok, bos_token_id=ids["bos"], eos_token_id=eos if eos is not None else ids["eos"],
                   pad_token_id=ids["pad"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the special tokens the tokenizer's template adds."""
        return self._tok.encode(text).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self) -> "_Stream":
        """An incremental decoder: ``step(token_id)`` returns the new text (maybe "")."""
        return _Stream(self)


class _Stream:
    """Decodes a growing list of ids and hands out only the text that is final (a byte
    sequence cut in the middle of a character waits for its end)."""

    def __init__(self, tok):
        self.tok, self.ids, self.sent = tok, [], 0

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new


class ByteTokenizer:
    """Bytes as tokens (ids 0..255, no special tokens): tandem's own byte-level models."""

    bos_token_id = pad_token_id = None
    eos_token_ids: list = []
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def stream(self) -> _Stream:
        return _Stream(self)
