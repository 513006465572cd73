"""Device profiles: what the planner's time and memory models know about a machine.

A profile is one device (a GPU, or one CPU rank) and the links around it. Built-in
profiles carry the vendor's figures (each with its source) and efficiencies that turn
peak figures into achievable ones; ``tandem plan --calibrate`` measures a profile of the
local machine instead (:mod:`tandem.plan.calibrate`). Profiles read and write JSON.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

__all__ = ["DeviceProfile", "PROFILES", "load_profile"]

GiB = 2**30


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """Peak figures of one device and its links, and the efficiencies reached in practice."""

    name: str
    """what the tables call it"""
    kind: str = "gpu"
    """"gpu" or "cpu\""""
    peak_flops: dict = field(default_factory=dict)
    """dense peak FLOP/s per GEMM dtype: keys among "bf16", "fp16", "fp32\""""
    memory_bytes: float
    """device memory"""
    memory_bw: float
    """device memory bandwidth, bytes/s"""
    intra_node_bw: float
    """bytes/s per device and direction between devices of one node (NVLink)"""
    inter_node_bw: float
    """bytes/s per device and direction between nodes (one NIC per GPU)"""
    intra_node_latency: float = 5e-6
    """seconds per step of a collective inside a node (alpha)"""
    inter_node_latency: float = 10e-6
    """seconds per step of a collective across nodes"""
    gemm_efficiency: float = 0.8
    """fraction of peak that a large GEMM reaches"""
    gemm_half_dim: float = 64.0
    """a GEMM dimension d slows it by (1 + d0/d): small dimensions cost efficiency"""
    gemm_overhead: float = 5e-6
    """seconds added to every GEMM (launch, tail)"""
    attention_efficiency: float = 0.5
    """fraction of peak that fused (flash) attention reaches"""
    attention_overhead: float = 0.0
    """seconds added to every fused attention forward (the backward costs 2.5x)"""
    memory_efficiency: float = 0.8
    """fraction of memory_bw that elementwise kernels reach"""
    intra_node_efficiency: float = 0.8
    """bus bandwidth of collectives inside a node over intra_node_bw"""
    inter_node_efficiency: float = 0.9
    """bus bandwidth of collectives across nodes over inter_node_bw"""
    op_overhead: float = 4e-6
    """seconds per elementwise kernel (launch) or per operator call on a CPU"""
    reserve_bytes: float = 3 * GiB
    """memory kept back: CUDA context, NCCL and cuBLAS buffers, allocator fragmentation"""
    fused_gelu: bool = True
    """GeLU runs in the GEMM's epilogue (cuBLASLt); False: a separate pass (CPU)"""
    pair_all_reduce: tuple = ()
    """measured ((bytes, seconds), ...) of an all-reduce over 2 ranks of one node, by
    increasing size (calibrated CPU profiles): such all-reduces (and all-gathers and
    reduce-scatters, half as long) interpolate it. gloo's cost is not alpha-beta: 128 KB
    takes 3x what a fit to 4 B and 4 MB says. Empty: the alpha-beta model"""
    activation_rate: float = 0.0
    """elements per second of a separate activation pass (GeLU's forward), when it is bound
    by arithmetic rather than memory (a CPU's tanh GeLU: ~3.6 ns per element, 10x its
    bytes' time); 0: memory-bound, its bytes count"""
    cores_per_node: int | None = None
    """CPU profiles: cores the ranks of one host share (more ranks than cores slow each
    other: host.py); None for GPUs"""
    sharing_efficiency: float = 1.0
    """CPU profiles: c ranks computing on k < c cores take 1 + e (c/k - 1) times as long as
    alone (host.py); 1: the cores shared evenly. Calibration measures e (a rank that waits
    in a collective leaves its core to the others: 0.4-0.6 on the 2-core VM)"""
    compute_scale: float = 1.0
    """CPU profiles: tandem's own tp=2 GPT block (forward and backward) measured alone, over
    what the component model (timing.py) predicts for it from this profile; every F, B and W
    is multiplied by it (what the components miss between them: collectives after compute
    cost more than back to back, autograd and the allocator; 1.05-1.37 on the 2-core VM)"""
    jitter: float = 0.0
    """the spread of one action's time from step to step, the standard deviation of its
    logarithm (step.py); calibrated CPU profiles measure it (about 0.2 on a shared VM), GPUs: 0"""
    gpus_per_node: int = 8
    """devices per node, the default of --gpus-per-node"""
    source: str = ""
    """where the figures come from"""

    def __post_init__(self):
        if self.kind not in ("gpu", "cpu"):
            raise ValueError(f"DeviceProfile {self.name!r}: kind must be 'gpu' or 'cpu', got {self.kind!r}")
        if not self.peak_flops:
            raise ValueError(f"DeviceProfile {self.name!r}: peak_flops needs at least one dtype")
        for dtype, value in self.peak_flops.items():
            if dtype not in ("bf16", "fp16", "fp32"):
                raise ValueError(f"DeviceProfile {self.name!r}: peak_flops has unknown dtype {dtype!r} "
                                 "(use bf16, fp16, fp32)")
            _positive(self.name, f"peak_flops[{dtype!r}]", value)
        for name in ("memory_bytes", "memory_bw", "intra_node_bw", "inter_node_bw", "gemm_half_dim"):
            _positive(self.name, name, getattr(self, name), allow_zero=name == "gemm_half_dim")
        for name in ("intra_node_latency", "inter_node_latency", "gemm_overhead", "op_overhead", "reserve_bytes",
                     "attention_overhead", "activation_rate", "sharing_efficiency", "jitter"):
            _positive(self.name, name, getattr(self, name), allow_zero=True)
        _positive(self.name, "compute_scale", self.compute_scale)
        for name in ("gemm_efficiency", "attention_efficiency", "memory_efficiency", "intra_node_efficiency",
                     "inter_node_efficiency"):
            value = getattr(self, name)
            _positive(self.name, name, value)
            if value > 1:
                raise ValueError(f"DeviceProfile {self.name!r}: {name} is a fraction in (0, 1], got {value}")
        if self.jitter >= 1:
            raise ValueError(f"DeviceProfile {self.name!r}: jitter (the standard deviation of a log time) must be "
                             f"< 1, got {self.jitter}")
        if self.cores_per_node is not None and (isinstance(self.cores_per_node, bool) or
                                                not isinstance(self.cores_per_node, int) or self.cores_per_node < 1):
            raise ValueError(f"DeviceProfile {self.name!r}: cores_per_node must be None or an int >= 1, "
                             f"got {self.cores_per_node!r}")
        table = tuple((float(b), float(t)) for b, t in self.pair_all_reduce)
        if any(b <= 0 or t <= 0 or not (math.isfinite(b) and math.isfinite(t)) for b, t in table) or \
                any(b1 >= b2 for (b1, _), (b2, _) in zip(table, table[1:])):
            raise ValueError(f"DeviceProfile {self.name!r}: pair_all_reduce must be (bytes, seconds) pairs > 0 "
                             f"by increasing bytes, got {self.pair_all_reduce!r}")
        object.__setattr__(self, "pair_all_reduce", table)  # a JSON list becomes the tuple
        if not isinstance(self.fused_gelu, bool):
            raise ValueError(f"DeviceProfile {self.name!r}: fused_gelu must be true or false, got {self.fused_gelu!r}")
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ValueError(f"DeviceProfile {self.name!r}: gpus_per_node must be an int >= 1, "
                             f"got {self.gpus_per_node!r}")

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s of GEMMs in ``dtype`` (bf16 falls back to fp16 and back)."""
        for key in (dtype, {"bf16": "fp16", "fp16": "bf16"}.get(dtype)):
            if key in self.peak_flops:
                return self.peak_flops[key]
        raise ValueError(f"profile {self.name!r} has no peak for {dtype} (it has {sorted(self.peak_flops)})")

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(asdict(self), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text


def _positive(profile: str, name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"DeviceProfile {profile!r}: {name} must be a finite number {bound}, got {value!r}")


PROFILES: dict[str, DeviceProfile] = {
    # NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s dense BF16/FP16 tensor cores, 19.5 TFLOP/s
    # FP32, 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s (both directions: 300 GB/s each way).
    # DGX A100 datasheet (the SC'21 paper's Selene nodes): eight 200 Gb/s HDR InfiniBand
    # HCAs for compute traffic, one per GPU: 25 GB/s each way.
    # Efficiencies: nccl-tests all_reduce on DGX A100 reaches ~230 GB/s bus bandwidth (0.77
    # of NVLink); FlashAttention-2 (Dao 2023) reports 50-73% of peak forward and backward.
    # GEMMs: 0.72 of the boost-clock peak (~225 TFLOP/s), what long runs of large bf16
    # GEMMs sustain at the clocks the 400 W limit allows. This is the one number set
    # against the SC'21 table (docs/plan.md): it is the same for every row.
    "A100-80GB": DeviceProfile(
        name="A100-80GB", peak_flops={"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
        memory_bytes=80e9, memory_bw=2.039e12, intra_node_bw=300e9, inter_node_bw=25e9,
        intra_node_latency=4e-6, inter_node_latency=8e-6,
        gemm_efficiency=0.72, gemm_half_dim=64.0, gemm_overhead=5e-6, attention_efficiency=0.6,
        memory_efficiency=0.8, intra_node_efficiency=0.77, inter_node_efficiency=0.9, op_overhead=4e-6,
        source="NVIDIA A100 80GB SXM and DGX A100 datasheets"),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16/FP16 (1,979 with sparsity), 67
    # TFLOP/s FP32, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (450 GB/s each way). DGX H100:
    # eight 400 Gb/s ConnectX-7 NICs, one per GPU: 50 GB/s each way.
    # Efficiencies: nccl-tests all_reduce on DGX H100 ~360 GB/s bus bandwidth (0.8); cuBLAS
    # bf16 ~75% of peak on LLM shapes; FlashAttention-2 reaches ~35-40% of H100 peak (Shah
    # et al. 2024, FlashAttention-3, Fig. 5).
    "H100-SXM": DeviceProfile(
        name="H100-SXM", peak_flops={"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        memory_bytes=80e9, memory_bw=3.35e12, intra_node_bw=450e9, inter_node_bw=50e9,
        intra_node_latency=4e-6, inter_node_latency=8e-6,
        gemm_efficiency=0.75, gemm_half_dim=96.0, gemm_overhead=5e-6, attention_efficiency=0.4,
        memory_efficiency=0.8, intra_node_efficiency=0.8, inter_node_efficiency=0.9, op_overhead=4e-6,
        source="NVIDIA H100 SXM5 and DGX H100 datasheets"),
    # NVIDIA H200 SXM datasheet: the H100's compute (989 TFLOP/s dense BF16), 141 GB HBM3e at
    # 4.8 TB/s, NVLink 900 GB/s; DGX H200: eight 400 Gb/s ConnectX-7 NICs, one per GPU.
    "H200": DeviceProfile(
        name="H200", peak_flops={"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        memory_bytes=141e9, memory_bw=4.8e12, intra_node_bw=450e9, inter_node_bw=50e9,
        intra_node_latency=4e-6, inter_node_latency=8e-6,
        gemm_efficiency=0.75, gemm_half_dim=96.0, gemm_overhead=5e-6, attention_efficiency=0.4,
        memory_efficiency=0.8, intra_node_efficiency=0.8, inter_node_efficiency=0.9, op_overhead=4e-6,
        source="NVIDIA H200 SXM and DGX H200 datasheets"),
}

_FIELDS = {f.name for f in fields(DeviceProfile)}


def load_profile(profile) -> DeviceProfile:
    """A DeviceProfile from a built-in name (``PROFILES``), a JSON file, or a dict."""
    if isinstance(profile, DeviceProfile):
        return profile
    if isinstance(profile, str):
        if profile in PROFILES:
            return PROFILES[profile]
        if not os.path.isfile(profile):
            raise ValueError(f"device {profile!r}: not a built-in profile ({', '.join(PROFILES)}) nor a JSON file")
        with open(profile) as f:
            try:
                profile = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"device profile {f.name}: not valid JSON ({e})") from None
    if not isinstance(profile, dict):
        raise TypeError(f"a device profile is a name, a path or a dict, got {type(profile).__name__}")
    unknown = sorted(set(profile) - _FIELDS)
    if unknown:
        raise ValueError(f"device profile: unknown fields {unknown} (known: {sorted(_FIELDS)})")
    try:
        return DeviceProfile(**profile)
    except TypeError as e:
        raise ValueError(f"device profile: {e}") from None
