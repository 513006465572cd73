"""tandem.ops.linear_bias_gelu and its split backward on CUDA (skipped without a GPU).

Every case compares the op with the plain PyTorch composite F.gelu(F.linear(...)) at the same
dtype: its error against a float64 reference may be at most twice the composite's (plus half
an ulp of the largest value). Aligned fp16/bf16 shapes with "tanh" take the cuBLASLt epilogue
path, and the path counters (tandem._C._linear_gelu_paths) prove it: the general path is also
what the comparison uses, so a fused path that never ran would pass the comparison alone. N or
K not a multiple of 8, misaligned views, "none", and fp32 take the general path.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tandem import _C, ops
from tandem.nn import FusedLinearGELU

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROX = ["tanh", "none"]

# (leading dims of the input, K, N)
ALIGNED = [((64,), 128, 256), ((2, 48), 256, 512), ((512,), 1024, 2048)]
UNALIGNED = [((17,), 100, 256), ((33,), 128, 250), ((1,), 3, 17), ((127,), 127, 129)]
LAYOUTS = ["contiguous", "offset", "strided"]


def _place(t, layout):
    """The same values as `t`, laid out as asked: "offset" starts one element into its
    storage (a pointer cuBLASLt cannot take: not 16-byte aligned); "strided" is a
    non-contiguous view (every other element of a wider buffer)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "offset":
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out
    buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    out = buf[..., ::2]
    out.copy_(t)
    return out


def _inputs(lead, k, n, dtype, bias, layout="contiguous", seed=0):
    """x (*lead, K), w (N, K), b (N) or None, grad_out (*lead, N): float64 values rounded to
    dtype, on the GPU; pre-activations ~ N(0, 2), GeLU's curved range."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float64)  # noqa: E731
    x, w = rand(*lead, k), rand(n, k) / k**0.5
    b = rand(n) if bias else None
    grad_out = rand(*lead, n).to(dtype)
    place = lambda t: None if t is None else _place(t.to(dtype), layout).requires_grad_()  # noqa: E731
    return place(x), place(w), place(b), grad_out


def _run(fn, x, w, b, grad_out):
    """[output, dx, dw, (db)] of fn for the upstream gradient grad_out."""
    leaves = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, grad_out.to(y.dtype)))


def _composite(approximate):
    return lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approximate)


def _fused(approximate):
    return lambda x, w, b: ops.linear_bias_gelu(x, w, b, approximate)


def _takes_epilogue(k, n, dtype, approximate, layout="contiguous"):
    """Whether cuBLASLt's epilogue must run: fp16/bf16, tanh, N and K multiples of 8, and
    16-byte aligned operands (strided inputs are copied to packed ones first)."""
    return (approximate == "tanh" and dtype in (torch.float16, torch.bfloat16) and k % 8 == 0 and n % 8 == 0
            and layout != "offset")


def _paths_of(fn, *args):
    """fn(*args) and the paths the fused ops took meanwhile."""
    _C._reset_linear_gelu_paths()
    out = fn(*args)
    paths = {k: v for k, v in _C._linear_gelu_paths().items() if v}
    _C._reset_linear_gelu_paths()
    return out, paths


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def _float64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def _assert_within_twice_composite(got, plain, exact, dtype, names):
    for name, g, p, e in zip(names, got, plain, exact):
        assert g.dtype == dtype and g.shape == e.shape and g.device.type == "cuda", name
        floor = torch.finfo(dtype).eps * e.abs().max().item() * 0.5  # half an ulp of the largest value
        err, err_plain = _max_err(g, e), _max_err(p, e)
        assert err <= 2 * err_plain + floor, f"{name}: error {err:.3g} > 2 x composite error {err_plain:.3g}"


CASES = [(s, "contiguous") for s in ALIGNED + UNALIGNED] + [(ALIGNED[0], "offset"), (ALIGNED[1], "strided")]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0][0]))}-{c[0][1]}-{c[0][2]}-{c[1]}")
def test_forward_and_grads(case, dtype, bias, approximate):
    (lead, k, n), layout = case
    x, w, b, grad_out = _inputs(lead, k, n, dtype, bias, layout)
    got, paths = _paths_of(_run, _fused(approximate), x, w, b, grad_out)
    want = "forward_epilogue" if _takes_epilogue(k, n, dtype, approximate, layout) else "forward_general"
    assert paths == {want: 1}, paths
    plain = _run(_composite(approximate), x, w, b, grad_out)
    exact = _run(_composite(approximate), *_float64(x, w, b), grad_out.double())
    _assert_within_twice_composite(got, plain, exact, dtype, ["out", "dx", "dw", "db"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", [ALIGNED[1], UNALIGNED[1]], ids=["aligned", "unaligned"])
def test_split_ops_match_composite(shape, approximate, dtype):
    """fwd's pre-activation (the cuBLASLt aux output on the epilogue path), then B and W."""
    lead, k, n = shape
    x, w, b, grad_out = _inputs(lead, k, n, dtype, True)
    with torch.no_grad():
        out, pre = ops.linear_bias_gelu_fwd(x, w, b, approximate)
        grad_in, grad_pre, grad_b = ops.linear_bias_gelu_backward_input(grad_out, pre, w, approximate)
        grad_w = ops.linear_bias_gelu_backward_weight(grad_pre, x)

    def composite(x, w, b):
        p = F.linear(x, w, b)
        y = F.gelu(p, approximate=approximate)
        gx, gw, gb = torch.autograd.grad(y, [x, w, b], grad_out.to(y.dtype), retain_graph=True)
        (gp,) = torch.autograd.grad(y, [p], grad_out.to(y.dtype))
        return [y.detach(), p.detach(), gx, gp, gb, gw]

    plain = composite(x, w, b)
    exact = composite(*_float64(x, w, b))
    names = ["out", "pre_activation", "grad_input", "grad_pre_activation", "grad_bias", "grad_weight"]
    _assert_within_twice_composite([out, pre, grad_in, grad_pre, grad_b, grad_w], plain, exact, dtype, names)


@pytest.mark.parametrize("shape", [ALIGNED[0], UNALIGNED[0]], ids=["aligned", "unaligned"])
def test_opcheck(shape, dtype=torch.bfloat16):
    lead, k, n = shape
    x, w, b, grad_out = _inputs(lead, k, n, dtype, True)
    x, w, b = (t.detach() for t in (x, w, b))
    pre = F.linear(x, w, b)
    grad_pre = torch.randn_like(pre)
    t = torch.ops.tandem
    torch.library.opcheck(t.linear_bias_gelu.default, (x, w, b, "tanh"))
    with_grad = [v.clone().requires_grad_() for v in (x, w, b)]
    torch.library.opcheck(t.linear_bias_gelu.default, (*with_grad, "tanh"))
    torch.library.opcheck(t.linear_bias_gelu.default, (*with_grad[:2], None, "none"))
    torch.library.opcheck(t.linear_bias_gelu_fwd.default, (x, w, b, "tanh"))
    torch.library.opcheck(t.linear_bias_gelu_backward_input.default, (grad_out, pre, w, "tanh"))
    torch.library.opcheck(t.linear_bias_gelu_backward_weight.default, (grad_pre, x))


def test_module_matches_linear_gelu_on_cuda():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(256, 512), nn.GELU(approximate="tanh")).cuda().to(torch.bfloat16)
    fused = FusedLinearGELU(256, 512, approximate="tanh", device="cuda", dtype=torch.bfloat16)
    fused.load_state_dict({k.removeprefix("0."): v for k, v in ref.state_dict().items()})
    x = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(4, 32, 512, device="cuda", dtype=torch.bfloat16)
    got = [fused(x)] + list(torch.autograd.grad(fused(x), [x, fused.weight, fused.bias], grad_out))
    plain = [ref(x)] + list(torch.autograd.grad(ref(x), [x, ref[0].weight, ref[0].bias], grad_out))
    x64 = x.detach().double().requires_grad_()
    ref64 = nn.Sequential(nn.Linear(256, 512), nn.GELU(approximate="tanh")).cuda().double()
    ref64.load_state_dict(ref.state_dict())
    exact = [ref64(x64)] + list(torch.autograd.grad(ref64(x64), [x64, ref64[0].weight, ref64[0].bias],
                                                    grad_out.double()))
    got[0], plain[0], exact[0] = got[0].detach(), plain[0].detach(), exact[0].detach()
    _assert_within_twice_composite(got, plain, exact, torch.bfloat16, ["out", "dx", "dw", "db"])


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["fp32", "tf32"])
def test_float32_follows_torchs_matmul_precision(allow_tf32):
    """fp32 takes the general path (cuBLASLt's epilogue tanh is approximate): torch's own GEMM,
    as torch.backends.cuda.matmul.allow_tf32 tells it, then the exact GeLU: within twice the
    composite's error either way, and with TF32 its forward error is TF32's (10-bit
    mantissa), far above full fp32's."""
    before = torch.backends.cuda.matmul.allow_tf32
    x, w, b, grad_out = _inputs((256,), 512, 1024, torch.float32, True)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        full = _run(_fused("tanh"), x, w, b, grad_out)
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        got = _run(_fused("tanh"), x, w, b, grad_out)
        plain = _run(_composite("tanh"), x, w, b, grad_out)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    exact = _run(_composite("tanh"), *_float64(x, w, b), grad_out.double())
    _assert_within_twice_composite(got, plain, exact, torch.float32, ["out", "dx", "dw", "db"])
    if allow_tf32:
        assert _max_err(got[0], exact[0]) > 8 * _max_err(full[0], exact[0]), "the forward did not use TF32"


def test_float32_is_exact_and_follows_the_new_precision_api():
    """Items 5 and 9: fp32 never takes the approximate epilogue (its error stays fp32's, ~1e-6
    here, not the epilogue tanh's ~1e-4), and tandem never reads TF32 flags itself: after a
    mix of the legacy and the new API (torch.backends.cuda.matmul.fp32_precision, where
    torch's allow_tf32 getter raises), the fused op runs exactly where F.linear runs."""
    x, w, b, grad_out = _inputs((256,), 512, 1024, torch.float32, True)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        (got, _), paths = _paths_of(lambda: (ops.linear_bias_gelu(x, w, b).detach(), None))
        assert paths == {"forward_general": 1}, paths
        exact = F.gelu(F.linear(*_float64(x, w, b)), approximate="tanh")
        assert _max_err(got, exact) < 2e-5, _max_err(got, exact)
        if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            pytest.skip(f"torch {torch.__version__} has no fp32_precision API")
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new API only: a mixed state
        try:
            plain = F.gelu(F.linear(x, w, b), approximate="tanh")
        except RuntimeError as e:  # torch's own matmul refuses: tandem may refuse too
            with pytest.raises(RuntimeError):
                ops.linear_bias_gelu(x, w, b)
            pytest.skip(f"torch's own matmul refuses the mixed state: {e}")
        fused = ops.linear_bias_gelu(x, w, b)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)  # the same GEMM
        assert _max_err(fused, exact) > 8 * _max_err(got, exact), "the new API's TF32 was not used"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before  # the legacy setter sets both APIs


def test_fused_op_in_a_cuda_graph():
    """Item 8: cuBLASLt's workspace comes from torch's caching allocator, which serves a
    capture from the graph's private pool: the fused op (epilogue path) can be captured, and
    a replay equals the eager call on new inputs."""
    x, w, b, _ = _inputs((64,), 256, 512, torch.bfloat16, True)
    x, w, b = (t.detach() for t in (x, w, b))
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (heuristic, workspace)
        ops.linear_bias_gelu(static_x, w, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    _C._reset_linear_gelu_paths()
    with torch.cuda.graph(graph):
        static_out = ops.linear_bias_gelu(static_x, w, b)
    assert _C._linear_gelu_paths()["forward_epilogue"] == 1
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, ops.linear_bias_gelu(new_x, w, b))


def test_bad_input_on_cuda_raises_clearly():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="in_features"):
        ops.linear_bias_gelu(x, torch.randn(16, 9, device="cuda"))
    with pytest.raises(ValueError, match="cpu"):
        ops.linear_bias_gelu(x, torch.randn(16, 8))
    with pytest.raises(TypeError, match="dtype"):
        ops.linear_bias_gelu(x, torch.randn(16, 8, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("n2,n", [(256, 512), (250, 512), (256, 100)], ids=["aligned", "n2-unaligned", "n-unaligned"])
def test_linear_dgelu_bgrad_on_cuda(n2, n, approximate, dtype):
    """fc2's input gradient with fc1's GeLU backward and bias gradient: one cuBLASLt matmul
    with the DGELU_BGRAD epilogue where it applies (aligned, tanh), else the general path."""
    g = torch.Generator(device="cuda").manual_seed(5)
    pre64 = torch.randn(96, n, generator=g, device="cuda", dtype=torch.float64) * 1.4
    w64 = torch.randn(n2, n, generator=g, device="cuda", dtype=torch.float64) / n2**0.5
    grad64 = torch.randn(96, n2, generator=g, device="cuda", dtype=torch.float64)
    pre, w, grad = pre64.to(dtype), w64.to(dtype), grad64.to(dtype)

    def reference(p, wt, gr):
        p = p.detach().requires_grad_()
        F.linear(F.gelu(p, approximate=approximate), wt).backward(gr)
        return p.grad, p.grad.sum(0)

    exact = reference(*_float64(pre, w, grad))
    plain = reference(pre, w, grad)
    got, paths = _paths_of(ops.linear_dgelu_bgrad, grad, w, pre, approximate)
    epilogue = _takes_epilogue(n2, n, dtype, approximate)
    assert paths == {"dgelu_bgrad_epilogue" if epilogue else "dgelu_bgrad_general": 1}, paths
    _assert_within_twice_composite(got, plain, exact, dtype, ["grad_pre", "grad_bias"])
