"""`tandem info`: versions, build, GPUs and how they are connected, and what follows."""

import re
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


_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def arch_coverage(archs: str, major: int, minor: int) -> tuple[bool, str]:
    """Whether a core compiled for ``archs`` (TORCH_CUDA_ARCH_LIST syntax, e.g.
    "8.0;9.0+PTX", separated by ``;``, ``,`` or spaces) runs on a GPU of compute capability
    ``major.minor``, and how. Machine code (SASS) of an arch runs on GPUs of the same major
    version and an equal or higher minor one (an "a" arch only on itself); PTX of an arch at
    or below the GPU's is compiled by the driver when a kernel is first used."""
    have = (major, minor)
    sass, ptx = [], []
    for entry in filter(None, re.split(r"[;,\s]+", archs)):
        m = _ARCH.match(entry)
        if m is None:
            continue
        arch = (int(m.group(1)), int(m.group(2)))
        specific = m.group(3) == "a"  # sm_90a: exactly 9.0
        if (arch == have) if specific else (arch[0] == major and arch[1] <= minor):
            sass.append(entry)
        if m.group(4) and ((arch == have) if specific else arch <= have):
            ptx.append(entry)
    if sass:
        return True, f"machine code ({sass[0]})"
    if ptx:
        return True, (f"PTX of {ptx[-1].removesuffix('+PTX')}, compiled by the driver at first use; "
                      f"for machine code rebuild with TANDEM_CUDA_ARCHS=\"{archs};{major}.{minor}\"")
    return False, (f"sm_{major}{minor} is not in the compiled archs \"{archs}\": the CUDA kernels cannot "
                   f"run; rebuild with TANDEM_CUDA_ARCHS=\"{archs};{major}.{minor}\"")


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
    uncovered = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        covered = ""
        if info["cuda"]:
            ok, how = arch_coverage(info["cuda_archs"], p.major, p.minor)
            covered = f": {how}"
            if not ok:
                uncovered.append(f"cuda:{i}")
        print(f"  cuda:{i}    {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}{covered}")
    if uncovered:
        print(f"warning     {', '.join(uncovered)}: no code compiled for this GPU (see above)")
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
