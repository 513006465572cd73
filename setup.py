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
What is compiled and linked, and with which flags, is buildtools/plan.py's (the CMake build
of the core reads the same plan; see README.md, "C++ and CMake").
"""

import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "buildtools"))
import locate  # noqa: E402  (buildtools/locate.py: finds CUDA_HOME, cuBLASLt, NCCL)
import plan as build_plan  # noqa: E402  (buildtools/plan.py: sources, flags, libraries; CMake reads it too)

# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
_cuda_home = locate.cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _extension():
    plan = build_plan.make_plan(torch.version.cuda)
    print(f"tandem: {plan.reason}")
    common = dict(
        name="tandem._C",
        sources=list(plan.sources),
        include_dirs=list(plan.include_dirs),
        define_macros=list(plan.defines),
    )
    if not plan.cuda:
        return CppExtension(**common, extra_compile_args={"cxx": list(plan.cxx_flags)})
    os.environ["TORCH_CUDA_ARCH_LIST"] = plan.cuda_archs
    for name, lib in zip(plan.library_names, plan.libraries):
        print(f"tandem: {name} {lib.include} {lib.lib_dir}/{lib.lib_file}")
    return CUDAExtension(
        **common,
        library_dirs=[lib.lib_dir for lib in plan.libraries],
        extra_link_args=[f"-l:{lib.lib_file}" for lib in plan.libraries]
        + [f"-Wl,-rpath,{lib.lib_dir}" for lib in plan.libraries],
        extra_compile_args={"cxx": list(plan.cxx_flags), "nvcc": list(plan.nvcc_flags)},
    )


setup(
    name="tandem",
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
