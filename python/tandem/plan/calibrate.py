"""`tandem plan --calibrate OUT.json`: measure this machine into a DeviceProfile.

``nproc`` ranks (gloo, a file store, one thread each, as `tandem train` runs them) measure,
as many at a time as the machine has cores (the others wait), so that every figure is what
one rank gets with a core to itself; how ranks beyond the cores slow each other down is
host.py's part:

- GEMM throughput (fp32) over a grid of shapes; ``gemm_overhead`` t0, the rate R and the
  shape constant d0 of gemm.py's curve t = t0 + 2MNK/R (1 + d0/M + d0/N + d0/K) are fitted
  by least squares on relative error (R becomes the peak, the efficiency 1);
- memory bandwidth: a large copy;
- the operator overhead: a tiny tandem GPT block's forward and backward, whose time is
  all per-operator cost, over its operator count (framework.py);
- the activation: tanh GeLU's forward per element (arithmetic-bound on a CPU);
- fused attention: ``scaled_dot_product_attention`` forward and backward at two sizes (a
  fixed cost and a rate);
- collectives: all-reduce of 4 B to 4 MB over pairs of ranks (as tp groups run) through
  tandem's Communicator, one pair at a time: the table itself (``pair_all_reduce``, which
  groups of 2 interpolate) and the alpha-beta model of collectives.py fitted to it (the
  latency from 4 B, the bandwidth by least squares on relative error) for larger groups.

On a CPU the result is a "cpu" profile for ``--precision fp32``; the same code on one GPU
per rank would time that GPU.
"""

from __future__ import annotations

import math
import os
import queue as queue_mod
import statistics
import tempfile
import time
from dataclasses import replace

from tandem.plan.profiles import DeviceProfile

__all__ = ["calibrate", "measure_rank", "profile_from_measurements", "fit_gemm_curve", "GEMM_GRID"]

GEMM_GRID = [(128, 128, 128), (512, 128, 128), (128, 512, 128), (128, 128, 512), (512, 512, 128),
             (512, 128, 512), (128, 512, 512), (512, 512, 512), (32, 512, 512), (512, 32, 512), (512, 512, 32)]
"""(M, N, K) timed: the sizes of the models a CPU trains, small and large in each dimension"""
_HALF_DIMS = [0, 2, 4, 8, 16, 32, 64, 128, 256]


def fit_gemm_curve(samples) -> tuple[float, float, float]:
    """(t0, rate, d0) minimising the squared relative error of t = t0 + F/rate (1 + d0 S)
    over ``samples`` of (M, N, K, seconds), S = 1/M + 1/N + 1/K, F = 2MNK."""
    best = None
    for d0 in _HALF_DIMS:
        # t = t0 + a * x with x = F (1 + d0 S); weighted by 1/t: minimise sum ((t0 + a x - t) / t)^2
        rows = [(1.0 / t, 2.0 * m * n * k * (1 + d0 * (1 / m + 1 / n + 1 / k)) / t, 1.0) for m, n, k, t in samples]
        s11 = sum(r[0] * r[0] for r in rows)
        s12 = sum(r[0] * r[1] for r in rows)
        s22 = sum(r[1] * r[1] for r in rows)
        b1 = sum(r[0] for r in rows)
        b2 = sum(r[1] for r in rows)
        det = s11 * s22 - s12 * s12
        t0, a = ((s22 * b1 - s12 * b2) / det, (s11 * b2 - s12 * b1) / det) if det else (0.0, b2 / s22)
        if t0 < 0:  # no negative launch cost: refit the slope alone
            t0, a = 0.0, b2 / s22
        if a <= 0:
            continue
        err = sum((t0 * r[0] + a * r[1] - 1.0) ** 2 for r in rows)
        if best is None or err < best[0]:
            best = (err, t0, 1.0 / a, float(d0))
    if best is None:
        raise ValueError("calibration: the GEMM timings fit no curve with a positive rate")
    return best[1], best[2], best[3]


def _time(fn, min_time: float = 0.01, repeats: int = 3) -> float:
    """Median seconds of one call, each sample long enough to time (local work only: the
    number of calls differs between ranks)."""
    fn()
    n, t = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - start
        if t >= min_time or n >= 1 << 12:
            break
        n *= 2
    samples = [t / n]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples)


def _time_fixed(fn, n: int, repeats: int = 3) -> float:
    """Median seconds of one call over ``repeats`` runs of ``n`` calls: the same count on
    every rank, as collectives need."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples)


def _local(quick: bool) -> dict:
    """What one rank measures on its own: GEMMs, a copy, a tiny block, attention."""
    import torch
    import torch.nn.functional as F

    out: dict = {}
    grid = GEMM_GRID[::2] if quick else GEMM_GRID
    gemms = []
    for m, n, k in grid:
        a, b = torch.randn(m, k), torch.randn(k, n)
        gemms.append((m, n, k, _time(lambda: a @ b)))
    out["gemm"] = gemms
    # memory bandwidth: a copy reads and writes every byte
    src = torch.randn(8 * 2**20)  # 32 MB
    dst = torch.empty_like(src)
    out["copy_bw"] = 2 * src.numel() * 4 / _time(lambda: dst.copy_(src))
    # per-operator overhead: a tiny block, whose time is all overhead
    from tandem.mesh import Mesh
    from tandem.models.gpt import GPTBlock, GPTConfig

    block = GPTBlock(GPTConfig(hidden_size=8, num_heads=2, max_seq_len=4), mesh=Mesh.single())
    x = torch.randn(1, 4, 8, requires_grad=True)

    def tiny():
        block(x).sum().backward()

    out["tiny_block"] = _time(tiny)
    # the activation's own pass (tanh GeLU, tandem's GPT's and GPT-2's): arithmetic-bound on a CPU
    act = torch.randn(256, 512)
    out["gelu_rate"] = act.numel() / _time(lambda: F.gelu(act, approximate="tanh"))
    # fused attention, forward and backward, at two sizes: a fixed cost and a rate
    out["attention"] = []
    for b, a, s_, hd in ((2, 2, 64, 32), (2, 4, 256, 32)):
        q, k, v = (torch.randn(b, a, s_, hd, requires_grad=True) for _ in range(3))

        def attention():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        out["attention"].append((4 * b * a * s_ * s_ * hd, _time(attention)))  # (forward FLOPs, fwd+bwd s)
    return out


def _measure(rank: int, world: int, quick: bool, cores: int | None = None) -> dict:
    """Every rank's measurements, taken ``cores`` ranks at a time (the others wait in a
    barrier), so that each is what a rank gets with a core to itself."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(rank)
    cores = max(1, min(world, cores or os.cpu_count() or 1))
    out: dict = {"cores": cores}
    for turn in range(-(-world // cores)):
        dist.barrier()
        if rank // cores == turn:
            out.update(_local(quick))
    # collectives over pairs of ranks (as tp groups), one pair at a time, through tandem's
    # Communicator (what the TP modules call): 4 B to 4 MB (a small model's activations: 32 KB-1 MB)
    from tandem.comm import Communicator

    pairs = [dist.new_group([r, r + 1]) for r in range(0, world - world % 2, 2)] if world > 1 else []
    for i, group in enumerate(pairs):
        dist.barrier()
        if rank // 2 == i:
            comm = Communicator(group, torch.device("cpu"), timeout=120)
            out["all_reduce"] = []
            for numel, calls in ((1, 20), (2**13, 10), (2**15, 10), (2**17, 6), (2**20, 4)):
                t = torch.zeros(numel)
                out["all_reduce"].append((numel * 4, _time_fixed(lambda: comm.all_reduce(t).wait(), calls)))
    if pairs:
        out.update(_sharing(rank, world, cores, pairs[rank // 2] if rank // 2 < len(pairs) else None, quick))
    dist.barrier()
    return out


SHARING_BLOCK = dict(hidden_size=256, num_heads=4, ffn_hidden_size=1024, max_seq_len=64)
SHARING_BATCH = 2
"""the tp=2 block (and its batch) whose forward and backward time how ranks beyond the cores
slow each other, and how the component model's sum compares with a whole block"""


def _sharing(rank: int, world: int, cores: int, group, quick: bool) -> dict:
    """Seconds of forward+backward passes of a tp=2 GPT block (tandem's TP modules on the
    pair's group), in rounds (a shared machine's speed drifts between rounds, little within
    one): every pair alone in turn, then, with more ranks than cores, all pairs at once.
    ``rounds``: [(alone seconds, together seconds), ...] of this rank."""
    import torch
    import torch.distributed as dist

    from tandem.mesh import Mesh
    from tandem.models.gpt import GPTBlock, GPTConfig

    rounds, reps = (4, 5) if quick else (8, 5)
    block = x = None
    if group is not None:
        mesh = Mesh(tp=2, pp=1, dp=1, rank=rank % 2, device=torch.device("cpu"), tp_group=group, timeout=120)
        block = GPTBlock(GPTConfig(**SHARING_BLOCK), mesh=mesh)
        x = torch.randn(SHARING_BATCH, SHARING_BLOCK["max_seq_len"], SHARING_BLOCK["hidden_size"], requires_grad=True)

    def passes() -> list[float]:
        times = []
        for i in range(reps + 1):  # the first warms up
            start = time.perf_counter()
            block(x).sum().backward()
            if i:
                times.append(time.perf_counter() - start)
        return times

    out = []
    for _ in range(rounds):
        alone, together = [], []
        for turn in range(world // 2):
            dist.barrier()
            if group is not None and rank // 2 == turn:
                alone = passes()
        dist.barrier()
        if world > cores and group is not None:
            together = passes()
        out.append((alone, together))
    return {"sharing": out} if group is not None else {}


def _entry(rank, world, init_file, quick, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        results.put((rank, "ok", _measure(rank, world, quick)))
    except BaseException as e:  # report everything to the parent
        results.put((rank, "error", f"{type(e).__name__}: {e}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_ranks(nproc: int, quick: bool, timeout: float) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(r, nproc, init_file, quick, results), daemon=True)
                 for r in range(nproc)]
        for p in procs:
            p.start()
        got, deadline = {}, time.monotonic() + timeout
        try:
            while len(got) < nproc:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(nproc)) - set(got))
                    raise TimeoutError(f"calibration: ranks {missing} did not finish within {timeout:.0f} s")
                try:
                    rank, status, payload = results.get(timeout=min(left, 1.0))
                except queue_mod.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in got and not p.is_alive() and p.exitcode]
                    if dead:
                        raise RuntimeError(f"calibration: rank {dead[0]} died (exit code {procs[dead[0]].exitcode})")
                    continue
                if status != "ok":
                    raise RuntimeError(f"calibration: rank {rank} failed: {payload}")
                got[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return [got[r] for r in range(nproc)]


def _total_memory() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def calibrate(*, nproc: int = 2, quick: bool = False, timeout: float = 300.0, name: str | None = None) -> DeviceProfile:
    """Measure this machine with ``nproc`` ranks at once (see the module docstring)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"calibrate: nproc must be an int >= 1, got {nproc!r}")
    return profile_from_measurements(_run_ranks(nproc, quick, timeout), name=name)


def measure_rank(rank: int, world: int, *, quick: bool = False, cores: int | None = None) -> dict:
    """This rank's measurements (call on every rank of an initialised gloo group at once,
    one thread per rank); ``profile_from_measurements`` turns every rank's into a profile.
    ``cores``: how many ranks measure at once (default: the machine's cores)."""
    return _measure(rank, world, quick, cores)


def profile_from_measurements(ranks: list[dict], *, nproc: int | None = None, name: str | None = None) -> DeviceProfile:
    """A DeviceProfile from the measurements of every rank (``measure_rank``; several rounds
    of them may be given together: ``nproc`` is then the ranks per round)."""
    from tandem.plan.framework import TANDEM

    nproc = nproc or len(ranks)
    # every rank timed the same shapes: take the median over ranks (and rounds) per shape
    samples = [(m, n, k, statistics.median(r["gemm"][i][3] for r in ranks))
               for i, (m, n, k, _) in enumerate(ranks[0]["gemm"])]
    t0, rate, d0 = fit_gemm_curve(samples)
    copy_bw = statistics.median(r["copy_bw"] for r in ranks)
    tiny = statistics.median(r["tiny_block"] for r in ranks)
    gelu_rate = statistics.median(r["gelu_rate"] for r in ranks)
    op = tiny / (2.5 * TANDEM.ops_per_layer)  # forward ops + 1.5x as much backward work
    # attention forward + backward (2.5x) = 3.5 (c0 + FLOPs / 2 / (rate * eff)) (causal: half)
    (f1, _), (f2, _) = ranks[0]["attention"]
    t1, t2 = (statistics.median(r["attention"][i][1] for r in ranks) for i in (0, 1))
    slope = max((t2 - t1) / (f2 - f1), 1e-15)
    att_eff = min(1.0, 3.5 / (2 * slope * rate))
    att_fixed = max(0.0, (t1 - slope * f1) / 3.5)
    n = 2
    latency, bus, measured_pairs = 20e-6, 1e9, ()
    timed = [r for r in ranks if "all_reduce" in r]
    if timed:
        sizes = [(nbytes, statistics.median(r["all_reduce"][i][1] for r in timed))
                 for i, (nbytes, _) in enumerate(timed[0]["all_reduce"])]
        latency = sizes[0][1] / (2 * (n - 1))
        # 1/bus by least squares on relative error over the larger sizes, the latency fixed
        rows = [(nbytes * 2 * (n - 1) / n / t, 1 - 2 * (n - 1) * latency / t) for nbytes, t in sizes[1:]]
        inverse = sum(a * b for a, b in rows) / sum(a * a for a, _ in rows)
        bus = 1 / max(inverse, 1e-15)
        measured_pairs = tuple(sizes)
    efficiency, jitter = _sharing_fit(ranks, nproc)
    memory = _total_memory() / nproc
    source = (f"calibrated on {os.uname().nodename} with {nproc} ranks, {ranks[0]['cores']} at a time, "
              f"{time.strftime('%Y-%m-%d')}; "
              f"GEMM fp32 rate {rate / 1e9:.1f} GFLOP/s, d0 {d0:g}, t0 {t0 * 1e6:.1f} us "
              f"(fitted on {len(samples)} shapes); copy {copy_bw / 1e9:.2f} GB/s; operator overhead "
              f"{op * 1e6:.1f} us; GeLU {1e9 / gelu_rate:.2f} ns per element; attention {att_eff:.2f} of the GEMM rate + {att_fixed * 1e6:.0f} us; all-reduce over 2 ranks: "
              f"latency {latency * 1e6:.0f} us per step, bus {bus / 1e9:.2f} GB/s; ranks beyond the cores: "
              f"sharing efficiency {efficiency:.2f}; jitter {jitter:.3f}")
    profile = DeviceProfile(
        name=name or f"cpu-{nproc}ranks", kind="cpu", peak_flops={"fp32": rate}, memory_bytes=memory,
        memory_bw=copy_bw, intra_node_bw=bus, inter_node_bw=bus, intra_node_latency=latency,
        inter_node_latency=latency, gemm_efficiency=1.0, gemm_half_dim=d0, gemm_overhead=t0,
        attention_efficiency=max(att_eff, 1e-3), attention_overhead=att_fixed, memory_efficiency=1.0, intra_node_efficiency=1.0,
        inter_node_efficiency=1.0, op_overhead=op, reserve_bytes=0.5 * 2**30, gpus_per_node=nproc,
        fused_gelu=False, activation_rate=gelu_rate, pair_all_reduce=measured_pairs, cores_per_node=ranks[0]["cores"],
        sharing_efficiency=efficiency, jitter=jitter, source=source)
    scale = _compute_scale(ranks, profile)
    return replace(profile, compute_scale=scale, source=profile.source + f"; a tp=2 block {scale:.2f}x its components")


def _sharing_fit(ranks: list[dict], nproc: int) -> tuple[float, float]:
    """(sharing efficiency, jitter) from the block passes of ``_sharing``: all ``nproc`` ranks
    on k cores take r = 1 + e (nproc/k - 1) times as long as a pair alone, r the median over
    rounds of the round's ratio of medians (1 when every rank had a core: nothing measured);
    the jitter is the robust standard deviation (1.4826 x the median absolute deviation) of
    log(pass / the median of the rank's passes alike), the machine's drift over the
    calibration included, as steps minutes apart see it."""
    ratios, deviations = [], []
    for r in ranks:
        rounds = r.get("sharing", ())
        for phase in (0, 1):
            times = [t for one in rounds for t in one[phase]]
            if times:
                mid = statistics.median(times)
                deviations += [abs(math.log(t / mid)) for t in times]
        ratios += [statistics.median(together) / statistics.median(alone) for alone, together in rounds
                   if alone and together]
    cores = ranks[0]["cores"]
    efficiency = 1.0
    if ratios and nproc > cores:
        efficiency = min(1.5, max(0.0, (statistics.median(ratios) - 1.0) / (nproc / cores - 1.0)))
    jitter = min(0.5, 1.4826 * statistics.median(deviations)) if deviations else 0.0
    return efficiency, jitter


def _compute_scale(ranks: list[dict], profile: DeviceProfile) -> float:
    """The tp=2 block's passes alone (median) over the component model's F + B + W for it."""
    from tandem.models.gpt import GPTConfig
    from tandem.plan.framework import TANDEM
    from tandem.plan.model_input import load_model
    from tandem.plan.timing import _block, tp_link

    alone = [t for r in ranks for one in r.get("sharing", ()) for t in one[0]]
    if not alone:
        return 1.0
    cfg = GPTConfig(**SHARING_BLOCK)
    F, B, W = _block(load_model(cfg), profile, TANDEM, s=cfg.max_seq_len, b=SHARING_BATCH, tp=2, sp=False,
                     recompute="none", dtype="fp32", e=4, link=tp_link(profile, 2, profile.gpus_per_node))
    return statistics.median(alone) / (F.total + B.total + W.total)
