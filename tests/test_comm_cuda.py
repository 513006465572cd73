"""The NCCL backend on one GPU (skipped without CUDA): world size 1 collectives, send/recv
to self inside a group, the comm stream ordered without host synchronisation, the overlap
ops in bf16 against a float64 reference, abort. Two-GPU cases are marked multigpu.
"""

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_ranks

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def group():
    """A world of one rank in this process (gloo carries the ncclUniqueId)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def comm(group):
    from tandem.comm import Communicator

    return Communicator(group, "cuda", timeout=60.0)


def test_nccl_world1_collectives(comm):
    assert comm.backend == "nccl" and (comm.rank, comm.size) == (0, 1)
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        t = torch.arange(12, device="cuda").to(dtype).view(3, 4)
        want = t.clone()
        comm.all_reduce(t).wait()  # one rank: the sum is the tensor itself
        comm.all_reduce(t, op="max").wait()
        out = torch.empty(3, 4, dtype=dtype, device="cuda")
        comm.all_gather(out, t).wait()
        rs = torch.empty(3, 4, dtype=dtype, device="cuda")
        comm.reduce_scatter(rs, t).wait()
        torch.cuda.synchronize()
        assert torch.equal(t, want) and torch.equal(out, want) and torch.equal(rs, want), dtype


def test_nccl_send_recv_to_self_inside_a_group(comm):
    a = torch.randn(1000, device="cuda")
    b = torch.randn(257, dtype=torch.bfloat16, device="cuda")
    a_back, b_back = torch.empty_like(a), torch.empty_like(b)
    works = comm.batch_p2p([("send", a, 0), ("send", b, 0), ("recv", a_back, 0), ("recv", b_back, 0)])
    assert len(works) == 4
    for w in works:
        w.wait()
    assert torch.equal(a_back, a) and torch.equal(b_back, b)
    with pytest.raises(ValueError, match="send to this rank"):
        comm.send(a, 0)  # alone it could never complete


def test_host_does_not_wait_for_the_gpu(comm):
    """wait() orders the current stream after the comm stream; the host returns at once."""
    t = torch.ones(1 << 20, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time on the current stream, queued first
    start = time.monotonic()
    w = comm.all_reduce(t)  # the comm stream waits for the sleep (an event, not the host)
    w.wait()
    t.mul_(3)  # queued after the all-reduce on the current stream
    host = time.monotonic() - start
    assert not w.is_completed(), "the all-reduce finished before the GPU sleep could have"
    assert host < 0.2, f"the host waited {host:.3f} s: a hidden synchronisation"
    w.synchronize(timeout=30)
    torch.cuda.synchronize()
    assert torch.equal(t, torch.full_like(t, 3.0))


def test_overlap_ops_bf16_against_float64(comm):
    from tandem.comm import column_parallel_backward, row_parallel_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    m, k, n = 1000, 512, 768  # 1000 tokens: not divisible by 3
    x, w, b = (torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16) for s in ((m, k), (n, k), (n,)))
    ref = x.double() @ w.double().t() + b.double()
    plain_err = (F.linear(x, w, b).double() - ref).abs().max().item()
    for chunks in (1, 2, 3, 4):
        out = row_parallel_linear(x, w, b, comm, chunks=chunks)
        err = (out.double() - ref).abs().max().item()
        assert err <= 2 * plain_err, (chunks, err, plain_err)

    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    gy = torch.randn(m, n, device="cuda", generator=g, dtype=torch.bfloat16)
    row_parallel_linear(xr, wr, br, comm, chunks=3).backward(gy)
    ref_gx, ref_gw = gy.double() @ w.double(), gy.double().t() @ x.double()
    plain_gx, plain_gw = gy @ w, gy.t() @ x
    for got, plain, want in ((xr.grad, plain_gx, ref_gx), (wr.grad, plain_gw, ref_gw)):
        assert (got.double() - want).abs().max() <= 2 * (plain.double() - want).abs().max()
    torch.testing.assert_close(br.grad.double(), gy.double().sum(0), rtol=2e-2, atol=2e-1)

    gx, gw, gb = column_parallel_backward(gy, x, w, comm)  # dgrad all-reduce || wgrad GEMM
    assert (gx.double() - ref_gx).abs().max() <= 2 * (plain_gx.double() - ref_gx).abs().max()
    assert (gw.double() - ref_gw).abs().max() <= 2 * (plain_gw.double() - ref_gw).abs().max()


def test_fork_and_stage_link_on_one_gpu(comm):
    from tandem.comm import StageLink

    child = comm.fork()  # ncclCommSplit, own stream
    t = torch.full((5,), 2.0, device="cuda")
    child.all_reduce(t).wait()
    torch.cuda.synchronize()
    assert torch.equal(t, torch.full((5,), 2.0, device="cuda"))
    link = StageLink(comm, None, None, shapes="static", timeout=10.0)  # a single stage: two forks
    with pytest.raises(ValueError, match="this is the last stage"):
        link.send_forward(t)


def test_abort_makes_later_calls_raise(group):
    from tandem.comm import CommError, Communicator

    c = Communicator(group, "cuda", timeout=30.0)
    c.abort()
    with pytest.raises(CommError, match="rank 0 of 1: the communicator was aborted"):
        c.all_reduce(torch.ones(2, device="cuda"))


def test_close_and_abort_from_another_thread(group):
    import threading

    from tandem.comm import CommError, Communicator

    c = Communicator(group, "cuda", timeout=30.0)
    t = torch.ones(1 << 20, device="cuda")
    c.all_reduce(t).wait()
    c.close(timeout=10.0)  # finalize + destroy: the pending all-reduce is flushed first
    torch.cuda.synchronize()
    assert torch.equal(t, torch.ones_like(t))
    with pytest.raises(CommError, match="rank 0 of 1: all_reduce.*: the communicator was closed"):
        c.all_reduce(t)
    d = Communicator(group, "cuda", timeout=30.0)
    done = threading.Event()
    threading.Thread(target=lambda: (d.abort(), done.set())).start()
    assert done.wait(5.0), "abort() from another thread did not return"
    with pytest.raises(CommError, match="aborted"):
        d.all_reduce(t)


def test_p2p_moves_any_dtype_and_collectives_name_unsupported_ones(comm):
    """Item 4: point-to-point moves bytes (int16, complex, float8 included), as StageLink
    accepts them; a collective names a dtype NCCL cannot reduce. (StageLink with int16
    between two GPUs: the multigpu test.)"""
    tensors = [torch.arange(-7, 8, dtype=torch.int16, device="cuda"),
               torch.randn(5, 3, dtype=torch.complex64, device="cuda"),
               torch.randn(33, device="cuda").to(torch.float8_e4m3fn)]
    back = [torch.empty_like(t) for t in tensors]
    works = comm.batch_p2p([("send", t, 0) for t in tensors] + [("recv", r, 0) for r in back])
    for w in works:
        w.wait()
    torch.cuda.synchronize()
    for t, r in zip(tensors, back):
        assert torch.equal(t.view(torch.uint8), r.view(torch.uint8)), t.dtype
    with pytest.raises(TypeError, match="dtype .* has no NCCL reduction type"):
        comm.all_reduce(torch.ones(4, dtype=torch.int16, device="cuda"))


def test_nccl_refuses_cuda_graph_capture(comm):
    """Item 8: tandem's NCCL work is watched from the host (events, watchdog, deadlines); a
    capture would bypass that, so enqueueing or waiting while capturing raises clearly."""
    from tandem.comm import CommError

    t = torch.ones(16, device="cuda")
    done = comm.all_reduce(t)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(CommError, match="capturing a CUDA graph"):
        with torch.cuda.graph(graph):
            comm.all_reduce(t)
    with pytest.raises(CommError, match="capturing a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            done.wait()
    comm.all_reduce(t).synchronize(timeout=30)  # still usable outside a capture


def test_release_drains_before_destroying(group):
    """Item 2: releasing (dropping) a healthy communicator waits for its queued work instead of
    cancelling it (its peers would hang); later calls raise."""
    from tandem.comm import CommError, Communicator

    c = Communicator(group, "cuda", timeout=30.0)
    t = torch.ones(1 << 20, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU time before the all-reduce can run
    c.all_reduce(t).wait()
    t.mul_(2)
    start = time.monotonic()
    c.release()
    took = time.monotonic() - start
    torch.cuda.synchronize()
    assert took > 0.1, f"release returned after {took:.3f} s: it did not wait for the queued all-reduce"
    assert torch.equal(t, torch.full_like(t, 2.0))
    with pytest.raises(CommError, match="the communicator was released"):
        c.all_reduce(t)


def test_watchdog_abort_poisons_the_group_and_abort_all_is_prompt(group):
    """Items 6 and 1: an operation past its deadline (here: queued behind 2 s of GPU work,
    with a 0.5 s timeout) is aborted by its fork's watchdog; the parent then raises on its
    next call, check and synchronize. abort_all revokes a communicator and its forks, then
    aborts them (on the real NCCL: no error, later calls raise)."""
    from tandem import build_info
    from tandem.comm import CommError, Communicator, abort_all

    c = Communicator(group, "cuda", timeout=30.0)
    fork = c.fork(timeout=0.5)
    t = torch.ones(1024, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(4_000_000_000)  # ~2 s
    fork.all_reduce(t).wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            c.check()
        except CommError as e:
            assert "a communicator of this group failed before" in str(e) and "timed out" in str(e), e
            break
        time.sleep(0.05)
    else:
        pytest.fail("the watchdog did not abort the late operation")
    with pytest.raises(CommError, match="failed before"):
        c.synchronize(timeout=10)
    torch.cuda.synchronize()
    d = Communicator(group, "cuda", timeout=30.0)
    forks = [d.fork(), d.fork()]
    forks[0].all_reduce(t).synchronize(timeout=30)
    start = time.monotonic()
    abort_all([d])
    took = time.monotonic() - start
    assert took < 1.0, f"abort_all took {took:.2f} s (ncclCommRevoke: {build_info()['nccl_revoke']})"
    for x in [d] + forks:
        with pytest.raises(CommError, match="aborted"):
            x.all_reduce(t)
    torch.cuda.synchronize()


def _two_gpus(rank, n):
    from tandem.comm import Communicator, StageLink, row_parallel_linear

    torch.cuda.set_device(rank)
    comm = Communicator(dist.group.WORLD, f"cuda:{rank}", timeout=60.0)
    t = torch.full((1 << 16,), float(rank + 1), device="cuda")
    comm.all_reduce(t).wait()
    assert torch.equal(t, torch.full_like(t, 3.0))
    link = StageLink(comm, None if rank == 0 else 0, 1 if rank == 0 else None, shapes="static", timeout=30.0)
    for mb in range(3):
        if rank == 0:
            g = link.send_forward_recv_backward(torch.full((64, 128), float(mb), device="cuda"))
            assert torch.equal(g, torch.full_like(g, -float(mb)))
        else:
            x = link.recv_forward()
            link.send_backward(-x)
    link.wait_sends()
    # a receive posted behind queued compute lands while that compute still runs (its
    # buffer comes from the comm stream, so it does not wait for the caller's stream)
    if rank == 1:
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time on the current stream
        handle = link.irecv_forward()
        dist.barrier()  # the sender starts after the receive is posted
        deadline = time.monotonic() + 30
        while not handle.is_completed() and time.monotonic() < deadline:
            time.sleep(0.001)
        landed_early = handle.is_completed() and not torch.cuda.current_stream().query()
        x = handle.wait()  # the current stream waits for the receive; x is read on it
        assert torch.equal(x, torch.full_like(x, 7.0))
        assert landed_early, "the early receive waited for the compute queued before it"
    else:
        dist.barrier()
        link.send_forward(torch.full((64, 128), 7.0, device="cuda"))
        link.wait_sends()

    # a new link's first receive, posted long before the peer's first send, returns at once:
    # building the link connected its forks (NCCL sets a pair up at its first send/recv)
    fresh = StageLink(comm, None if rank == 0 else 0, 1 if rank == 0 else None, shapes="static", timeout=30.0)
    if rank == 0:
        t0 = time.monotonic()
        handle = fresh.irecv_backward()
        posting = time.monotonic() - t0
        g = handle.wait()
        assert torch.equal(g, torch.full_like(g, 5.0))
        assert posting < 0.5, f"posting the first receive took {posting:.2f} s"
    else:
        time.sleep(2.0)
        fresh.send_backward(torch.full((64, 128), 5.0, device="cuda"))
        fresh.wait_sends()

    # point-to-point moves bytes: int16 (which NCCL cannot reduce) crosses a StageLink
    dyn = StageLink(comm, None if rank == 0 else 0, 1 if rank == 0 else None, shapes="dynamic", timeout=30.0)
    shorts = torch.arange(-300, 300, dtype=torch.int16, device="cuda").view(20, 30)
    if rank == 0:
        dyn.send_forward(shorts)
        dyn.wait_sends()
    else:
        got = dyn.recv_forward()
        assert got.dtype == torch.int16 and torch.equal(got, shorts)

    def shard(r):  # rank r's x [37, K/tp] and w [32, K/tp]
        gen = torch.Generator(device="cuda").manual_seed(r)
        return torch.randn(37, 64, device="cuda", generator=gen), torch.randn(32, 64, device="cuda", generator=gen)

    x, w = shard(rank)
    got = row_parallel_linear(x, w, None, comm, chunks=3)
    want = sum(a.double() @ b.double().t() for a, b in map(shard, range(n)))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    return got.cpu()


@pytest.mark.multigpu
def test_nccl_two_gpus_collectives_stage_link_overlap():
    a, b = run_ranks(2, _two_gpus, timeout=120)
    torch.testing.assert_close(a, b)  # the all-reduced output is the same on both ranks


def _abort_with_a_silent_peer(rank, n):
    """Rank 1's compute stream waits for a forward receive that rank 0 never sends; a backward
    send (another fork) is queued behind that stream. StageLink.abort() must return at once
    (all forks revoked first), not when the receive's watchdog fires (60 s)."""
    from tandem.comm import CommError, Communicator, StageLink

    torch.cuda.set_device(rank)
    comm = Communicator(dist.group.WORLD, f"cuda:{rank}", timeout=60.0)
    link = StageLink(comm, None if rank == 0 else 0, 1 if rank == 0 else None, shapes="static", timeout=60.0)
    took = None
    if rank == 0:
        link.send_forward(torch.ones(8, device="cuda"))  # agrees the static shape; no more follow
        link.wait_sends()
    else:
        link.recv_forward()
        handle = link.irecv_forward()  # agreed shape: no header, so the host does not wait
        x = handle.wait()  # the current stream waits; the host does not
        link.send_backward(torch.ones(8, device="cuda"))  # its comm stream waits for the current stream
        time.sleep(0.5)
        start = time.monotonic()
        link.abort()
        took = time.monotonic() - start
        with pytest.raises(CommError, match="aborted"):
            link.send_backward(x)
    dist.barrier()  # gloo: rank 0 stays until rank 1 measured (its link then released unused)
    return took


@pytest.mark.multigpu
def test_stage_link_abort_returns_at_once_with_a_silent_peer():
    _, took = run_ranks(2, _abort_with_a_silent_peer, timeout=120)
    assert took < 1.0, f"StageLink.abort() took {took:.2f} s"
