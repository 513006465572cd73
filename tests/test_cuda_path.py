"""Decisions of the CUDA path checked on CPU: which problems take cuBLASLt's GeLU epilogue,
what a heuristic answer means, how failing algorithms are skipped, the path counters, which
GPUs a build covers. (The NCCL backend's host logic: test_nccl_lifecycle.py.)"""

import pytest
import torch

from tandem import _C, ops
from tandem.cli.info import arch_coverage

T = _C._testing


def test_fp32_and_erf_take_the_general_path():
    """Item 5 (and 9): cuBLASLt's GeLU epilogue (an approximate tanh) gets fp16 and bf16 with
    approximate="tanh" only; fp32 takes torch's GEMM (whose precision torch's own setting,
    legacy or new API, decides: tandem never reads it) and the exact GeLU."""
    for dtype in (torch.float16, torch.bfloat16):
        assert T.cublaslt_epilogue_eligible(dtype, "tanh")
        assert not T.cublaslt_epilogue_eligible(dtype, "none")
    for dtype in (torch.float32, torch.float64):
        assert not T.cublaslt_epilogue_eligible(dtype, "tanh")


def test_heuristic_answers():
    """Item 3: "no kernel" (cached, general path) only for NOT_SUPPORTED or no result; any
    other status is an error to raise, never a silent fallback."""
    assert T.heuristic_outcome("success", 3) == "use"
    assert T.heuristic_outcome("success", 0) == "no_kernel"
    assert T.heuristic_outcome("not_supported", 0) == "no_kernel"
    for status in ("invalid_value", "execution_failed", "internal_error", "not_initialized"):
        assert T.heuristic_outcome(status, 0) == "error", status
        assert T.heuristic_outcome(status, 2) == "error", status


def test_a_failing_algorithm_gives_way_to_the_next():
    """Item 3: a candidate that fails at run time is skipped (and dropped from the cache),
    the next one runs; when none runs the caller raises."""
    assert T.run_first_working([True, True]) == (0, [])
    assert T.run_first_working([False, True, True]) == (1, [0])
    assert T.run_first_working([False, False, True]) == (2, [0, 1])
    assert T.run_first_working([False, False]) == (-1, [0, 1])
    assert T.run_first_working([]) == (-1, [])


def test_path_counters_count_the_general_path_on_cpu():
    """Item 3: the private counters say which path ran (the CUDA tests assert the epilogue)."""
    _C._reset_linear_gelu_paths()
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    ops.linear_bias_gelu(x, w, b)
    ops.linear_bias_gelu_fwd(x, w, b, "none")
    ops.linear_dgelu_bgrad(torch.randn(4, 8), torch.randn(8, 16), torch.randn(4, 16))
    assert _C._linear_gelu_paths() == {"forward_epilogue": 0, "forward_general": 2,
                                       "dgelu_bgrad_epilogue": 0, "dgelu_bgrad_general": 1}
    _C._reset_linear_gelu_paths()
    assert sum(_C._linear_gelu_paths().values()) == 0


@pytest.mark.parametrize("archs,cc,covered,how", [
    ("9.0+PTX", (9, 0), True, "machine code (9.0+PTX)"),
    ("9.0+PTX", (10, 0), True, "PTX of 9.0, compiled by the driver"),
    ("9.0+PTX", (12, 0), True, "PTX of 9.0"),
    ("9.0+PTX", (8, 0), False, 'sm_80 is not in the compiled archs "9.0+PTX"'),
    ("9.0", (10, 0), False, 'rebuild with TANDEM_CUDA_ARCHS="9.0;10.0"'),
    ("8.0;9.0+PTX", (8, 6), True, "machine code (8.0)"),
    ("8.0 9.0", (8, 9), True, "machine code (8.0)"),
    ("9.0a", (9, 0), True, "machine code (9.0a)"),
    ("9.0a+PTX", (10, 0), False, "not in the compiled archs"),
    ("10.0", (10, 3), True, "machine code (10.0)"),
    ("10.0", (12, 0), False, "not in the compiled archs"),
])
def test_arch_coverage(archs, cc, covered, how):
    """Item 10: which GPUs a core built for TANDEM_CUDA_ARCHS runs on (`tandem info`)."""
    ok, detail = arch_coverage(archs, *cc)
    assert ok is covered and how in detail, detail


def test_build_info_names_the_archs_and_revoke():
    info = _C.build_info()
    if not info["cuda"]:
        pytest.skip("a CPU-only core")
    assert info["cuda_archs"]
    assert isinstance(info["nccl_revoke"], bool)
