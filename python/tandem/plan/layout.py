"""Layout: one way to run a model on N GPUs, and the rules that decide whether it can run.

A layout fixes the tensor-, pipeline- and data-parallel degrees, the microbatch size, the
schedule, recomputation, sequence parallelism and the distributed optimizer. It prints as
``tp=8,pp=2,dp=32,mb=2,schedule=interleaved:v=5,recompute=full`` and parses back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Layout", "SCHEDULES", "RECOMPUTE", "layout_problems", "build_schedule", "stage_blocks"]

SCHEDULES = ("1f1b", "interleaved", "zb-h1", "gpipe")
RECOMPUTE = ("none", "selective", "full")
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One parallel layout (see the module docstring)."""

    tp: int = 1
    """tensor-parallel degree"""
    pp: int = 1
    """pipeline ranks"""
    dp: int = 1
    """data-parallel replicas"""
    microbatch: int = 1
    """sequences per microbatch"""
    schedule: str = "1f1b"
    """pipeline schedule: 1f1b, interleaved, zb-h1 or gpipe"""
    virtual_stages: int = 1
    """model chunks per pipeline rank (interleaved only)"""
    recompute: str = "none"
    """activation recomputation: none, selective or full"""
    sequence_parallel: bool = False
    """shard the LayerNorm/residual regions over tp"""
    distributed_optimizer: bool = False
    """optimizer states (and fp32 master weights) sharded over dp (ZeRO-1)"""

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "microbatch", "virtual_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout: {name} must be an int >= 1, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Layout: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"Layout: recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ValueError(f"Layout: virtual_stages={self.virtual_stages} needs schedule='interleaved', "
                             f"got {self.schedule!r}")
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            object.__setattr__(self, "virtual_stages", 2)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def num_microbatches(self, global_batch: int) -> int:
        return global_batch // (self.dp * self.microbatch)

    def schedule_name(self) -> str:
        return f"interleaved:v={self.virtual_stages}" if self.schedule == "interleaved" else self.schedule

    def __str__(self) -> str:
        parts = [f"tp={self.tp}", f"pp={self.pp}", f"dp={self.dp}", f"mb={self.microbatch}",
                 f"schedule={self.schedule_name()}", f"recompute={self.recompute}"]
        if self.sequence_parallel:
            parts.append("sp=1")
        if self.distributed_optimizer:
            parts.append("dopt=1")
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """Read ``tp=8,pp=2,dp=32,mb=2,schedule=interleaved:v=5,recompute=full,sp=1,dopt=1``
        (any subset; ``v=5`` may also stand alone)."""
        fields: dict = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep:
                raise ValueError(f"layout {text!r}: {item!r} is not key=value")
            if key in ("tp", "pp", "dp", "mb", "microbatch", "v", "virtual_stages"):
                try:
                    number = int(value)
                except ValueError:
                    raise ValueError(f"layout {text!r}: {key}={value!r} is not an integer") from None
                fields[{"mb": "microbatch", "v": "virtual_stages"}.get(key, key)] = number
            elif key == "schedule":
                name, _, rest = value.partition(":")
                fields["schedule"] = name.strip().lower()
                if rest:
                    k, _, v = rest.partition("=")
                    if k.strip() != "v" or not v.strip().isdigit():
                        raise ValueError(f"layout {text!r}: schedule option {rest!r} must be v=<int>")
                    fields["virtual_stages"] = int(v)
            elif key == "recompute":
                fields["recompute"] = value.strip().lower()
            elif key in ("sp", "sequence_parallel", "dopt", "distributed_optimizer"):
                flag = value.strip().lower()
                if flag not in _TRUE + _FALSE:
                    raise ValueError(f"layout {text!r}: {key}={value!r} must be 1/0, true/false or on/off")
                fields["sequence_parallel" if key.startswith("s") else "distributed_optimizer"] = flag in _TRUE
            else:
                raise ValueError(f"layout {text!r}: unknown key {key!r} (tp, pp, dp, mb, schedule, v, "
                                 "recompute, sp, dopt)")
        return cls(**fields)

    def with_(self, **changes) -> "Layout":
        return replace(self, **changes)


def stage_blocks(num_layers: int, num_stages: int) -> list[int]:
    """Transformer blocks per (virtual) stage: as even as possible; the first and the last
    stage, which also hold the embedding and the head, get the smaller counts."""
    base, extra = divmod(num_layers, num_stages)
    counts = [base] * num_stages
    inner = [s for s in range(num_stages) if 0 < s < num_stages - 1] or list(range(num_stages))
    for s in inner[:extra]:
        counts[s] += 1
    for s in range(extra - len(inner[:extra])):
        counts[s] += 1
    return counts


def build_schedule(layout: Layout, num_microbatches: int):
    """The tandem.pipeline Schedule of ``layout`` (pp = 1: one stage, 1F1B over the
    microbatches, which is plain gradient accumulation)."""
    from tandem.pipeline.schedules import schedule_by_name

    return schedule_by_name(layout.schedule, layout.pp, num_microbatches, virtual_stages=layout.virtual_stages)


def layout_problems(layout: Layout, model, *, num_gpus: int, gpus_per_node: int, global_batch: int,
                    seq_len: int, framework, tp_across_nodes: bool = False) -> list[str]:
    """Why ``layout`` cannot run (empty: it can): the GPU count, divisibility of the model's
    sizes, the batch, and the schedules' rules on microbatches."""
    why = []
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    if layout.gpus != num_gpus:
        why.append(f"tp*pp*dp = {tp}*{pp}*{dp} = {layout.gpus} is not the {num_gpus} GPUs")
    if not tp_across_nodes and tp > gpus_per_node:
        why.append(f"tp={tp} spans nodes of {gpus_per_node} GPUs (its all-reduces would leave NVLink)")
    if not tp_across_nodes and tp <= gpus_per_node and gpus_per_node % tp:
        why.append(f"tp={tp} does not divide the {gpus_per_node} GPUs of a node")
    for name in ("num_heads", "ffn_hidden_size", "vocab_size"):
        if getattr(model, name) % tp:
            why.append(f"{name}={getattr(model, name)} is not divisible by tp={tp}")
    g = model.num_kv_heads
    if g % tp and tp % g:
        why.append(f"num_kv_heads={g} neither divides tp={tp} nor is a multiple of it")
    if layout.sequence_parallel and tp == 1:
        why.append("sequence parallelism needs tp > 1")
    if layout.sequence_parallel and seq_len % tp:
        why.append(f"sequence parallelism needs seq_len={seq_len} divisible by tp={tp}")
    if seq_len > model.max_seq_len and model.position == "learned":
        why.append(f"seq_len={seq_len} exceeds the {model.max_seq_len} learned positions")
    if global_batch % (dp * layout.microbatch):
        why.append(f"global batch {global_batch} is not divisible by dp*mb = {dp}*{layout.microbatch}")
        return why
    m = layout.num_microbatches(global_batch)
    S = layout.num_stages
    if S > model.num_layers:
        why.append(f"{S} stages (pp*v = {pp}*{layout.virtual_stages}) exceed the {model.num_layers} blocks")
    if framework.name != "tandem" and model.num_layers % S:
        why.append(f"{framework.name} needs the {model.num_layers} blocks divisible by pp*v = {S}")
    if layout.schedule == "interleaved" and model.num_layers % S:
        why.append(f"interleaved: the {model.num_layers} blocks are not divisible by pp*v = {S}")
    if pp > 1 and m < pp:
        why.append(f"{m} microbatches < pp={pp}: the pipeline never fills "
                   f"({layout.schedule} needs num_microbatches >= pp)")
    if layout.schedule == "interleaved" and pp > 1 and m % pp:
        why.append(f"interleaved: {m} microbatches are not a multiple of pp={pp}")
    if layout.schedule != "1f1b" and pp == 1:
        why.append(f"schedule {layout.schedule} needs pp > 1")
    if layout.distributed_optimizer and dp == 1:
        why.append("the distributed optimizer needs dp > 1")
    for what, on, has in (("sequence parallelism", layout.sequence_parallel, framework.sequence_parallel),
                          ("the distributed optimizer", layout.distributed_optimizer, framework.distributed_optimizer)):
        if on and not has:
            why.append(f"{framework.name} has no {what}")
    if layout.recompute not in framework.recompute:
        why.append(f"{framework.name} has no {layout.recompute} recomputation (it has {', '.join(framework.recompute)})")
    if pp > 1 and layout.schedule not in framework.schedules:
        why.append(f"{framework.name} has no {layout.schedule} schedule")
    return why
