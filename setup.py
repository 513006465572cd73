"""Build tandem and its compiled core, tandem._C.

The CUDA sources are compiled whenever the installed torch is a CUDA build and nvcc is
found (a GPU is not needed); otherwise a CPU-only core is built. Knobs:

  TANDEM_FORCE_CPU=1     build the CPU-only core even where CUDA is available
  TANDEM_CUDA_ARCHS      arch list for nvcc (default "9.0+PTX": Hopper code, plus PTX that
                         the driver compiles at first use on later GPUs such as Blackwell);
                         A100: "8.0;9.0+PTX"; B200: "9.0;10.0+PTX"; RTX 50 / RTX PRO
                         Blackwell: "9.0;12.0+PTX". TORCH_CUDA_ARCH_LIST wins when it is set.
                         `tandem info` says when a GPU is not covered.
  CUDA_HOME / CUDA_PATH  the CUDA toolkit (default: /usr/local/cuda, else nvcc's root)
  NCCL_HOME              an NCCL with include/ and lib/ (default: the NCCL wheel that torch ships)
  MAX_JOBS               parallel compile jobs (ninja)

Install with `pip install --no-build-isolation .` so the build uses the torch you have.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "buildtools"))
import locate  # noqa: E402  (buildtools/locate.py: finds CUDA_HOME, cuBLASLt, NCCL)

# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
_cuda_home = locate.cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    if os.environ.get("TANDEM_FORCE_CPU", "0") not in ("", "0"):
        print("tandem: TANDEM_FORCE_CPU set: building the CPU-only core")
        return False
    if torch.version.cuda is None:
        print("tandem: torch is a CPU build: building the CPU-only core")
        return False
    if _cuda_home is None or shutil.which("nvcc", path=os.path.join(_cuda_home, "bin")) is None:
        print("tandem: nvcc not found (set CUDA_HOME): building the CPU-only core")
        return False
    return True


def _sources(*patterns):
    out = []
    for p in patterns:
        out += sorted(glob.glob(os.path.join("csrc", p), recursive=True))
    return out


def _extension():
    cxx = ["-O3"]  # torch adds the C++ standard it needs (17 or 20)
    define = []
    if not _want_cuda():
        return CppExtension(
            "tandem._C",
            _sources("**/*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            define_macros=define,
        )

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or os.environ.get("TANDEM_CUDA_ARCHS") or "9.0+PTX"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    blas = locate.cublaslt(_cuda_home)
    nccl = locate.nccl()
    for name, found in (("cuBLASLt", blas), ("NCCL", nccl)):
        if found is None:
            raise RuntimeError(
                f"tandem: torch is a CUDA build but {name} was not found; install the nvidia "
                f"wheels that torch depends on, or set {'NCCL_HOME' if name == 'NCCL' else 'CUDA_HOME'}"
            )
    print(f"tandem: CUDA build, CUDA_HOME={_cuda_home}, archs={archs}")
    print(f"tandem: cuBLASLt {blas.include} {blas.lib_dir}/{blas.lib_file}")
    print(f"tandem: NCCL {nccl.include} {nccl.lib_dir}/{nccl.lib_file}")
    define += [("TANDEM_WITH_CUDA", "1"), ("TANDEM_CUDA_ARCHS", f'"{archs}"')]
    libs = (blas, nccl)
    return CUDAExtension(
        "tandem._C",
        _sources("**/*.cpp", "**/*.cu"),
        include_dirs=[os.path.join(ROOT, "csrc")] + [lib.include for lib in libs],
        library_dirs=[lib.lib_dir for lib in libs],
        extra_link_args=[f"-l:{lib.lib_file}" for lib in libs]
        + [f"-Wl,-rpath,{lib.lib_dir}" for lib in libs],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        define_macros=define,
    )


setup(
    name="tandem",
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
