"""The one description of tandem's compiled core, read by setup.py and by CMake.

Sources, include directories, defines, compile flags and the libraries to link (cuBLASLt,
NCCL) are decided here, once; setup.py turns a Plan into a torch extension and CMake reads
the same Plan through `python buildtools/plan.py --cmake FILE` (cmake/TandemPlan.cmake).

Sources are found by rule, not listed: every csrc/**/*.cpp (and *.cu in a CUDA build). A
source that includes <torch/extension.h>, pybind11 or Python.h belongs to the Python module
(tandem._C); the others make the C++ core, which C++ programs link as libtandem.

Knobs (environment): TANDEM_FORCE_CPU, TANDEM_CUDA_ARCHS (TORCH_CUDA_ARCH_LIST wins),
CUDA_HOME / CUDA_PATH, NCCL_HOME; see setup.py and README.md.
"""

import argparse
import glob
import os
import re
import shutil
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import locate  # noqa: E402  (buildtools/locate.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

__all__ = ["Plan", "make_plan", "is_python_binding", "write_cmake"]

DEFAULT_CUDA_ARCHS = "9.0+PTX"  # Hopper code, plus PTX for later GPUs (see setup.py)
CXX_FLAGS = ("-O3",)  # torch adds the C++ standard it needs (setup.py); CMake uses C++20
NVCC_FLAGS = ("-O3", "-lineinfo")

_PYTHON_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch/extension\.h|torch/python\.h|pybind11/|Python\.h)', re.M)
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def is_python_binding(path, _seen=None):
    """Whether a source or header belongs to the Python module: it includes Python's API,
    directly or through a header of csrc/."""
    seen = set() if _seen is None else _seen
    if path in seen:
        return False
    seen.add(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if _PYTHON_INCLUDE.search(text):
        return True
    for name in _LOCAL_INCLUDE.findall(text):
        for base in (os.path.dirname(path), CSRC):
            header = os.path.join(base, name)
            if os.path.isfile(header):
                if is_python_binding(header, seen):
                    return True
                break
    return False


def _files(*patterns):
    out = []
    for p in patterns:
        out += glob.glob(os.path.join(CSRC, "**", p), recursive=True)
    return sorted(os.path.relpath(f, ROOT) for f in out)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What to compile and link, with paths relative to the repository root for sources."""

    cuda: bool
    """CUDA kernels and the NCCL backend are compiled (torch is a CUDA build, nvcc found)."""
    reason: str
    """Why this kind of core (printed by setup.py and CMake)."""
    core_sources: tuple = ()
    """C++/CUDA sources of the core (no Python): CMake's libtandem, and part of tandem._C."""
    python_sources: tuple = ()
    """pybind11 bindings and op registration: only in tandem._C."""
    core_headers: tuple = ()
    """Headers of the core (installed by CMake for C++ users)."""
    include_dirs: tuple = ()
    """Absolute include directories: csrc/ and the libraries' headers."""
    defines: tuple = ()
    """(name, value) pairs."""
    cxx_flags: tuple = CXX_FLAGS
    nvcc_flags: tuple = ()
    cuda_home: str | None = None
    cuda_archs: str | None = None
    libraries: tuple = ()
    """locate.Library entries to link (cuBLASLt, NCCL), each by its soname with an rpath."""
    library_names: tuple = field(default=())
    """Their names, for messages ("cuBLASLt", "NCCL")."""

    def __post_init__(self):
        if self.cuda and not (self.cuda_home and self.cuda_archs):
            raise ValueError("Plan: a CUDA plan needs cuda_home and cuda_archs")
        if len(self.libraries) != len(self.library_names):
            raise ValueError("Plan: libraries and library_names differ in length")
        for src in self.core_sources + self.python_sources:
            if src.endswith(".cu") and not self.cuda:
                raise ValueError(f"Plan: {src} is CUDA code in a CPU-only plan")

    @property
    def sources(self):
        return self.core_sources + self.python_sources


def _want_cuda(torch_cuda, cuda_home, force_cpu):
    if force_cpu:
        return False, "TANDEM_FORCE_CPU set: building the CPU-only core"
    if torch_cuda is None:
        return False, "torch is a CPU build: building the CPU-only core"
    if cuda_home is None or shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) is None:
        return False, "nvcc not found (set CUDA_HOME): building the CPU-only core"
    return True, f"CUDA build, CUDA_HOME={cuda_home}"


def _env_flag(name):
    return os.environ.get(name, "0") not in ("", "0", "OFF", "off", "false", "False")


def make_plan(torch_cuda=None, *, force_cpu=None):
    """The plan for this machine. torch_cuda: torch.version.cuda (default: import torch)."""
    if torch_cuda is None:
        import torch

        torch_cuda = torch.version.cuda
    force_cpu = _env_flag("TANDEM_FORCE_CPU") if force_cpu is None else force_cpu
    cuda_home = locate.cuda_home()
    cuda, reason = _want_cuda(torch_cuda, cuda_home, force_cpu)
    patterns = ("*.cpp", "*.cu") if cuda else ("*.cpp",)
    sources = _files(*patterns)
    core = tuple(s for s in sources if not is_python_binding(os.path.join(ROOT, s)))
    python = tuple(s for s in sources if s not in core)
    headers = tuple(h for h in _files("*.h", "*.cuh") if not is_python_binding(os.path.join(ROOT, h)))
    if not cuda:
        return Plan(cuda=False, reason=reason, core_sources=core, python_sources=python, core_headers=headers,
                    include_dirs=(CSRC,), cuda_home=cuda_home)

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or os.environ.get("TANDEM_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    names, libs = ("cuBLASLt", "NCCL"), (locate.cublaslt(cuda_home), locate.nccl())
    for name, found in zip(names, libs):
        if found is None:
            raise RuntimeError(
                f"tandem: torch is a CUDA build but {name} was not found; install the nvidia "
                f"wheels that torch depends on, or set {'NCCL_HOME' if name == 'NCCL' else 'CUDA_HOME'}"
            )
    return Plan(
        cuda=True,
        reason=reason + f", archs={archs}",
        core_sources=core,
        python_sources=python,
        core_headers=headers,
        include_dirs=(CSRC,) + tuple(dict.fromkeys(lib.include for lib in libs)),
        defines=(("TANDEM_WITH_CUDA", "1"), ("TANDEM_CUDA_ARCHS", f'"{archs}"')),
        nvcc_flags=NVCC_FLAGS,
        cuda_home=cuda_home,
        cuda_archs=archs,
        libraries=libs,
        library_names=names,
    )


def _cmake_list(values):
    """A quoted CMake list; ';' separates items, so items must not hold one."""
    out = []
    for v in values:
        v = str(v)
        if ";" in v:
            raise ValueError(f"plan: {v!r} holds a ';', which a CMake list cannot carry")
        out.append(v.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$"))
    return '"' + ";".join(out) + '"'


def write_cmake(plan, path, *, torch_cmake_prefix, nvcc_common_flags=()):
    """Writes the plan as CMake `set()` lines (read by cmake/TandemPlan.cmake)."""
    absolute = lambda paths: [os.path.join(ROOT, p) for p in paths]  # noqa: E731
    dirs = sorted({os.path.dirname(p) for p in absolute(plan.core_sources + plan.python_sources + plan.core_headers)})
    lines = [
        "# Written by buildtools/plan.py: the build description that setup.py uses too. Do not edit.",
        f"set(TANDEM_CUDA {'ON' if plan.cuda else 'OFF'})",
        f"set(TANDEM_PLAN_REASON {_cmake_list([plan.reason])})",
        f"set(TANDEM_CORE_SOURCES {_cmake_list(absolute(plan.core_sources))})",
        f"set(TANDEM_PYTHON_SOURCES {_cmake_list(absolute(plan.python_sources))})",
        f"set(TANDEM_CORE_HEADERS {_cmake_list(plan.core_headers)})",
        f"set(TANDEM_SOURCE_DIRS {_cmake_list(dirs)})",
        f"set(TANDEM_INCLUDE_DIRS {_cmake_list(plan.include_dirs)})",
        f"set(TANDEM_DEFINES {_cmake_list(f'{k}={v}' for k, v in plan.defines)})",
        f"set(TANDEM_CXX_FLAGS {_cmake_list(plan.cxx_flags)})",
        f"set(TANDEM_NVCC_FLAGS {_cmake_list(tuple(nvcc_common_flags) + plan.nvcc_flags)})",
        f"set(TANDEM_CUDA_HOME {_cmake_list([plan.cuda_home or ''])})",
        f"set(TANDEM_CUDA_ARCHS {_cmake_list([plan.cuda_archs or ''])})",
        f"set(TANDEM_LINK_LIBRARIES {_cmake_list(os.path.join(l.lib_dir, l.lib_file) for l in plan.libraries)})",
        f"set(TANDEM_LINK_DIRS {_cmake_list(dict.fromkeys(l.lib_dir for l in plan.libraries))})",
        f"set(TANDEM_TORCH_CMAKE_PREFIX {_cmake_list([torch_cmake_prefix])})",
    ]
    text = "\n".join(lines) + "\n"
    # rewrite only on change: CMake re-reads the file, the build does not restart for nothing
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cmake", metavar="FILE", help="write the plan as CMake set() lines to FILE")
    args = parser.parse_args(argv)
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported (as in setup.py)
    if locate.cuda_home() and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = locate.cuda_home()
    import torch
    import torch.utils

    plan = make_plan(torch.version.cuda)
    if args.cmake:
        common = ()
        if plan.cuda:  # what torch's CUDAExtension gives nvcc in setup.py
            from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as common
        write_cmake(plan, args.cmake, torch_cmake_prefix=torch.utils.cmake_prefix_path, nvcc_common_flags=common)
    else:
        print(f"tandem: {plan.reason}")
        for name in ("core_sources", "python_sources", "include_dirs", "defines", "cxx_flags", "nvcc_flags"):
            print(f"  {name}: {' '.join(map(str, getattr(plan, name)))}")
        for name, lib in zip(plan.library_names, plan.libraries):
            print(f"  {name}: {lib.include} {lib.lib_dir}/{lib.lib_file}")


if __name__ == "__main__":
    main()
