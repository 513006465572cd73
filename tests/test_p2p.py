"""StageLink on CPU with gloo: dynamic shapes around a ring, static shapes along a pipeline,
pp=2 with both directions in flight, bad input, timeouts, and a peer that dies.
"""

import os
import queue as queue_mod
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed import run_ranks

SHORT = 0.5  # seconds: timeouts that are meant to fire
SLACK = 2.0  # seconds: how much later than its timeout an error may surface


def _payload(sender, step, salt=0):
    """A tensor of random sender/step-dependent shape and dtype that the receiver can recompute."""
    g = torch.Generator().manual_seed(7919 * sender + 31 * step + salt)
    ndim = int(torch.randint(0, 5, (1,), generator=g))
    shape = tuple(int(s) for s in torch.randint(0, 6, (ndim,), generator=g))
    dtype = (torch.float32, torch.bfloat16, torch.int64, torch.float64)[int(torch.randint(0, 4, (1,), generator=g))]
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def _check_dynamic_ring(comm, rank, n):
    from tandem.comm import StageLink

    prv, nxt = (rank - 1) % n, (rank + 1) % n
    link = StageLink(comm, prv, nxt, shapes="dynamic", timeout=30.0)
    for step in range(6):
        link.send_forward(_payload(rank, step))
        got, want = link.recv_forward(), _payload(prv, step)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (step, got, want)
        link.send_backward(_payload(rank, step, salt=1))
        assert torch.equal(link.recv_backward(), _payload(nxt, step, salt=1))
    link.wait_sends()
    assert link.pending_sends == 0


def _check_static_pipeline(comm, rank, n):
    """Stages 0 -> 1 -> ... -> n-1: forward adds 1 per stage, the last stage sends 2*y back."""
    from tandem.comm import StageLink

    first, last = rank == 0, rank == n - 1
    link = StageLink(comm, None if first else rank - 1, None if last else rank + 1, shapes="static", timeout=30.0)
    ptrs = set()
    for mb in range(4):
        x = torch.full((3, 5), float(mb)) if first else link.recv_forward()
        if not first:
            ptrs.add(x.data_ptr())
        assert torch.equal(x, torch.full((3, 5), float(mb + rank))), (mb, x)
        y = x + 1
        g = 2 * y if last else link.send_forward_recv_backward(y)
        assert torch.equal(g, torch.full((3, 5), 2.0 * (mb + n))), (mb, g)
        if not first:
            link.send_backward(g)
        del x, g
    link.wait_sends()
    if not first:  # receive buffers come back once the caller lets go of them
        assert len(ptrs) < 4, ptrs

    # a later tensor of another shape: a clear error on the sender and on its peer, which
    # learns it from the error board long before its timeout
    mismatch = (r"stage 0: send_forward to stage 1\): tensor float32\[3, 6\] does not "
                r"match the static shape agreed on first use, float32\[3, 5\]")
    if rank == 0:
        with pytest.raises(ValueError, match=mismatch):
            link.send_forward(torch.zeros(3, 6))
    elif rank == 1:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"stage 1: recv_forward from stage 0: a stage reported: .*" + mismatch) as info:
            link.recv_forward(timeout=20.0)
        assert not isinstance(info.value, TimeoutError)
        assert time.monotonic() - start < SLACK
        # the direction is unusable afterwards (its order is lost): later receives say so
        with pytest.raises(RuntimeError, match="an earlier receive failed"):
            link.recv_forward(timeout=SHORT)


def _check_early_posted(comm, rank, n):
    """Receives posted before the data exists, completed out of order, in both modes."""
    from tandem.comm import StageLink

    for shapes in ("static", "dynamic"):
        first, last = rank == 0, rank == n - 1
        link = StageLink(comm, None if first else rank - 1, None if last else rank + 1, shapes=shapes, timeout=30.0)
        handles = [] if first else [link.irecv_forward() for _ in range(4)]  # before any send
        if handles:
            assert not handles[3].is_completed()
        xs = [torch.arange(6.0).reshape(2, 3) + mb for mb in range(4)] if first else \
            [h.wait() for h in handles]
        if not first:
            for mb, x in enumerate(xs):
                assert torch.equal(x, torch.arange(6.0).reshape(2, 3) + mb + rank), (mb, x)
            assert handles[0].is_completed()
            with pytest.raises(RuntimeError, match="already waited for"):
                handles[0].wait()
        grads = [] if last else [link.irecv_backward() for _ in range(4)]
        for x in xs:
            if not last:
                link.send_forward(x + 1)
        outs = [2 * (x + 1) for x in xs] if last else [g.wait() for g in reversed(grads)][::-1]
        if not first:
            for o in outs:
                link.send_backward(o)
        link.wait_sends()
        for mb, o in enumerate(outs):
            assert torch.equal(o, 2 * (torch.arange(6.0).reshape(2, 3) + mb + n)), (mb, o)


def _check_bad_input(comm, rank, n):
    from tandem.comm import StageLink

    with pytest.raises(ValueError, match='shapes must be "static" or "dynamic"'):
        StageLink(comm, None, None, shapes="fixed")
    with pytest.raises(ValueError, match="prev_rank=.* must be another rank of the group"):
        StageLink(comm, rank, None)
    with pytest.raises(ValueError, match="next_rank=.* must be another rank of the group"):
        StageLink(comm, None, n)
    with pytest.raises(TypeError, match="must be a tandem.comm.Communicator"):
        StageLink(comm._impl, None, None)
    lone = StageLink(comm, None, None, shapes="dynamic")  # first and last stage at once
    with pytest.raises(ValueError, match=r"send_forward: this is the last stage \(next_rank is None\)"):
        lone.send_forward(torch.zeros(2))
    with pytest.raises(ValueError, match=r"recv_forward: this is the first stage \(prev_rank is None\)"):
        lone.recv_forward()
    with pytest.raises(ValueError, match=r"recv_backward: this is the last stage"):
        lone.send_forward_recv_backward(torch.zeros(2))
    with pytest.raises(ValueError, match=r"send_backward: this is the first stage"):
        lone.send_backward(torch.zeros(2))


def _world4(rank, n):
    from tandem.comm import Communicator

    comm = Communicator(dist.group.WORLD, "cpu", timeout=30.0)
    _check_bad_input(comm, rank, n)
    _check_early_posted(comm, rank, n)
    _check_dynamic_ring(comm, rank, n)
    _check_static_pipeline(comm, rank, n)
    dist.barrier()  # the group outlived the timed-out recv
    return rank


def test_stage_link_ring_pipeline_and_errors():
    assert run_ranks(4, _world4, timeout=90) == [0, 1, 2, 3]


def _world2(rank, n):
    """pp=2: next and prev are the same rank and both directions are in flight at once."""
    from tandem.comm import Communicator, StageLink

    comm = Communicator(dist.group.WORLD, "cpu", timeout=30.0)
    for shapes in ("static", "dynamic"):
        link = StageLink(comm, None if rank == 0 else 0, 1 if rank == 0 else None, shapes=shapes, timeout=30.0)
        big = (256, 1024)  # 1 MiB of float32: beyond any eager buffering
        mbs = 5
        if rank == 0:
            # warm-up: two forwards in flight before any backward arrives
            link.send_forward(torch.full(big, 0.0))
            link.send_forward(torch.full(big, 1.0))
            for mb in range(mbs):
                nxt = mb + 2
                g = link.send_forward_recv_backward(torch.full(big, float(nxt))) if nxt < mbs else link.recv_backward()
                assert torch.equal(g, torch.full(big, -float(mb))), mb
        else:
            for mb in range(mbs):
                x = link.recv_forward()
                assert torch.equal(x, torch.full(big, float(mb))), mb
                link.send_backward(-x)  # in flight while the next forward is still coming
        link.wait_sends()

    # a recv whose peer never sends: error naming stage, peer and operation, within the timeout
    quiet = StageLink(comm, None if rank == 0 else 0, 1 if rank == 0 else None, shapes="dynamic", timeout=SHORT)
    if rank == 1:
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            quiet.recv_forward()
        assert time.monotonic() - start < SHORT + SLACK
        assert isinstance(info.value, RuntimeError)
        assert "stage 1: recv_forward from stage 0" in str(info.value) and "timed out" in str(info.value)
    dist.barrier()

    # a peer that posts an error instead of receiving: the sender's wait_sends raises it fast
    told = StageLink(comm, None if rank == 0 else 0, 1 if rank == 0 else None, shapes="static", timeout=30.0)
    if rank == 0:
        told.send_forward(torch.zeros(1 << 16))  # 256 KiB: completes only once received
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="a stage reported: stage 1 gave up") as info:
            told.wait_sends()
        assert not isinstance(info.value, TimeoutError) and time.monotonic() - start < SLACK
    else:
        told.post_error("stage 1 gave up")
    dist.barrier()

    # receives queued behind a header when the direction fails: each raises, none hangs
    queued = StageLink(comm, None if rank == 0 else 0, 1 if rank == 0 else None, shapes="dynamic", timeout=30.0)
    if rank == 1:
        handles = [queued.irecv_forward() for _ in range(3)]
        dist.barrier()
        with pytest.raises(RuntimeError, match="a stage reported: stage 0 gave up"):
            handles[0].wait()
        assert handles[2].is_completed()  # done: its wait raises
        for h in handles[1:]:
            with pytest.raises(RuntimeError, match="an earlier receive failed"):
                h.wait(timeout=SHORT)
    else:
        dist.barrier()
        queued.post_error("stage 0 gave up")
    dist.barrier()
    return rank


def test_stage_link_pp2_bidirectional_and_timeout():
    assert run_ranks(2, _world2, timeout=90) == [0, 1]


# --- a peer that dies mid-exchange -------------------------------------------------------

DEAD_TIMEOUT = 5.0


def _dying_pipeline(rank, n, init_file, results):
    """Stages 0 -> 1 -> 2; stage 1 dies after one good round. The others must raise in time."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=n)
    from tandem.comm import Communicator, StageLink

    link = StageLink(Communicator(None, "cpu"), rank - 1 if rank > 0 else None, rank + 1 if rank < n - 1 else None,
                     shapes="dynamic", timeout=DEAD_TIMEOUT)
    x = torch.ones(4) if rank == 0 else link.recv_forward()  # one good round
    if rank < n - 1:
        link.send_forward(x + 1)
    g = x if rank == n - 1 else link.recv_backward()
    if rank > 0:
        link.send_backward(g)
    link.wait_sends()
    if rank == 1:
        link.recv_forward()
        os._exit(1)  # dies holding the microbatch: stage 0 waits for a gradient, stage 2 for an activation
    start = time.monotonic()
    try:
        link.send_forward_recv_backward(x) if rank == 0 else link.recv_forward()
        results.put((rank, "no error", "", 0.0))
    except Exception as e:  # noqa: BLE001  (the type is what the test checks)
        results.put((rank, type(e).__name__, str(e), time.monotonic() - start))
    results.close()
    results.join_thread()  # flush the result before this process ends
    dist.destroy_process_group()


def test_stage_link_dead_peer_makes_survivors_raise():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_dying_pipeline, args=(r, 3, init, results), daemon=True) for r in range(3)]
        for p in procs:
            p.start()
        got = {}
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                rank, kind, msg, took = results.get(timeout=1.0)
                got[rank] = (kind, msg, took)
            except queue_mod.Empty:
                pass
        for p in procs:
            p.join(timeout=DEAD_TIMEOUT + SLACK)
            if p.is_alive():
                p.kill()
    assert set(got) == {0, 2}, got
    for rank, (kind, msg, took) in got.items():
        assert kind in ("CommError", "CommTimeoutError"), (rank, kind, msg)
        assert took < DEAD_TIMEOUT + SLACK, (rank, took)
        assert f"stage {rank}: recv_" in msg and "stage 1" in msg, msg
    assert procs[1].exitcode == 1
    assert procs[0].exitcode == 0 and procs[2].exitcode == 0, [p.exitcode for p in procs]


def test_serialising_cuda_settings_are_warned_about(monkeypatch):
    """CUDA_DEVICE_MAX_CONNECTIONS=1 and CUDA_LAUNCH_BLOCKING=1 with early receives can stall
    pipeline ranks on GPUs until their timeout: a StageLink over NCCL warns about each (the
    check itself, without a GPU)."""
    import warnings

    from tandem.comm._stage_link import _serialising_settings, _warn_serialising_settings

    monkeypatch.delenv("CUDA_LAUNCH_BLOCKING", raising=False)
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with pytest.warns(RuntimeWarning, match="CUDA_DEVICE_MAX_CONNECTIONS=1 puts every stream in one hardware queue"):
        _warn_serialising_settings()
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    with pytest.warns(RuntimeWarning, match="CUDA_LAUNCH_BLOCKING=1 makes posting a receive wait"):
        _warn_serialising_settings()
    both = _serialising_settings({"CUDA_DEVICE_MAX_CONNECTIONS": "1", "CUDA_LAUNCH_BLOCKING": "1"})
    assert [w.split("=")[0] for w in both] == ["CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_LAUNCH_BLOCKING"]
    assert _serialising_settings({"CUDA_LAUNCH_BLOCKING": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "32"}) == []
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_serialising_settings()
