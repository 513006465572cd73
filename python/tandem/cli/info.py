"""`tandem info`: versions, build, GPUs and how they are connected, and what follows."""

import shutil
import subprocess

import torch


def add_parser(sub):
    p = sub.add_parser("info", help="versions, build info, GPUs and NVLink topology")
    p.set_defaults(run=run)


def _topology() -> str:
    """`nvidia-smi topo -m`, or '' when it is not available."""
    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        return subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _nvlink_peers(topo: str) -> int:
    """How many GPU pairs the topology matrix marks as NVLink (NV#)."""
    rows = [line.split() for line in topo.splitlines() if line.startswith("GPU")]
    return sum(1 for row in rows for cell in row[1:] if cell.startswith("NV")) // 2


def run(args) -> int:
    import tandem

    info = tandem.build_info()
    print(f"tandem      {tandem.__version__}")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"core        CUDA kernels {'built' if info['cuda'] else 'not built (CPU-only core)'}"
          + (f", archs {info['cuda_archs']}, CUDA {info['cuda_version']}, cuBLASLt {info['cublaslt_version']}, "
             f"NCCL {info['nccl_version']} (loaded {info.get('nccl_runtime_version', '?')})" if info["cuda"] else ""))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"GPUs        {n}")
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i}    {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    topo = _topology() if n > 1 else ""
    if topo:
        print(topo.rstrip())
    if n == 0:
        print("advice      no GPU: tandem runs on CPU with gloo (for development and tests)")
    elif n == 1:
        print("advice      one GPU: tensor and pipeline parallelism need more; tp=pp=1 runs here")
    else:
        links = _nvlink_peers(topo)
        if links:
            print(f"advice      {links} NVLink GPU pairs: keep tensor parallelism inside the NVLink domain "
                  f"(tp <= GPUs per node), add pipeline stages across nodes")
        else:
            print("advice      no NVLink seen: tensor parallelism's all-reduces will cross PCIe; prefer "
                  "pipeline or data parallelism across these GPUs, tp only where GPUs share NVLink")
    return 0
