"""Partitioning: cut a list of layers into contiguous pipeline stages.

``split(layers, num_stages, balance=...)`` gives the ``StageModule`` of one stage; the
embedding and the LM head count as layers (``GPT.layers()`` is ``[embed, *blocks, head]``).
Balances:

- ``"params"``: stages with about equal numbers of parameters (a tied LM head counts the
  weight it multiplies by);
- ``"uniform"``: about equal numbers of layers;
- ``"time"``: about equal measured forward + backward time (needs ``sample_input``);
- ``[n0, n1, ...]``: exactly n_s layers in stage s.

"About equal" means the contiguous cut that minimises the largest stage (ties: the cut
whose stages come earliest). Uneven splits are allowed and reported in ``Partition``.

Tied input/output embeddings (a ``GPTHead`` whose ``tied_source()`` is a layer of another
stage) keep one logical weight: the head's stage holds its own copy, initialised equal,
and the runtime sums the two gradients between the two stages every step
(``StageModule.tied``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["split", "partition", "Partition", "StageModule", "TiedWeight"]


@dataclass(frozen=True)
class Partition:
    """How layers were cut: ``bounds[s] = (first, end)`` layer indices of stage s."""

    bounds: tuple[tuple[int, int], ...]
    layer_names: tuple[str, ...]
    costs: tuple[float, ...]
    params: tuple[int, ...]
    balance: str

    @property
    def num_stages(self) -> int:
        return len(self.bounds)

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        return tuple(end - first for first, end in self.bounds)

    @property
    def params_per_stage(self) -> tuple[int, ...]:
        return tuple(sum(self.params[first:end]) for first, end in self.bounds)

    @property
    def cost_per_stage(self) -> tuple[float, ...]:
        return tuple(sum(self.costs[first:end]) for first, end in self.bounds)

    def stage_of(self, layer: int) -> int:
        for s, (first, end) in enumerate(self.bounds):
            if first <= layer < end:
                return s
        raise ValueError(f"layer {layer} is out of range 0..{self.bounds[-1][1] - 1}")

    def __str__(self) -> str:
        lines = [f"partition of {self.bounds[-1][1]} layers into {self.num_stages} stages "
                 f"(balance={self.balance}):",
                 f"  {'stage':>5}  {'layers':>9}  {'#':>3}  {'params':>12}  {'cost':>10}  names"]
        for s, (first, end) in enumerate(self.bounds):
            names = ", ".join(self.layer_names[first:end])
            lines.append(f"  {s:>5}  {f'{first}..{end - 1}':>9}  {end - first:>3}  "
                         f"{self.params_per_stage[s]:>12,}  {self.cost_per_stage[s]:>10.4g}  {names}")
        return "\n".join(lines)


class TiedWeight(nn.Module):
    """A stage's own copy of a weight tied to a layer of another stage."""

    def __init__(self, source: Tensor):
        super().__init__()
        self.weight = nn.Parameter(source.detach().clone(), requires_grad=source.requires_grad)
        # what optimizers, clipping and checkpoints need to know: a copy (its gradient and
        # norm count once, with the source's), of which weight, sharded over tp like it
        self.weight._tandem_tied_copy = True
        self.weight._tandem_tied_source = (source,)  # a tuple: not registered as a parameter
        if getattr(source, "tp_shard_dim", None) is not None:
            self.weight.tp_shard_dim = source.tp_shard_dim


class StageModule(nn.Module):
    """The layers of one pipeline stage, run in order: ``x = layer(x)``.

    ``layers`` is a ModuleDict keyed by the global layer index ("0", "3", ...), so parameter
    names are unique across stages (``layers.3.attn.q_proj.weight``). ``tied`` maps a name
    to ``(parameter, other stage)`` for each weight whose gradient is summed with the same
    weight on the other stage every step.
    """

    def __init__(self, stage: int, num_stages: int, layers: dict, partition: Partition):
        super().__init__()
        self.stage, self.num_stages, self.partition = stage, num_stages, partition
        self.layers = nn.ModuleDict(layers)
        self.tied_copies = nn.ModuleDict()
        self.tied: dict[str, tuple[nn.Parameter, int]] = {}

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def layer_indices(self) -> list[int]:
        return [int(k) for k in self.layers]

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        return f"stage {self.stage} of {self.num_stages}, layers {self.layer_indices}"


def _tied_source(layer: nn.Module) -> Optional[nn.Module]:
    get = getattr(layer, "tied_source", None)
    return get() if callable(get) else None


def _param_count(layer: nn.Module) -> int:
    n = sum(p.numel() for p in layer.parameters())
    source = _tied_source(layer)
    return n + (source.weight.numel() if source is not None else 0)


def _measure_times(layers: Sequence[nn.Module], sample_input, repeats: int) -> list[float]:
    """Median forward + backward seconds of each layer, fed the previous layer's output."""
    times = [[] for _ in layers]
    for _ in range(repeats + 1):  # the first round warms up
        x = sample_input
        for i, layer in enumerate(layers):
            if isinstance(x, Tensor) and x.is_floating_point():
                x = x.detach().requires_grad_(True)
            t0 = time.perf_counter()
            y = layer(x)
            grad = torch.ones_like(y) if y.is_floating_point() else None
            params = [p for p in layer.parameters() if p.requires_grad]
            inputs = params + ([x] if x.requires_grad else [])
            if grad is not None and inputs:
                torch.autograd.grad(y, inputs, grad, allow_unused=True)
            if y.is_cuda:
                torch.cuda.synchronize(y.device)
            times[i].append(time.perf_counter() - t0)
            x = y.detach()
    return [statistics.median(t[1:]) for t in times]


def _agree(costs: list[float]) -> list[float]:
    """Average measured costs over all ranks, so every rank cuts the same way."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return costs
    # NCCL reduces CUDA tensors only; gloo (and mixed "cpu:gloo,cuda:nccl") takes CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(costs, dtype=torch.float64, device=device)
    dist.all_reduce(t)  # (L,) summed over every rank
    return (t / dist.get_world_size()).tolist()


def _min_max_cut(costs: Sequence[float], num_stages: int) -> list[int]:
    """Layers per stage of the contiguous cut minimising the largest stage cost."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest max-stage cost of layers i..n-1 cut into k stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    first = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][n] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(n - k, -1, -1):
            for j in range(i + 1, n - k + 2):  # stage covers i..j-1, k-1 stages after
                value = max(prefix[j] - prefix[i], best[k - 1][j])
                if value < best[k][i] - 1e-12 * max(1.0, abs(value)):
                    best[k][i], first[k][i] = value, j
    sizes, i = [], 0
    for k in range(num_stages, 0, -1):
        j = first[k][i]
        sizes.append(j - i)
        i = j
    return sizes


def partition(layers: Sequence[nn.Module], num_stages: int, *, balance="params",
              sample_input=None, repeats: int = 3) -> Partition:
    """Cut ``layers`` into ``num_stages`` contiguous stages (see the module docstring).

    Raises ValueError for fewer layers than stages, an unknown balance, or a list of sizes
    that does not cover every layer exactly once. ``balance="time"`` runs every layer
    forward and backward on ``sample_input`` (the first layer's input) ``repeats + 1``
    times; when torch.distributed is initialised every rank must call it (the times are
    averaged over the ranks so that all cut alike).
    """
    layers = list(layers)
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"split: num_stages must be an int >= 1, got {num_stages!r}")
    bad = [i for i, layer in enumerate(layers) if not isinstance(layer, nn.Module)]
    if bad:
        raise TypeError(f"split: layers must be nn.Modules; items {bad} are not")
    if len(layers) < num_stages:
        raise ValueError(f"split: {len(layers)} layers cannot fill {num_stages} stages "
                         "(every stage needs at least one layer)")
    params = [_param_count(layer) for layer in layers]
    names = tuple(type(layer).__name__ for layer in layers)
    if isinstance(balance, str):
        if balance == "params":
            costs = [float(p) for p in params]
        elif balance == "uniform":
            costs = [1.0] * len(layers)
        elif balance == "time":
            if sample_input is None:
                raise ValueError('split: balance="time" needs sample_input (an input of the '
                                 'first layer) to time the layers')
            if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
                raise ValueError(f"split: repeats must be an int >= 1, got {repeats!r}")
            costs = _agree(_measure_times(layers, sample_input, repeats))
        else:
            raise ValueError(f'split: balance must be "params", "uniform", "time" or a list of '
                             f"layers per stage, got {balance!r}")
        sizes = _min_max_cut(costs, num_stages)
        label = balance
    else:
        sizes = list(balance)
        if len(sizes) != num_stages or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                           for n in sizes):
            raise ValueError(f"split: balance as a list needs {num_stages} ints >= 1 (layers "
                             f"per stage), got {sizes}")
        if sum(sizes) != len(layers):
            raise ValueError(f"split: balance {sizes} covers {sum(sizes)} layers, but there are "
                             f"{len(layers)}; every layer must be in exactly one stage")
        costs, label = [float(p) for p in params], f"list {sizes}"
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return Partition(tuple(bounds), names, tuple(costs), tuple(params), label)


def split(layers: Sequence[nn.Module], num_stages: int, *, balance="params",
          stage: Optional[int] = None, mesh=None, sample_input=None) -> StageModule:
    """The ``StageModule`` of stage ``stage`` (default: this rank's pipeline stage,
    ``mesh.pp_rank``, which needs ``num_stages == mesh.pp``); its ``partition`` is the report.

    ``balance`` may also be a ``Partition`` (from ``partition`` or another stage's
    ``.partition``), to cut several stages alike without measuring again. The stage shares
    the given layer objects (no copy). A tied head whose source layer is in another stage
    gets its own copy of the weight (``StageModule.tied``).
    """
    layers = list(layers)
    if isinstance(balance, Partition):
        if balance.bounds[-1][1] != len(layers) or balance.num_stages != num_stages:
            raise ValueError(f"split: the given Partition cuts {balance.bounds[-1][1]} layers into "
                             f"{balance.num_stages} stages, not {len(layers)} into {num_stages}")
        part = balance
    else:
        part = partition(layers, num_stages, balance=balance, sample_input=sample_input)
    if stage is None:
        from tandem.mesh import get_mesh

        mesh = mesh if mesh is not None else get_mesh()
        pp = mesh.pp if mesh is not None else 1
        if num_stages != pp:
            raise ValueError(f"split: stage=None picks this rank's stage, which needs num_stages "
                             f"== pp ({pp}); got num_stages={num_stages}. With virtual stages "
                             "pass stage= for each of this rank's stages "
                             "(schedule.layout.stages_of(pp_rank))")
        stage = mesh.pp_rank if mesh is not None else 0
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < num_stages:
        raise ValueError(f"split: stage must be an int in 0..{num_stages - 1}, got {stage!r}")
    first, end = part.bounds[stage]
    chosen = {str(i): layers[i] for i in range(first, end)}
    module = StageModule(stage, num_stages, {}, part)
    for i, layer in enumerate(layers):
        source = _tied_source(layer)
        if source is None:
            continue
        owner = next((j for j, other in enumerate(layers)
                      if other is source or any(m is source for m in other.modules())), None)
        if owner is None:
            raise ValueError(f"split: layer {i} ({type(layer).__name__}) is tied to a module "
                             "that is in none of the layers")
        src_stage, dst_stage = part.stage_of(owner), part.stage_of(i)
        if src_stage == dst_stage:
            continue
        if stage == dst_stage:
            copy = TiedWeight(source.weight)
            module.tied_copies[str(i)] = copy
            chosen[str(i)] = layer.with_tied_weight(copy)
            module.tied[f"tied_copies.{i}.weight"] = (copy.weight, src_stage)
        elif stage == src_stage:
            name = next(n for n, p in layers[owner].named_parameters() if p is source.weight)
            module.tied[f"layers.{owner}.{name}"] = (source.weight, dst_stage)
    module.layers.update(chosen)
    return module
