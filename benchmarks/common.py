"""Shared helpers for tandem's microbenchmarks.

- timing: median of repeats after warm-up (CUDA events on a GPU, perf_counter on a CPU)
- random inputs (never time on zeros) and a #wrong count against a reference
- an nccl-tests-style report: `#` header lines with versions and settings, fixed-width rows
- JSON output for machines (`--json PATH`)
- bus-bandwidth factors of collectives, as nccl-tests defines them

A benchmark script imports this module as `common` (its directory is on sys.path when the
script runs as `python benchmarks/bench_x.py`).
"""

import argparse
import datetime
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = [
    "DTYPES",
    "Column",
    "Table",
    "Timing",
    "add_common_args",
    "algbw_gbps",
    "benchmark",
    "busbw_factor",
    "busbw_gbps",
    "count_wrong",
    "environment",
    "print_header",
    "random_tensor",
    "resolve_device",
    "synchronize",
    "target_line",
    "report",
    "tflops",
    "write_json",
]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


# ---------------------------------------------------------------------------------------
# command line and devices

def add_common_args(parser: argparse.ArgumentParser, *, warmup: Optional[int], iters: Optional[int]) -> None:
    """--device, --dtype, --warmup, --iters, --seed, --json. A default of None (and --dtype
    always) leaves the choice to the script, e.g. per device or mode."""
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="element type")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed runs first (default {warmup})")
    parser.add_argument("--iters", type=int, default=iters, help=f"timed runs; the median is reported (default {iters})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")


def resolve_device(name: Optional[str]) -> torch.device:
    """The device to run on; exits with a clear message when CUDA is asked for but absent."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: torch sees no CUDA GPU (torch.version.cuda={torch.version.cuda})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"--device {name}: only cuda and cpu are supported")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------
# timing

@dataclass(frozen=True)
class Timing:
    """Per-repeat times of one measured callable, in milliseconds."""

    times_ms: tuple

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)


def benchmark(fn: Callable[[], Any], *, device: torch.device, warmup: int, iters: int) -> Timing:
    """Run fn `warmup` times untimed, then time each of `iters` runs.

    On CUDA each run sits between two CUDA events (GPU time, one synchronisation at the
    end); on CPU each run is timed with perf_counter.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return Timing(tuple(s.elapsed_time(e) for s, e in zip(starts, ends)))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(tuple(times))


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    """Throughput in TFLOP/s of `flops` floating-point operations done in `ms` milliseconds."""
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------------------
# inputs and checking

def random_tensor(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device,
                  generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Normal(0, scale^2) values: timing on zeros would flatter some kernels."""
    t = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return (t * scale).to(dtype)


def count_wrong(got: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype, reduction: int = 1) -> int:
    """How many elements of `got` differ from the high-precision `ref` by more than the
    rounding of `dtype` allows.

    An element is wrong when |got - ref| > 4 eps |ref| + (4 eps + 2 sqrt(reduction) eps_acc) rms(ref),
    where eps is the unit roundoff of `dtype`, eps_acc that of the accumulation type
    (float32, or float64 for float64 data) and `reduction` the length of the sums that made
    each element (K for a GEMM, the world size for an all-reduce). NaN or inf counts as wrong.
    A real fault (a wrong operand, bias, activation or offset) is off by O(rms) almost everywhere.
    """
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} differs from reference shape {tuple(ref.shape)}")
    ref = ref.double()
    err = (got.double() - ref).abs()
    eps = torch.finfo(dtype).eps
    eps_acc = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    rms = ref.pow(2).mean().sqrt().item() if ref.numel() else 0.0
    tol = 4 * eps * ref.abs() + (4 * eps + 2 * math.sqrt(reduction) * eps_acc) * rms
    return int((~(err <= tol)).sum().item())


# ---------------------------------------------------------------------------------------
# environment header

def _nccl_version() -> Optional[str]:
    try:
        return ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:  # CPU-only torch has no NCCL
        return None


def _tandem_build() -> str:
    try:
        import tandem
    except Exception as e:  # report, do not hide: the benchmark may still run its peers
        return f"not importable ({type(e).__name__}: {e})"
    info = tandem.build_info()
    parts = [tandem.__version__, f"cuda={info.get('cuda')}"]
    for key in ("cuda_archs", "cuda_version", "cublaslt_version", "nccl_version", "torch_version"):
        if info.get(key) is not None:
            parts.append(f"{key}={info[key]}")
    return " ".join(parts)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
    return f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device, *, dtype: torch.dtype, warmup: int, iters: int,
                world_size: int = 1, **extra: Any) -> dict:
    """Versions and settings for the `#` header and the JSON record."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": _nccl_version(),
        "tandem": _tandem_build(),
        "device": device_name(device),
        "world_size": world_size,
        "dtype": str(dtype).replace("torch.", ""),
        "warmup": warmup,
        "iters": iters,
    }
    env.update(extra)
    return env


def print_header(title: str, env: dict, file=None) -> None:
    file = file or sys.stdout
    print(f"# {title}", file=file)
    for key, value in env.items():
        print(f"# {key:<12}: {value}", file=file)
    print("#", file=file, flush=True)


# ---------------------------------------------------------------------------------------
# fixed-width table

@dataclass(frozen=True)
class Column:
    """One column: a name, a unit line below it, a width and a format for floats."""

    name: str
    unit: str = ""
    width: int = 10
    fmt: str = ".3f"


class Table:
    """nccl-tests-style rows: `#` lines with names and units, then right-aligned cells.

    Missing values (None, NaN) print as "n/a"; a header line starts with "#" and a row with
    a space, so columns line up.
    """

    def __init__(self, columns: Sequence[Column]):
        self.columns = list(columns)

    def _line(self, cells: Sequence[str], lead: str) -> str:
        return lead + " ".join(c.rjust(col.width) for c, col in zip(cells, self.columns))

    def header(self) -> str:
        names = self._line([c.name for c in self.columns], "#")
        units = self._line([c.unit for c in self.columns], "#")
        return names + "\n" + units.rstrip() if any(c.unit for c in self.columns) else names

    def row(self, values: Sequence[Any]) -> str:
        if len(values) != len(self.columns):
            raise ValueError(f"{len(values)} values for {len(self.columns)} columns")
        return self._line([self._cell(v, c) for v, c in zip(values, self.columns)], " ")

    @staticmethod
    def _cell(value: Any, col: Column) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "n/a"
        if isinstance(value, float):
            return format(value, col.fmt)
        return str(value)


# ---------------------------------------------------------------------------------------
# targets and JSON

def target_line(description: str, value: Optional[float], target: float, unit: str = "x") -> dict:
    """A PASS/MISS verdict for `value >= target` (None: not measured, counts as a MISS)."""
    ok = value is not None and value >= target
    shown = "n/a" if value is None else f"{value:.3f}{unit}"
    return {"description": description, "value": value, "target": target, "pass": ok,
            "line": f"# {'PASS' if ok else 'MISS'}  {description}: {shown} (target >= {target:.2f}{unit})"}


def report(name: str, args, env: dict, results: list, targets: list, *, rank: int,
           wrong: Optional[int] = None, notes: tuple = (), **extra: Any) -> None:
    """The end of a benchmark: on rank 0, ``notes``, the targets' PASS/MISS lines and (when
    ``wrong`` is counted) the row count with the wrong values; with ``--json`` the record."""
    for t in targets:
        t.setdefault("key", t["description"])
    if rank != 0:
        return
    for note in notes:
        print(note)
    for t in targets:
        print(t["line"], flush=True)
    if wrong is not None:
        print(f"# {len(results)} rows, {wrong} wrong values", flush=True)
        extra["wrong"] = wrong
    if args.json:
        write_json(args.json, benchmark_name=name, env=env, results=results, targets=targets, **extra)


def _finite(obj: Any) -> Any:
    """NaN/inf become None so the JSON stays strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, *, benchmark_name: str, env: dict, results: list, **extra: Any) -> None:
    """{"benchmark", "env", "results", ...extra} as strict JSON (no NaN)."""
    record = _finite({"benchmark": benchmark_name, "env": env, "results": results, **extra})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, allow_nan=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------
# collectives: bandwidths as nccl-tests reports them (see its PERFORMANCE.md)

_BUSBW = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
    "send_recv": lambda n: 1.0,
}


def busbw_factor(collective: str, world_size: int) -> float:
    """busbw = algbw x factor: 2(n-1)/n for all_reduce, (n-1)/n for all_gather,
    reduce_scatter and all_to_all, 1 for send_recv, broadcast and reduce."""
    if collective not in _BUSBW:
        raise ValueError(f"unknown collective {collective!r}; known: {sorted(_BUSBW)}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return _BUSBW[collective](world_size)


def algbw_gbps(nbytes: int, ms: float) -> float:
    """Algorithm bandwidth in GB/s (1e9 bytes/s): the buffer size over the time."""
    return nbytes / (ms * 1e-3) / 1e9


def busbw_gbps(collective: str, nbytes: int, ms: float, world_size: int) -> float:
    return algbw_gbps(nbytes, ms) * busbw_factor(collective, world_size)
