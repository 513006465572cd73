"""row_parallel_linear and column_parallel_backward on CPU with gloo, against references.

The full layer (x [M, K], W [N, K], b [N]) is built identically on every rank; rank r holds
the tensor-parallel shards and the results are compared with the single-device layer.
"""

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks

K, N = 8, 6  # in_features (divisible by 2 and 4), out_features (divisible by 2; 4 -> 8 below)
TOKEN_SHAPES = [(7,), (2, 5), (1,), (0,)]  # token counts not divisible by chunks, fewer than chunks, none
CHUNKS = [1, 2, 3, 4]


def _full(dtype, m_shape, integer, seed=0, n=N, k=K):
    g = torch.Generator().manual_seed(seed)
    make = (lambda *s: torch.randint(-3, 4, s, generator=g).double()) if integer else \
        (lambda *s: torch.randn(*s, generator=g, dtype=torch.float64))
    return make(*m_shape, k).to(dtype), make(n, k).to(dtype), make(n).to(dtype)


def _k_shard(t, rank, n):
    """Columns of this rank: [..., K] -> [..., K/tp]."""
    kp = t.shape[-1] // n
    return t[..., rank * kp:(rank + 1) * kp].contiguous()


def _plain_row_parallel(x_r, w_r, b):
    """The non-overlapped computation: one GEMM, one torch.distributed all-reduce, + bias."""
    y = x_r @ w_r.t()  # (..., K/tp) @ (K/tp, N) -> (..., N), then all-reduce over tp
    dist.all_reduce(y)
    return y + b


def _check_forward_exact(comm, rank, n):
    from tandem.comm import row_parallel_linear

    for m_shape in TOKEN_SHAPES:
        x, w, b = _full(torch.float32, m_shape, integer=True)  # integer values: every sum is exact
        x_r, w_r = _k_shard(x, rank, n), _k_shard(w, rank, n)
        want = (x.double() @ w.double().t() + b.double()).float()
        for chunks in CHUNKS:
            got = row_parallel_linear(x_r, w_r, b, comm, chunks=chunks)
            assert got.shape == (*m_shape, N)
            assert torch.equal(got, want), (m_shape, chunks)
        assert torch.equal(_plain_row_parallel(x_r, w_r, b), want)


def _check_forward_random(comm, rank, n):
    from tandem.comm import row_parallel_linear

    x, w, b = _full(torch.float32, (3, 5), integer=False, seed=1)
    x_r, w_r = _k_shard(x, rank, n), _k_shard(w, rank, n)
    want = x.double() @ w.double().t() + b.double()
    one = row_parallel_linear(x_r, w_r, b, comm, chunks=1)
    for chunks in CHUNKS:
        got = row_parallel_linear(x_r, w_r, b, comm, chunks=chunks)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        if n == 2:  # two addends: the all-reduce's order cannot differ, so chunking is exact
            assert torch.equal(got, one), chunks
    torch.testing.assert_close(row_parallel_linear(x_r, w_r, None, comm, chunks=2).double(), want - b.double(),
                               rtol=1e-5, atol=1e-5)

    # bf16: error against float64 at most twice that of the plain bf16 computation
    xb, wb, bb = (t.to(torch.bfloat16) for t in (x, w, b))
    xb_r, wb_r = _k_shard(xb, rank, n), _k_shard(wb, rank, n)
    ref = xb.double() @ wb.double().t() + bb.double()
    plain_err = (_plain_row_parallel(xb_r, wb_r, bb).double() - ref).abs().max().item()
    for chunks in CHUNKS:
        err = (row_parallel_linear(xb_r, wb_r, bb, comm, chunks=chunks).double() - ref).abs().max().item()
        assert err <= 2 * plain_err + 1e-6, (chunks, err, plain_err)


def _check_row_grads(comm, rank, n):
    from tandem.comm import row_parallel_linear

    x, w, b = _full(torch.float64, (2, 3), integer=False, seed=2)
    grad_out = torch.randn(2, 3, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xf, wf, bf = (t.clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(xf, wf, bf).backward(grad_out)
    for chunks in (1, 3):
        x_r, w_r = (_k_shard(t, rank, n).requires_grad_() for t in (x, w))
        b_r = b.clone().requires_grad_()
        row_parallel_linear(x_r, w_r, b_r, comm, chunks=chunks).backward(grad_out)
        torch.testing.assert_close(x_r.grad, _k_shard(xf.grad, rank, n))
        torch.testing.assert_close(w_r.grad, _k_shard(wf.grad, rank, n))
        torch.testing.assert_close(b_r.grad, bf.grad)


def _check_column_backward(comm, rank, n):
    from tandem.comm import column_parallel_backward, column_parallel_linear

    n_full = 2 * n  # output features, split by rows of W over tp
    x, w, b = _full(torch.float64, (2, 3), integer=False, seed=5, n=n_full)
    g = torch.randn(2, 3, n_full, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rows = slice(rank * 2, rank * 2 + 2)
    w_r, b_r, g_r = w[rows].contiguous(), b[rows].contiguous(), g[..., rows].contiguous()

    grad_input, grad_weight, grad_bias = column_parallel_backward(g_r, x, w_r, comm)
    torch.testing.assert_close(grad_input, g @ w)  # (2, 3, N) @ (N, K): summed over tp
    torch.testing.assert_close(grad_weight, g_r.reshape(-1, 2).t() @ x.reshape(-1, K))
    torch.testing.assert_close(grad_bias, g_r.sum((0, 1)))
    gi, gw, gb = column_parallel_backward(g_r, x, w_r, comm, weight_grad=False, bias_grad=False)
    assert gw is None and gb is None
    torch.testing.assert_close(gi, grad_input)

    xf, wf, bf = (t.clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(xf, wf, bf).backward(g)
    xc, wc, bc = x.clone().requires_grad_(), w_r.clone().requires_grad_(), b_r.clone().requires_grad_()
    out = column_parallel_linear(xc, wc, bc, comm)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w_r, b_r))
    out.backward(g_r)
    torch.testing.assert_close(xc.grad, xf.grad)
    torch.testing.assert_close(wc.grad, wf.grad[rows])
    torch.testing.assert_close(bc.grad, bf.grad[rows])


def _check_bad_input(comm, rank, n):
    from tandem.comm import column_parallel_backward, row_parallel_linear

    x, w, b = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(5)
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        row_parallel_linear(x, w, b, comm, chunks=0)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        row_parallel_linear(x, b, None, comm)
    with pytest.raises(ValueError, match=r"does not end in in_features=3"):
        row_parallel_linear(x, torch.zeros(5, 3), b, comm)
    with pytest.raises(TypeError, match="differs from weight dtype"):
        row_parallel_linear(x.double(), w, b, comm)
    with pytest.raises(ValueError, match="bias shape"):
        row_parallel_linear(x, w, torch.zeros(4), comm)
    with pytest.raises(TypeError, match="floating point"):
        row_parallel_linear(x.long(), w.long(), None, comm)
    with pytest.raises(ValueError, match="same device"):
        row_parallel_linear(x.to("meta"), w.to("meta"), None, comm)
    with pytest.raises(TypeError, match="Communicator"):
        row_parallel_linear(x, w, b, comm._impl)
    with pytest.raises(ValueError, match=r"grad_output shape \[3, 4\] must be input's leading dims \+ \[5\]"):
        column_parallel_backward(torch.zeros(3, 4), x, w, comm)


def _world(rank, n):
    from tandem.comm import Communicator

    comm = Communicator(dist.group.WORLD, "cpu", timeout=30.0)
    _check_forward_exact(comm, rank, n)
    _check_forward_random(comm, rank, n)
    _check_row_grads(comm, rank, n)
    _check_column_backward(comm, rank, n)
    _check_bad_input(comm, rank, n)
    dist.barrier()
    return rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_overlap_ops_gloo(world_size):
    assert run_ranks(world_size, _world, timeout=90) == list(range(world_size))
