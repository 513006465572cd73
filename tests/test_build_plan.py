"""buildtools/plan.py, the one build description that setup.py and CMake read, and the
NCCL lookup of buildtools/locate.py. No compiler runs here: these are the decisions."""

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "buildtools"))
import locate  # noqa: E402
import plan  # noqa: E402


def test_cpu_plan_partitions_every_source_once():
    p = plan.make_plan("13.0", force_cpu=True)
    assert not p.cuda and "TANDEM_FORCE_CPU" in p.reason
    on_disk = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "csrc").rglob("*.cpp"))
    assert sorted(p.sources) == on_disk and len(set(p.sources)) == len(p.sources)
    assert not any(s.endswith(".cu") for s in p.sources)
    assert "csrc/bindings.cpp" in p.python_sources
    assert "csrc/build_info.cpp" in p.python_sources  # through build_info.h (pybind11)
    assert "csrc/p2p/stage_link.cpp" in p.core_sources and "csrc/comm/c10d_communicator.cpp" in p.core_sources
    for src in p.core_sources:  # the C++ library never needs Python
        assert not plan.is_python_binding(str(ROOT / src)), src
    assert "csrc/comm/python.h" not in p.core_headers and "csrc/p2p/stage_link.h" in p.core_headers
    assert p.defines == () and p.include_dirs == (str(ROOT / "csrc"),)


def test_cuda_only_with_a_cuda_torch_and_nvcc():
    # torch.version.cuda is None for a CPU build of torch (make_plan(None) imports torch to
    # learn it), so the decision is checked on its helper
    assert plan._want_cuda(None, "/usr/local/cuda", False)[0] is False
    assert "CPU build" in plan._want_cuda(None, "/usr/local/cuda", False)[1]
    assert "nvcc not found" in plan._want_cuda("13.0", None, False)[1]
    assert "TANDEM_FORCE_CPU" in plan._want_cuda("13.0", "/usr/local/cuda", True)[1]


def test_python_binding_rule_follows_local_headers(tmp_path):
    (tmp_path / "api.h").write_text('#pragma once\n#include <pybind11/pybind11.h>\n')
    (tmp_path / "mid.h").write_text('#pragma once\n#include "api.h"\n')
    (tmp_path / "cycle.h").write_text('#pragma once\n#include "cycle.h"\n#include <vector>\n')
    (tmp_path / "uses.cpp").write_text('#include "mid.h"\n')
    (tmp_path / "plain.cpp").write_text('#include "cycle.h"\n#include "missing.h"\n// #include <pybind11/x.h> is a comment\n')
    (tmp_path / "ext.cpp").write_text('  #  include <torch/extension.h>\n')
    assert plan.is_python_binding(str(tmp_path / "uses.cpp"))
    assert plan.is_python_binding(str(tmp_path / "ext.cpp"))
    assert not plan.is_python_binding(str(tmp_path / "plain.cpp"))


def test_plan_checks_itself():
    with pytest.raises(ValueError, match="needs cuda_home and cuda_archs"):
        plan.Plan(cuda=True, reason="x")
    with pytest.raises(ValueError, match="CUDA code in a CPU-only plan"):
        plan.Plan(cuda=False, reason="x", core_sources=("csrc/ops/k.cu",))
    with pytest.raises(ValueError, match="differ in length"):
        plan.Plan(cuda=False, reason="x", library_names=("NCCL",))


def test_cmake_file_carries_the_plan(tmp_path):
    lib = locate.Library("/opt/nccl/include", "/opt/nccl/lib", "libnccl.so.2")
    p = plan.Plan(cuda=True, reason='CUDA build, archs="9.0"', core_sources=("csrc/a.cpp", "csrc/k.cu"),
                  python_sources=("csrc/bindings.cpp",), include_dirs=("/x/csrc", "/opt/nccl/include"),
                  defines=(("TANDEM_WITH_CUDA", "1"), ("TANDEM_CUDA_ARCHS", '"9.0"')), nvcc_flags=("-O3",),
                  cuda_home="/usr/local/cuda", cuda_archs="9.0", libraries=(lib,), library_names=("NCCL",))
    out = tmp_path / "plan.cmake"
    plan.write_cmake(p, str(out), torch_cmake_prefix="/t/share/cmake", nvcc_common_flags=("--expt-relaxed-constexpr",))
    text = out.read_text()
    assert "set(TANDEM_CUDA ON)" in text
    assert f'set(TANDEM_CORE_SOURCES "{ROOT}/csrc/a.cpp;{ROOT}/csrc/k.cu")' in text
    assert 'set(TANDEM_DEFINES "TANDEM_WITH_CUDA=1;TANDEM_CUDA_ARCHS=\\"9.0\\"")' in text
    assert 'set(TANDEM_NVCC_FLAGS "--expt-relaxed-constexpr;-O3")' in text
    assert 'set(TANDEM_LINK_LIBRARIES "/opt/nccl/lib/libnccl.so.2")' in text
    assert 'set(TANDEM_PLAN_REASON "CUDA build, archs=\\"9.0\\"")' in text
    mtime = out.stat().st_mtime_ns
    os.utime(out, ns=(mtime - 10**9, mtime - 10**9))
    plan.write_cmake(p, str(out), torch_cmake_prefix="/t/share/cmake", nvcc_common_flags=("--expt-relaxed-constexpr",))
    assert out.stat().st_mtime_ns == mtime - 10**9  # unchanged: not rewritten (no reconfigure loop)
    with pytest.raises(ValueError, match="cannot carry"):
        plan.write_cmake(plan.Plan(cuda=False, reason="a;b"), str(out), torch_cmake_prefix="/t")


class _FakeDist:
    def __init__(self, root, files):
        self.root, self.files = root, [pathlib.PurePosixPath(f) for f in files]

    def locate_file(self, f):
        return self.root / f


def _nccl_wheel(root):
    (root / "nvidia/nccl/include").mkdir(parents=True)
    (root / "nvidia/nccl/lib").mkdir(parents=True)
    (root / "nvidia/nccl/include/nccl.h").write_text("")
    (root / "nvidia/nccl/lib/libnccl.so.2").write_text("")
    return _FakeDist(root, ["nvidia/nccl/include/nccl.h", "nvidia/nccl/lib/libnccl.so.2"])


@pytest.mark.parametrize("cuda_major", ["cu12", "cu13"])
def test_nccl_is_the_wheel_torch_depends_on(tmp_path, monkeypatch, cuda_major):
    name = f"nvidia-nccl-{cuda_major}"
    dist = _nccl_wheel(tmp_path / "site")
    requires = ["numpy", f'{name}==2.30.7; platform_system == "Linux"', 'nvidia-cudnn-cu13==9; platform_system == "Linux"']
    monkeypatch.delenv("NCCL_HOME", raising=False)
    monkeypatch.setattr(locate.metadata, "requires", lambda d: requires if d == "torch" else [])
    monkeypatch.setattr(locate.metadata, "distribution",
                        lambda d: dist if d == name else (_ for _ in ()).throw(locate.metadata.PackageNotFoundError(d)))
    monkeypatch.setattr(locate, "_nvidia_roots", lambda: [])
    assert locate.torch_requirements("nvidia-nccl-") == [name]
    found = locate.nccl()
    assert found == locate.Library(str(tmp_path / "site/nvidia/nccl/include"), str(tmp_path / "site/nvidia/nccl/lib"),
                                   "libnccl.so.2")
    # NCCL_HOME wins over the wheel
    home = tmp_path / "home"
    (home / "include").mkdir(parents=True)
    (home / "lib").mkdir()
    (home / "include/nccl.h").write_text("")
    (home / "lib/libnccl.so.2.30.7").write_text("")
    monkeypatch.setenv("NCCL_HOME", str(home))
    assert locate.nccl() == locate.Library(str(home / "include"), str(home / "lib"), "libnccl.so.2.30.7")


def test_no_torch_no_requirements(monkeypatch):
    def missing(name):
        raise locate.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(locate.metadata, "requires", missing)
    assert locate.torch_requirements("nvidia-nccl-") == []


def test_cuda_plan_knobs(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("TANDEM_FORCE_CPU", raising=False)
    monkeypatch.setenv("TANDEM_CUDA_ARCHS", "8.0;9.0")
    if locate.cuda_home() is None or locate.cublaslt(locate.cuda_home()) is None or locate.nccl() is None:
        pytest.skip("no CUDA toolkit, cuBLASLt or NCCL here: the CUDA plan cannot be made")
    p = plan.make_plan("13.0")
    assert p.cuda and p.cuda_archs == "8.0;9.0"
    assert ("TANDEM_CUDA_ARCHS", '"8.0;9.0"') in p.defines and ("TANDEM_WITH_CUDA", "1") in p.defines
    assert any(s.endswith(".cu") for s in p.core_sources) and p.nvcc_flags == plan.NVCC_FLAGS
    assert p.library_names == ("cuBLASLt", "NCCL") and p.libraries[1] == locate.nccl()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # wins, as in torch's own builds
    assert plan.make_plan("13.0").cuda_archs == "9.0"
    assert not plan.make_plan("13.0", force_cpu=True).cuda
    monkeypatch.setenv("TANDEM_FORCE_CPU", "1")
    assert not plan.make_plan("13.0").cuda
