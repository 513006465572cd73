"""Pipelined decoding of tandem's GPT: each stage keeps the KV caches of its own blocks.

The requests are cut into ``num_microbatches`` groups (default: as many as pipeline
stages) that are in flight together: while the last stage picks the next token of group
i, the earlier stages already work on groups i + 1, ... . Per decoding step t and group i:

    first stage   ids (the prompt at t = 0, else the token the last stage sent back)
                  -> embedding at position offset -> its blocks -> send h to the next stage
    other stages  receive h -> their blocks (with their caches) -> send h on
    last stage    ... -> head: vocab-sharded logits [b, V/tp] of the last position ->
                  next token (argmax over the shards, never gathering the vocabulary) ->
                  send it back to the first stage

Sampling (temperature > 0) is the Gumbel-max trick, argmax(logits / T + g) with noise g
drawn for the full [B, V] from ``seed`` and the step: the same tokens whatever the tp, pp
or number of groups, and each shard only needs its own columns.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from tandem.models.sampling import Sampling, gumbel, pick
from tandem.pipeline._agree import AGREE_TIMEOUT_S, agree, setting
from tandem.pipeline._transport import ErrorBoard, PipelineError, StageTraffic, fail_every_rank, wait

__all__ = ["generate", "sharded_argmax"]


def sharded_argmax(scores: Tensor, comm, tp_rank: int) -> Tensor:
    """argmax over the full last dimension of scores sharded over tp ([b, V/tp] per rank,
    rank r holding columns r*V/tp ...) -> [b] global indices, first maximum on ties, as
    torch.argmax of the gathered [b, V]. Gathers 2 numbers per row, not V/tp."""
    value, index = scores.float().max(dim=-1)  # (b, V/tp) -> (b,), (b,)
    if comm is None:
        return index
    local_v = scores.shape[-1]
    mine = torch.stack([value.double(), (index + tp_rank * local_v).double()], dim=-1)  # (b, 2)
    gathered = mine.new_empty((comm.size, *mine.shape))
    comm.all_gather(gathered, mine.unsqueeze(0).contiguous()).wait()  # (1, b, 2) -> (tp, b, 2)
    best_shard = gathered[..., 0].argmax(dim=0)  # (b,): first shard holding the maximum
    return gathered[..., 1].gather(0, best_shard.unsqueeze(0)).squeeze(0).long()


class _Stage:
    """The GPT layers of this stage, run with per-group caches."""

    def __init__(self, module: nn.Module, groups: list[list[int]], max_len: int, pad: Optional[Tensor]):
        from tandem.models.gpt import GPTBlock, GPTEmbedding, GPTHead

        self.layers = list(module.layers.values()) if hasattr(module, "layers") else [module]
        self.kinds = []
        for layer in self.layers:
            kind = ("embed" if isinstance(layer, GPTEmbedding) else "block" if isinstance(layer, GPTBlock)
                    else "head" if isinstance(layer, GPTHead) else None)
            if kind is None:
                raise TypeError(f"generate: a stage holds {type(layer).__name__}; pipelined decoding "
                                "runs GPT layers (GPTEmbedding, GPTBlock, GPTHead)")
            if kind == "embed" and max_len > layer.config.max_seq_len:
                raise ValueError(f"generate: the prompt and max_new_tokens make {max_len} tokens, more "
                                 f"than the model's max_seq_len={layer.config.max_seq_len}")
            self.kinds.append(kind)
        blocks = [l for l, k in zip(self.layers, self.kinds) if k == "block"]
        if any(b.sequence_parallel for b in blocks):
            raise ValueError("generate: sequence_parallel models cannot decode one token at a time; "
                             "build the model with sequence_parallel=False for inference")
        # caches[i][j]: group i, j-th block of this stage; never leave this rank
        self.pads = [None if pad is None else pad[r] for r in groups]  # left padding of each group's rows
        self.caches = [[b.attn.new_cache(len(r), max_len, pad=p) for b in blocks] for r, p in zip(groups, self.pads)]
        self.tp = next((getattr(l, "tp") for l in self.layers if hasattr(l, "tp")), None)

    def run(self, x: Tensor, group: int, offset: int) -> Tensor:
        caches = iter(self.caches[group])
        for layer, kind in zip(self.layers, self.kinds):
            if kind == "embed":
                x = layer(x, offset, self.pads[group])  # (b, s) ids -> (b, s, h)
            elif kind == "block":
                x = layer(x, next(caches))  # (b, s, h), cache += s positions
            else:
                x = layer(x)  # (b, s, h) -> (b, s, V/tp)
        return x


@torch.no_grad()
def generate(stage_module: nn.Module, prompt: Tensor, max_new_tokens: int, *, mesh=None,
             num_microbatches: Optional[int] = None, temperature: float = 0.0, seed: int = 0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             attention_mask: Optional[Tensor] = None, eos_token_id=None, pad_token_id: Optional[int] = None,
             timeout: float = 300.0, on_token: Optional[Callable] = None) -> Tensor:
    """Decode up to ``max_new_tokens`` after ``prompt`` [B, s0] (the same on every rank)
    through the pipeline; returns [B, s0 + new] on every rank (new = max_new_tokens unless
    every row ended with ``eos_token_id`` before).

    ``stage_module``: this rank's stage of a GPT (``split(gpt.layers(), pp)``), one stage
    per rank. Greedy when ``temperature == 0`` (token for token what the whole model's
    greedy decoding gives), else sampled with ``seed``, ``top_k`` and ``top_p`` (the same
    tokens as ``GPT.generate`` with the same arguments). ``attention_mask`` [B, s0]: 0 for
    left padding, 1 for tokens. ``num_microbatches``: request
    groups in flight (default: min(pp, B)). ``on_token(rows, tokens)`` is called on the last
    stage as soon as request group ``rows`` has its next tokens [len(rows)] (streaming).
    """
    from tandem.mesh import Mesh, get_mesh

    mesh = mesh if mesh is not None else (get_mesh() or Mesh.single())
    # one key per call, the same on every rank of this replica (every rank calls generate)
    check_board = ErrorBoard(mesh.board_key("generate", per_replica=True))
    try:
        return _generate(stage_module, prompt, max_new_tokens, mesh, num_microbatches,
                         dict(temperature=temperature, seed=seed, top_k=top_k, top_p=top_p),
                         dict(attention_mask=attention_mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id),
                         timeout, on_token, check_board)
    except BaseException:
        # whatever failed, on whichever rank: the ring's messages may be out of step, and every
        # rank must agree on rebuilding it, so every rank that raises drops it
        _drop_ring(mesh)
        raise


def _check_arguments(stage_module, prompt, max_new_tokens, mesh, num_microbatches, sampling, ends, timeout):
    """This rank's checks and set-up: -> (request groups' rows, the stage with its caches,
    Sampling, left padding [B] or None); raises ValueError / TypeError naming what is wrong."""
    from tandem.models.gpt import left_padding

    pp, rank = mesh.pp, mesh.pp_rank
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.dtype not in (torch.int64, torch.int32):
        raise ValueError("generate: prompt must be int token ids of shape [B, s0]")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"generate: timeout must be a finite number of seconds > 0, got {timeout!r}")
    try:
        sampling = Sampling(**sampling)
        pad = left_padding(ends["attention_mask"], prompt.shape)
    except ValueError as e:
        raise ValueError(f"generate: {e}") from None
    stage = getattr(stage_module, "stage", rank)
    if stage != rank or getattr(stage_module, "num_stages", pp) != pp:
        raise ValueError(f"generate: pipeline rank {rank} of {pp} needs stage {rank} of {pp}, got stage "
                         f"{stage} of {getattr(stage_module, 'num_stages', '?')}")
    batch, s0 = prompt.shape
    m = min(pp, batch) if num_microbatches is None else num_microbatches
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= batch:
        raise ValueError(f"generate: num_microbatches must be an int in 1..{batch} (the batch), got {m!r}")
    if rank == pp - 1 and not sampling.greedy:
        _vocab(stage_module)  # the last stage holds the head
    rows = [r.tolist() for r in torch.arange(batch).tensor_split(m)]
    pad = None if pad is None else pad.to(mesh.device)
    return rows, _Stage(stage_module, rows, s0 + max_new_tokens, pad), sampling, pad


def _generate(stage_module, prompt, max_new_tokens, mesh, num_microbatches, sampling, ends, timeout,
              on_token, check_board: ErrorBoard) -> Tensor:
    pp, rank = mesh.pp, mesh.pp_rank
    who = f"pipeline rank {rank} (global rank {mesh.rank})"
    names = ("prompt", "attention_mask", "max_new_tokens", "num_microbatches", "temperature", "seed", "top_k",
             "top_p", "eos_token_id", "pad_token_id", "timeout")
    refusal, settings, agree_timeout = None, {name: (0, "") for name in names}, AGREE_TIMEOUT_S
    try:
        rows, st, smp, pad = _check_arguments(stage_module, prompt, max_new_tokens, mesh, num_microbatches,
                                              sampling, ends, timeout)
        given = (prompt, ends["attention_mask"], max_new_tokens, len(rows), float(smp.temperature), smp.seed,
                 smp.top_k, smp.top_p, ends["eos_token_id"], ends["pad_token_id"], float(timeout))
        settings = {name: (setting(v), "" if name in ("prompt", "attention_mask") else repr(v))
                    for name, v in zip(names, given)}
        agree_timeout = timeout
    except Exception as e:  # bad arguments, or a stage that cannot decode: every rank hears of it
        refusal = e
    agree(mesh, ("pp", "tp"), check_board, refusal, settings, agree_timeout, who, "generate")  # raises on any refusal
    # then the ring: from here on a failure is posted on its board, so every rank stops
    from tandem import _C

    link, board = None, check_board
    try:
        if pp > 1:
            link, board = _ring(mesh, timeout, who)
        with _C._WaitWatch(board._impl, float(timeout)):  # TP waits, too, stop on a posted failure
            return _decode(stage_module, st, rows, prompt, max_new_tokens, mesh, smp, ends, timeout,
                           on_token, link, board, who)
    except BaseException as e:  # the mesh is aborted too (its ring with it): every rank hears of it
        error = fail_every_rank(e, f"stage {rank} ({who}) failed in generate", board, mesh)
        if error is e:
            raise
        raise error from e


def _decode(stage_module, st, rows, prompt, max_new_tokens, mesh, sampling, ends, timeout, on_token,
            link, board, who) -> Tensor:
    """The decoding loop, once the ranks agreed: up to ``max_new_tokens`` steps of every
    request group through this rank's stage; every rank returns the tokens [B, s0 + new]."""
    from tandem.models.gpt import EndOfSequence

    pp, rank = mesh.pp, mesh.pp_rank
    batch, s0 = prompt.shape
    first, last = rank == 0, rank == pp - 1
    device = mesh.device
    prompt = prompt.to(device=device, dtype=torch.int64)
    out = torch.zeros(batch, s0 + max_new_tokens, dtype=torch.int64, device=device)
    out[:, :s0] = prompt
    stop = EndOfSequence(ends["eos_token_id"], ends["pad_token_id"], batch, device)
    steps = max_new_tokens  # decoded steps, known on the last stage (every row ended: fewer)
    tokens: dict = {}  # (t, i) -> [b_i] next tokens, when pp == 1
    vocab = _vocab(stage_module) if last and not sampling.greedy else None
    tp_comm = st.tp.comm if st.tp is not None else None
    tp_rank = st.tp.rank if st.tp is not None else 0
    for t in range(max_new_tokens):
        offset = 0 if t == 0 else s0 + t - 1
        if link is not None and not first:  # post this step's receives early
            for i, r in enumerate(rows):
                link.post_recv(("h", t, i), forward=True, what=f"hidden states of group {i}, step {t}")
        noise = None
        if vocab is not None and not sampling.filtered:
            noise = gumbel(sampling.seed, t, batch, vocab, device)
        for i, r in enumerate(rows):
            if first:
                if t == 0:
                    x = prompt[r]
                elif link is None:
                    x = tokens.pop((t - 1, i))[:, None]
                else:
                    x = link.take(("tok", t - 1, i))[:, None]
            else:
                x = link.take(("h", t, i))
            y = st.run(x, i, offset)
            if not last:
                link.send(y, forward=True, what=f"hidden states of group {i}, step {t}")
                if first and t + 1 < max_new_tokens:
                    link.post_recv(("tok", t, i), forward=True, what=f"tokens of group {i}, step {t}")
                continue
            scores = y[:, -1].float()  # (b_i, V/tp): the last position
            if sampling.filtered:  # top-k / top-p need the row's whole vocabulary
                from tandem.nn import _collectives as C

                full = C.gather_from_tp(scores, tp_comm, dim=-1)  # (b_i, V/tp) -> (b_i, V)
                tok = pick(full, sampling, t, rows=torch.tensor(r, device=device), batch=batch)
            else:
                if noise is not None:
                    cols = scores.shape[-1]
                    scores = scores / sampling.temperature + noise[r, tp_rank * cols:(tp_rank + 1) * cols]
                tok = sharded_argmax(scores, tp_comm, tp_rank)
            tok = stop.apply(tok, r)
            out[r, s0 + t] = tok
            if on_token is not None:
                on_token(r, tok)
            if t + 1 < max_new_tokens:
                if link is None:
                    tokens[(t, i)] = tok
                elif not first:
                    link.send(tok, forward=True, what=f"tokens of group {i}, step {t}")
        if last and stop.all_done and steps == max_new_tokens:
            steps = t + 1
            if link is None:  # one stage: nothing else waits for the remaining steps
                break
    length = torch.tensor([steps], dtype=torch.int64, device=device)
    if link is not None:
        link.finish()
        # every rank returns the tokens: the last stage has them all, the others add zeros
        if not last:
            out.zero_()
            length.zero_()
        wait(mesh.pp_comm.all_reduce(out), f"{who}: output all-reduce", board, timeout)
        wait(mesh.pp_comm.all_reduce(length), f"{who}: output length all-reduce", board, timeout)
    return out[:, :s0 + int(length)]


def _ring(mesh, timeout: float, who: str):
    """The StageLink ring of ``mesh``'s pipeline group for generation, built once (collective
    over the group: every pipeline rank calls generate) and kept on the mesh: hidden states go
    to the next rank, the last rank's tokens wrap around to rank 0."""
    cached = mesh._comms.get("generate_ring")
    if cached is not None and cached.timeout == timeout:
        return cached.link, cached.board
    _drop_ring(mesh)
    rank, pp = mesh.pp_rank, mesh.pp
    board = ErrorBoard(mesh.board_key("generate-ring", per_replica=True))
    try:
        link = StageTraffic(mesh.pp_comm, (rank - 1) % pp, (rank + 1) % pp, board=board, timeout=timeout,
                            shapes="dynamic", who=who)
    except RuntimeError as e:  # the peers wait for this rank's end of the ring: tell them
        message = f"{who}: building generate's StageLink ring failed: {e}"
        board.post(message)
        raise PipelineError(message) from e
    mesh._comms["generate_ring"] = _Ring(timeout, link, board)
    return link, board


class _Ring:
    """generate's ring, kept on the mesh between calls (aborted with the mesh)."""

    def __init__(self, timeout: float, link: StageTraffic, board: ErrorBoard):
        self.timeout, self.link, self.board = timeout, link, board

    def abort(self) -> None:
        self.link.link.abort()

    def synchronize(self, timeout: float) -> None:
        self.link.link.synchronize(timeout)


def _drop_ring(mesh) -> None:
    cached = mesh._comms.pop("generate_ring", None)
    if cached is not None:
        cached.abort()


def _vocab(module: nn.Module) -> int:
    from tandem.models.gpt import GPTHead

    for layer in getattr(module, "layers", {}).values():
        if isinstance(layer, GPTHead):
            return layer.config.vocab_size
    raise ValueError("generate: the last stage holds no GPTHead")
