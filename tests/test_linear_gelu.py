"""tandem.ops.linear_bias_gelu and its split backward on CPU, against F.gelu(F.linear(...))."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tandem
from tandem import ops
from tandem.nn import FusedLinearGELU

APPROX = ["tanh", "none"]
LOW = [torch.bfloat16, torch.float16]


def _reference(x, w, b, approximate):
    return F.gelu(F.linear(x, w, b), approximate=approximate)


def _inputs(shape, k, n, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(w), cast(b)


def _run(fn, x, w, b, grad_out):
    """Output and (dx, dw, db) of fn for the given upstream gradient."""
    leaves = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b)
    grads = torch.autograd.grad(y, leaves, grad_out.to(y.dtype))
    return [y.detach()] + [g for g in grads]


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


SHAPES = [((1,), 1, 1), ((3,), 17, 3), ((17,), 127, 17), ((2, 3), 17, 127), ((4, 5), 64, 48)]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,k,n", SHAPES)
def test_matches_composite_fp32_fp64(shape, k, n, bias, approximate):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        x, w, b = _inputs(shape, k, n, dtype, bias)
        grad_out = torch.randn(*shape, n, dtype=torch.float64)
        fused = _run(lambda *a: ops.linear_bias_gelu(*a, approximate=approximate), x, w, b, grad_out)
        ref = _run(lambda *a: _reference(*a, approximate), x, w, b, grad_out)
        for got, want in zip(fused, ref):
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape,k,n", [((3,), 17, 3), ((2, 3), 127, 17), ((8, 4), 64, 96)])
def test_low_precision_error_at_most_twice_composite(shape, k, n, dtype, approximate):
    """Error against a float64 reference <= 2x the error of the plain PyTorch composite."""
    x, w, b = _inputs(shape, k, n, dtype)
    grad_out = torch.randn(*shape, n, dtype=torch.float64).to(dtype)
    fused = _run(lambda *a: ops.linear_bias_gelu(*a, approximate=approximate), x, w, b, grad_out)
    comp = _run(lambda *a: _reference(*a, approximate), x, w, b, grad_out)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    exact = _run(lambda *a: _reference(*a, approximate), x64, w64, b64, grad_out.double())
    for name, got, plain, want in zip(["out", "dx", "dw", "db"], fused, comp, exact):
        assert got.dtype == dtype
        floor = torch.finfo(dtype).eps * want.abs().max().item() * 0.5  # half an ulp of the largest value
        assert _max_err(got, want) <= 2 * _max_err(plain, want) + floor, name


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 6, 5, generator=g).transpose(0, 2)  # (5, 6, 17), non-contiguous
    w = torch.randn(17, 9, generator=g).t()  # (9, 17), non-contiguous
    b = torch.randn(18, generator=g)[::2]  # (9,), strided
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    for approximate in APPROX:
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        grad_out = torch.randn(5, 6, 9, generator=g)
        fused = _run(lambda *a: ops.linear_bias_gelu(*a, approximate=approximate), xs, ws, bs, grad_out)
        ref = _run(lambda *a: _reference(*a, approximate), xs, ws, bs, grad_out)
        for got, want in zip(fused, ref):
            torch.testing.assert_close(got, want)


def test_inference_path_matches_training_path():
    x, w, b = _inputs((4, 3), 33, 40, torch.float32)
    with torch.no_grad():
        y_infer = ops.linear_bias_gelu(x, w, b)
    y_train = ops.linear_bias_gelu(x, w, b)
    assert y_train.requires_grad and not y_infer.requires_grad
    torch.testing.assert_close(y_infer, y_train.detach(), rtol=0, atol=0)


def test_split_backward_equals_autograd():
    """B then W (as a zero-bubble schedule runs them) gives autograd's gradients."""
    x, w, b = _inputs((6, 5), 24, 40, torch.float64)
    grad_out = torch.randn(6, 5, 40, dtype=torch.float64)
    y, pre = ops.linear_bias_gelu_fwd(x.detach(), w.detach(), b.detach(), "none")
    torch.testing.assert_close(pre, F.linear(x, w, b).detach())
    grad_input, grad_pre, grad_bias = ops.linear_bias_gelu_backward_input(grad_out, pre, w.detach(), "none")
    grad_weight = ops.linear_bias_gelu_backward_weight(grad_pre, x.detach())
    ref = _run(lambda *a: _reference(*a, "none"), x, w, b, grad_out)
    for got, want in zip([y, grad_input, grad_weight, grad_bias], ref):
        torch.testing.assert_close(got, want)


def test_empty_batch():
    x, w, b = _inputs((0,), 8, 4, torch.float32)
    y = ops.linear_bias_gelu(x, w, b)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert w.grad.abs().sum() == 0 and b.grad.abs().sum() == 0


def _op_samples():
    x, w, b = _inputs((3, 5), 7, 6, torch.float64, seed=3)
    for t in (x, w, b):
        t.requires_grad_(False)
    pre = F.linear(x, w, b)
    g = torch.randn(3, 5, 6, dtype=torch.float64)
    return [
        (torch.ops.tandem.linear_bias_gelu.default, (x, w, b, "tanh")),
        (torch.ops.tandem.linear_bias_gelu.default, (x.requires_grad_(), w.requires_grad_(), None, "none")),
        (torch.ops.tandem.linear_bias_gelu_fwd.default, (x.detach(), w.detach(), b, "tanh")),
        (torch.ops.tandem.linear_bias_gelu_backward_input.default, (g, pre, w.detach(), "none")),
        (torch.ops.tandem.linear_bias_gelu_backward_weight.default, (g, x.detach())),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    op, args = _op_samples()[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("approximate,bias", list(itertools.product(APPROX, [True, False])))
def test_gradcheck_float64(approximate, bias):
    x, w, b = _inputs((2, 3), 5, 4, torch.float64, bias=bias, seed=4)
    args = (x, w, b) if bias else (x, w)
    fn = (lambda x, w, b: ops.linear_bias_gelu(x, w, b, approximate)) if bias else (
        lambda x, w: ops.linear_bias_gelu(x, w, None, approximate))
    assert torch.autograd.gradcheck(fn, args)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(FusedLinearGELU(16, 32), nn.Linear(32, 8))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 16)
    y_ref = model(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), list(model.parameters()))
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((torch.randn(2, 5), torch.randn(3, 4), None), ValueError, r"input shape \[2, 5\] has 5 features.*\[3, 4\].*in_features=4"),
        ((torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64), None), TypeError, "input dtype Float differs from weight dtype Double"),
        ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(5)), ValueError, r"bias shape \[5\] does not match out_features=3"),
        ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, dtype=torch.float64)), TypeError, "bias dtype Double"),
        ((torch.randn(2, 4), torch.randn(12), None), ValueError, "weight must be 2-D"),
        ((torch.ones(2, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64), None), TypeError, "dtype must be float32"),
    ],
)
def test_bad_input_is_a_clear_error(args, exc, match):
    with pytest.raises(exc, match=match):
        ops.linear_bias_gelu(*args)


def test_bad_approximate_and_device():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match='approximate must be "tanh" or "none".*got "sigmoid"'):
        ops.linear_bias_gelu(x, w, None, "sigmoid")
    with pytest.raises(ValueError, match="approximate"):
        FusedLinearGELU(4, 3, approximate="fast")
    with pytest.raises((ValueError, RuntimeError), match="is on"):
        ops.linear_bias_gelu(x, w.to("meta"))


@pytest.mark.parametrize("approximate", APPROX)
def test_module_is_drop_in_for_linear_gelu(approximate):
    torch.manual_seed(7)
    fused = FusedLinearGELU(12, 20, approximate=approximate)
    torch.manual_seed(7)
    plain = nn.Sequential(nn.Linear(12, 20), nn.GELU(approximate=approximate))
    torch.testing.assert_close(fused.weight, plain[0].weight)  # same seeded initialisation
    plain[0].load_state_dict(fused.state_dict())  # and state dicts load both ways
    fused.load_state_dict(plain[0].state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(fused(x), plain(x))
    assert dict(fused.named_parameters()).keys() == dict(plain[0].named_parameters()).keys()
    no_bias = FusedLinearGELU(12, 20, bias=False)
    assert no_bias.bias is None and "bias=False" in repr(no_bias)


def test_build_info():
    info = tandem.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "cuda_version", "nccl_version", "torch_version"}
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if torch.version.cuda is not None and info["cuda"]:
        assert info["cuda_archs"] and info["nccl_version"].count(".") == 2
        assert info["cuda_version"].startswith(torch.version.cuda.split(".")[0] + ".")


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_shared_gelu_formulas_match_torch(approximate, dtype):
    """The formulas the CUDA kernels run (gelu_math.h), compiled for CPU, against torch."""
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    want = F.gelu(x, approximate=approximate)
    xg = x.clone().requires_grad_()
    F.gelu(xg, approximate=approximate).sum().backward()
    got = torch.ops.tandem._gelu_formula(x.to(dtype), approximate, False)
    dgot = torch.ops.tandem._gelu_formula(x.to(dtype), approximate, True)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double(), F.gelu(x.to(dtype).double(), approximate=approximate), rtol=tol, atol=tol)
    xd = x.to(dtype).double().requires_grad_()
    F.gelu(xd, approximate=approximate).sum().backward()
    torch.testing.assert_close(dgot.double(), xd.grad, rtol=tol, atol=tol)
    assert want.shape == got.shape and xg.grad.shape == dgot.shape


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_dgelu_bgrad_matches_autograd(approximate, dtype):
    """fc2's input gradient, fc1's GeLU backward and fc1's bias gradient in one op."""
    g = torch.Generator().manual_seed(9)
    pre = torch.randn(3, 5, 24, generator=g, dtype=dtype, requires_grad=True)  # fc1's pre-activation
    w2 = torch.randn(16, 24, generator=g, dtype=dtype)  # fc2: 24 -> 16
    grad_out = torch.randn(3, 5, 16, generator=g, dtype=dtype)
    F.linear(F.gelu(pre, approximate=approximate), w2).backward(grad_out)
    grad_pre, grad_bias = ops.linear_dgelu_bgrad(grad_out, w2, pre.detach(), approximate)
    torch.testing.assert_close(grad_pre, pre.grad)
    torch.testing.assert_close(grad_bias, pre.grad.sum((0, 1)))
    torch.library.opcheck(torch.ops.tandem.linear_dgelu_bgrad.default, (grad_out, w2, pre.detach(), approximate))
    with pytest.raises(ValueError, match=r"pre_activation shape \[3, 5, 7\] must be grad_output's leading dims"):
        ops.linear_dgelu_bgrad(grad_out, w2, pre.detach()[..., :7], approximate)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_parallel_mlp_fused_backward_matches_composite(activation):
    """ParallelMLP's fused backward (linear_dgelu_bgrad) against nn.Linear -> GELU -> nn.Linear."""
    from tandem.mesh import Mesh
    from tandem.nn import ParallelMLP

    torch.manual_seed(0)
    mlp = ParallelMLP(12, 40, activation=activation, mesh=Mesh.single())
    plain = nn.Sequential(nn.Linear(12, 40), nn.GELU("tanh" if activation == "gelu_tanh" else "none"),
                          nn.Linear(40, 12))
    plain.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in mlp.state_dict().items()})
    x = torch.randn(2, 7, 12)
    grad_out = torch.randn(2, 7, 12)
    got = _run(lambda x, *_: mlp(x), x.clone().requires_grad_(), None, None, grad_out)
    want = _run(lambda x, *_: plain(x), x.clone().requires_grad_(), None, None, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    (mlp(x) * grad_out).sum().backward()
    (plain(x) * grad_out).sum().backward()
    for name, p in mlp.named_parameters():
        q = dict(plain.named_parameters())[name.replace("fc1", "0").replace("fc2", "2")]
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
