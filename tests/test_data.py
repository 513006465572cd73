"""tandem.data: token files and their errors, the (seed, step, dp rank) sampler, validation
windows, the unigram entropy; `tandem prepare-data` end to end (bytes and tokenizer.json)."""

import json
import math
import subprocess

import numpy as np
import pytest

from tandem import data
from tandem.data import DataError, Sampler, TokenFile


def _write(path, ids, dtype="uint16", meta=True, vocab=256):
    arr = np.asarray(ids, dtype=data.DTYPES[dtype])
    arr.tofile(path)
    if meta:
        data.write_meta(str(path), dtype=dtype, num_tokens=len(arr), max_id=int(arr.max()), vocab_size=vocab,
                        tokenizer="bytes")
    return str(path)


def test_token_file_reads_windows(tmp_path):
    ids = np.arange(1000) % 251
    for dtype, meta in (("uint16", True), ("uint16", False), ("uint32", True)):
        path = _write(tmp_path / f"t-{dtype}-{meta}.bin", ids, dtype, meta)
        f = TokenFile(path, dtype=None if meta else dtype, vocab_size=256)
        assert len(f) == 1000 and f.dtype == dtype
        x, y = f.batch([0, 10, 990 - 1], 8)
        assert x.dtype == y.dtype == __import__("torch").int64 and tuple(x.shape) == (3, 8)
        assert x[1].tolist() == list(range(10, 18)) and y[1].tolist() == list(range(11, 19))
        part = f.part(100, 200)
        assert len(part) == 100 and part.batch([5], 3)[0].tolist() == [[105, 106, 107]]
    train, val = data.split(f, 0.1)
    assert (len(train), len(val)) == (900, 100) and val.batch([0], 2)[0].tolist() == [[900 % 251, 901 % 251]]


def test_bad_token_files_are_one_clear_error(tmp_path):
    good = _write(tmp_path / "good.bin", np.arange(100))
    cases = []
    cases.append((lambda: TokenFile(str(tmp_path / "missing.bin"), what="--data"), "--data '", "no such file"))
    open(tmp_path / "empty.bin", "wb").close()
    cases.append((lambda: TokenFile(str(tmp_path / "empty.bin")), "empty.bin", "the file is empty"))
    cases.append((lambda: TokenFile(good, dtype="uint32"), "good.bin", "holds uint16 tokens (its side file"))
    raw = _write(tmp_path / "odd.bin", np.arange(3), meta=False)  # 6 bytes: not whole uint32 tokens
    cases.append((lambda: TokenFile(raw, dtype="uint32"), "odd.bin", "6 bytes is not a whole number of uint32 tokens"))
    short = _write(tmp_path / "short.bin", np.arange(100))
    with open(short, "ab") as f:
        f.write(b"\0\0")  # a token more than the side file says
    cases.append((lambda: TokenFile(short), "short.bin", "202 bytes, but its side file says 100 uint16 tokens"))
    big = np.arange(100)
    big[37] = 300
    raw_big = _write(tmp_path / "big.bin", big, meta=False)
    cases.append((lambda: TokenFile(raw_big, vocab_size=256), "big.bin",
                  "token id 300 at offset 37 is >= the model's vocab_size 256 (is the dtype, uint16, right?"))
    meta_big = _write(tmp_path / "metabig.bin", big)
    cases.append((lambda: TokenFile(meta_big, vocab_size=256), "metabig.bin", "token id 300 at offset 37"))
    cases.append((lambda: TokenFile(good).check_length(100), "good.bin",
                  "100 tokens, shorter than one sequence (seq_len + 1 = 101 tokens)"))
    with open(tmp_path / "bad.bin.json", "w") as f:
        f.write("{")
    open(tmp_path / "bad.bin", "wb").write(b"\0\0")
    cases.append((lambda: TokenFile(str(tmp_path / "bad.bin")), "bad.bin.json", "not a readable side file"))
    cases.append((lambda: data.split(TokenFile(good), 1.5), "--val-fraction", "must be in (0, 1)"))
    for call, where, message in cases:
        with pytest.raises(DataError) as e:
            call()
        assert where in str(e.value) and message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    TokenFile(good, vocab_size=100)  # ids 0..99 fit
    with pytest.raises(DataError, match="token id 100 at offset 100"):
        TokenFile(_write(tmp_path / "edge.bin", np.arange(101), meta=False), vocab_size=100)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_permute_is_a_bijection(n):
    for key in (0, 1, 2**63 + 5):
        out = data.permute(np.arange(n), n, key)
        assert sorted(out.tolist()) == list(range(n))
    if n >= 64:  # not the identity, and another key gives another order
        assert data.permute(np.arange(n), n, 0).tolist() != list(range(n))
        assert data.permute(np.arange(n), n, 0).tolist() != data.permute(np.arange(n), n, 1).tolist()


def test_sampler_is_a_pure_function_with_disjoint_ranks_and_whole_epochs():
    seq, n_tokens = 16, 16 * 100 + 1  # 100 windows
    s2 = Sampler(num_tokens=n_tokens, seq_len=seq, batch_size=5, dp=2, seed=3)
    again = Sampler(num_tokens=n_tokens, seq_len=seq, batch_size=5, dp=2, seed=3)
    assert s2.starts(7, 1).tolist() == again.starts(7, 1).tolist()  # resuming reads the same
    # one epoch: 10 steps x 2 ranks x 5: every window once, the ranks disjoint
    epoch = [s2.starts(step, r) for step in range(10) for r in range(2)]
    flat = np.concatenate(epoch)
    assert sorted(flat.tolist()) == [w * seq for w in range(100)]
    # the next epoch is another order of the same windows
    nxt = np.concatenate([s2.starts(step, r) for step in range(10, 20) for r in range(2)])
    assert sorted(nxt.tolist()) == sorted(flat.tolist()) and nxt.tolist() != flat.tolist()
    # the global batch does not depend on how it is cut over dp or accumulation
    s1 = Sampler(num_tokens=n_tokens, seq_len=seq, batch_size=10, dp=1, seed=3)
    acc = Sampler(num_tokens=n_tokens, seq_len=seq, batch_size=5, dp=1, accum=2, seed=3)
    for step in (0, 4, 13):  # 13: across the epoch boundary mid-batch for some layouts
        whole = s1.starts(step).tolist()
        assert whole == np.concatenate([s2.starts(step, 0), s2.starts(step, 1)]).tolist()
        assert whole == np.concatenate([acc.starts(step, 0, 0), acc.starts(step, 0, 1)]).tolist()
    assert Sampler(num_tokens=n_tokens, seq_len=seq, batch_size=10, seed=4).starts(0).tolist() != s1.starts(0).tolist()
    with pytest.raises(ValueError, match="dp_rank=2"):
        s2.starts(0, 2)
    with pytest.raises(ValueError, match="shorter than one window"):
        Sampler(num_tokens=16, seq_len=16, batch_size=1)


def test_eval_windows_and_unigram_entropy(tmp_path):
    starts = data.eval_starts(16 * 10 + 1, 16, 4)
    assert starts.tolist() == [0, 32, 80, 112]  # windows 0, 2, 5, 7 of 10: spread, disjoint
    with pytest.raises(DataError, match="holds 10 windows .* fewer than the 11 one evaluation needs"):
        data.eval_starts(16 * 10 + 1, 16, 11)
    f = TokenFile(_write(tmp_path / "u.bin", np.tile(np.arange(8), 50)))
    assert data.unigram_entropy(f) == pytest.approx(math.log(8), rel=1e-12)
    g = TokenFile(_write(tmp_path / "g.bin", [0, 0, 0, 1]))
    assert data.unigram_entropy(g) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_prepare_data_bytes_and_tokenizer_json(tmp_path, capsys):
    from tandem.cli import main

    def _tandem(*args):  # in this process: the command's code, stdout and stderr
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    texts = {"a.md": "# Title\n\nSome text, and more text.\n" * 3, "sub/b.py": "def f(x):\n    return x + 1\n" * 4}
    for name, text in texts.items():
        (docs / name).write_text(text)
    (docs / "sub" / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")  # skipped: not text
    out = tmp_path / "out"
    r = _tandem("prepare-data", str(docs), "--out", str(out), "--val-fraction", "0.25")
    assert r.returncode == 0, r.stderr
    assert "2 files" in r.stdout and "1 non-text files skipped" in r.stdout and "train.bin" in r.stdout
    train, val = TokenFile(str(out / "train.bin"), vocab_size=256), TokenFile(str(out / "val.bin"), vocab_size=256)
    assert train.meta["tokenizer"] == "bytes" and train.dtype == "uint16"
    heads, tails = b"", b""
    for name in sorted(texts):  # documents in sorted order, each split at its last quarter
        raw = texts[name].encode()
        cut = len(raw) - int(round(len(raw) * 0.25))
        heads, tails = heads + raw[:cut], tails + raw[cut:]
    assert bytes(np.asarray(train.tokens).astype(np.uint8)) == heads
    assert bytes(np.asarray(val.tokens).astype(np.uint8)) == tails

    # a Hugging Face tokenizer.json (a word-level one built here), with its EOS after each document
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for t in texts.values() for w in t.replace("\n", " ").split()} | {"</s>", "[UNK]"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = tmp_path / "hf"
    hf.mkdir()
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    r = _tandem("prepare-data", str(docs / "a.md"), str(docs / "sub" / "b.py"), "--tokenizer", str(hf),
                "--out", str(tmp_path / "out2"), "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out2" / "val.bin").exists()
    t = TokenFile(str(tmp_path / "out2" / "train.bin"))
    expected = []
    for name in ("a.md", "sub/b.py"):
        expected += tok.encode(texts[name]).ids + [words.index("</s>")]
    assert np.asarray(t.tokens).tolist() == expected
    assert t.meta["tokenizer"]["type"] == "huggingface" and t.meta["vocab_size"] == len(words)

    for args, message in ((["/nonexistent/x.txt"], "input '/nonexistent/x.txt' does not exist"),
                          ([str(docs), "--tokenizer", str(tmp_path)], "no tokenizer.json in"),
                          ([str(docs), "--val-fraction", "1"], "--val-fraction must be in [0, 1)")):
        r = _tandem("prepare-data", *args, "--out", str(tmp_path / "o3"))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
