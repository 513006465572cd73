"""Find the CUDA toolkit, cuBLASLt and NCCL for the build, without network access.

cuBLASLt and NCCL come from the nvidia-* wheels that a CUDA build of torch depends on
(site-packages/nvidia/cu13/..., nvidia/cublas/..., nvidia/nccl/...), so tandem links the
very libraries torch loads: two different libnccl.so.2 in one process would break NCCL.
"""

import glob
import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Library:
    include: str  # directory holding the header
    lib_dir: str  # directory holding the shared library
    lib_file: str  # file name to link with -l:NAME (e.g. libnccl.so.2)


def cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or nvcc's root.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a
    wrapper script (e.g. /usr/local/bin/nvcc), so we prefer the toolkit directory.
    """
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            return os.environ[env]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def _nvidia_roots():
    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []


def _find(header, lib_glob, roots):
    """First root with include/<header> and lib/<lib_glob> (lib or lib64)."""
    for root in roots:
        inc = os.path.join(root, "include")
        if not os.path.exists(os.path.join(inc, header)):
            continue
        for libdir in ("lib", "lib64", os.path.join("targets", "x86_64-linux", "lib")):
            hits = sorted(glob.glob(os.path.join(root, libdir, lib_glob)))
            if hits:
                # Prefer the versioned soname (what torch loads) over a dev symlink.
                return Library(inc, os.path.dirname(hits[-1]), os.path.basename(hits[-1]))
    return None


def cublaslt(cuda_root):
    roots = []
    for base in _nvidia_roots():
        roots += sorted(glob.glob(os.path.join(base, "cu*"))) + [os.path.join(base, "cublas")]
    if cuda_root:
        roots.append(cuda_root)
    return _find("cublasLt.h", "libcublasLt.so.*[0-9]", roots)


def torch_requirements(prefix):
    """Names of the distributions that the installed torch requires whose names start with
    prefix (e.g. "nvidia-nccl-" -> ["nvidia-nccl-cu13"]); [] when torch is not installed."""
    try:
        requires = metadata.requires("torch") or []
    except metadata.PackageNotFoundError:
        return []
    names = (re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in requires)
    return [n for n in names if n.lower().replace("_", "-").startswith(prefix)]


def _distribution_roots(name, header):
    """Directories of distribution `name` that hold include/<header> (from its file list)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return []
    roots = []
    for f in dist.files or []:
        if f.name == header and f.parent.name == "include":
            roots.append(os.path.dirname(os.path.dirname(str(dist.locate_file(f)))))
    return roots


def nccl():
    """$NCCL_HOME; else the NCCL wheel that the installed torch depends on, whichever CUDA
    major it is built for (nvidia-nccl-cu12, nvidia-nccl-cu13, ...); else site-packages'
    nvidia/nccl, /usr, /usr/local."""
    roots = [os.environ["NCCL_HOME"]] if os.environ.get("NCCL_HOME") else []
    for name in torch_requirements("nvidia-nccl-"):
        roots += _distribution_roots(name, "nccl.h")
    roots += [os.path.join(base, "nccl") for base in _nvidia_roots()]
    roots += ["/usr", "/usr/local"]
    return _find("nccl.h", "libnccl.so.*[0-9]", roots)
