"""The NCCL backend's host logic on CPU, through the scripted NCCL of csrc/comm/fake_nccl.h:
the real NcclCore (create, post, abort, release, close, check, synchronize), watchdog,
NcclWork and abort_all, with ncclCommInitRankConfig, ncclGroupEnd, ncclCommRevoke,
ncclCommAbort, ncclCommDestroy and the event queries scripted as NCCL 2.30.7 behaves.

A "held" fake communicator is one whose peer does not answer: its operations never end
until it is revoked or aborted (its kernels exit) or released from the hold.
"""

import threading
import time

import pytest
import torch

from tandem import _C

T = _C._testing
pytestmark = pytest.mark.skipif(not hasattr(T, "fake_communicator"),
                                reason="a CPU-only core: the NCCL backend is not compiled in")


@pytest.fixture(autouse=True)
def fake_nccl():
    T.fake_nccl_reset()
    yield
    T.fake_nccl_reset()


def _calls(*comms):
    """The fake NCCL calls on these communicators, as (comm index, call)."""
    ids = {T.fake_id(c): i for i, c in enumerate(comms)}
    return [(ids[cid], call) for cid, call in T.fake_nccl_calls() if cid in ids]


def _timed(fn, *args):
    start = time.monotonic()
    fn(*args)
    return time.monotonic() - start


def test_abort_does_not_hold_the_lock_of_the_state():
    """Item 1: NCCL's abort synchronises the comm's streams, which can wait (through the
    caller's stream) for another communicator's receive from a dead peer. It runs outside
    the state lock: is_completed, check and wait answer at once meanwhile."""
    T.fake_nccl_reset(abort_block_limit_s=1.5)
    a = T.fake_communicator(0, 2, 30.0)
    b = a.fork(30.0)
    T.fake_hold(b, True)  # b's receive waits for a dead peer
    b.recv(torch.empty(4), 1)
    work = a.all_reduce(torch.ones(4), "sum")
    T.fake_waits_on(a, b)  # a's stream waits behind b's receive
    aborting = threading.Thread(target=a.abort)
    aborting.start()
    time.sleep(0.2)  # the fake abort of a is now blocked on b
    assert aborting.is_alive(), "the scripted abort did not block: the test lost its point"
    assert _timed(work.is_completed) < 0.1
    assert work.is_completed()  # failed: wait() raises
    with pytest.raises(_C.CommError, match="the communicator was aborted"):
        a.check()
    with pytest.raises(_C.CommError, match="the communicator was aborted"):
        work.wait()
    with pytest.raises(_C.CommError, match="the communicator was aborted"):
        a.all_reduce(torch.ones(4), "sum")
    aborting.join(5.0)
    assert T.fake_abort_blocked_s(a) > 1.0  # a single abort really waits for b's kernel
    b.abort()


def test_abort_all_revokes_every_communicator_before_aborting_any():
    """Item 1: a link's or a mesh's communicators are all revoked first (their kernels exit),
    so no abort waits for another communicator's stuck kernel."""
    a = T.fake_communicator(0, 2, 30.0)
    b = a.fork(30.0)
    c = a.fork(30.0)
    T.fake_hold(b, True)
    b.recv(torch.empty(4), 1)
    a.all_reduce(torch.ones(4), "sum")
    T.fake_waits_on(a, b)  # a first in the list: aborted one by one it would wait for b
    assert _timed(_C._abort_all, [a, b], False) < 0.5
    assert T.fake_abort_blocked_s(a) < 0.1
    calls = [call for call in _calls(a, b) if call[1] in ("revoke", "abort")]
    assert calls == [(0, "revoke"), (1, "revoke"), (0, "abort"), (1, "abort")]
    for comm in (a, b):
        with pytest.raises(_C.CommError, match="the communicator was aborted"):
            comm.all_reduce(torch.ones(1), "sum")
    c.all_reduce(torch.ones(1), "sum").synchronize(5.0)  # not in the list, not in the call

    # with their failure domains (Mesh.abort): c goes too, as do communicators shared in
    d = T.fake_communicator(0, 2, 30.0)
    _C._share_failure_domain(c, d)
    from tandem.comm import abort_all

    abort_all([c])
    for comm in (c, d):
        with pytest.raises(_C.CommError, match="aborted"):
            comm.all_reduce(torch.ones(1), "sum")


def test_release_drains_a_healthy_communicator_then_destroys_it():
    """Item 2: dropping a healthy communicator waits for its operations in flight (their
    peers are waiting for them), then ncclCommDestroy; no abort, nothing cancelled."""
    a = T.fake_communicator(0, 2, 30.0)
    T.fake_hold(a, True)
    work = a.all_reduce(torch.ones(4), "sum")
    threading.Timer(0.3, T.fake_hold, (a, False)).start()  # the peer answers 0.3 s later
    took = _timed(a.release, None)
    assert 0.25 < took < 5.0, took
    assert [call for _, call in _calls(a) if call in ("revoke", "abort", "destroy")] == ["destroy"]
    work.synchronize(1.0)  # completed, not cancelled
    with pytest.raises(_C.CommError, match="the communicator was released"):
        a.all_reduce(torch.ones(4), "sum")

    b = T.fake_communicator(0, 2, 30.0)
    b.all_reduce(torch.ones(4), "sum")
    del b  # the destructor releases: drained (nothing pending), destroyed
    assert [call for _, call in T.fake_nccl_calls()][-1] == "destroy"


def test_release_aborts_when_the_drain_times_out_or_the_communicator_failed():
    """Item 2: a release whose operations do not end in time aborts (and says why); a failed
    communicator is aborted at once."""
    a = T.fake_communicator(0, 2, 30.0)
    T.fake_hold(a, True)
    work = a.recv(torch.empty(4), 1)
    took = _timed(a.release, 0.2)
    assert 0.15 < took < 2.0, took
    assert [call for _, call in _calls(a) if call in ("revoke", "abort", "destroy")] == ["revoke", "abort"]
    with pytest.raises(_C.CommTimeoutError, match=r"release: 1 operation\(s\) still in flight after 0.2 s"):
        work.synchronize(1.0)

    b = T.fake_communicator(0, 2, 30.0)
    T.fake_async_error(b, "remote_error")
    with pytest.raises(_C.CommError, match="NCCL asynchronous error"):
        b.check()
    b.release(None)
    assert "destroy" not in [call for _, call in _calls(b)]
    assert [call for _, call in _calls(b)][-2:] == ["revoke", "abort"]


def test_a_watchdog_abort_poisons_the_failure_domain():
    """Item 6: on CUDA a wait only orders streams; after the watchdog aborted a receive from a
    dead peer its stream runs on with an unfilled buffer. Every later operation, wait, check
    and synchronize of every communicator sharing its failure domain raises, naming it."""
    a = T.fake_communicator(0, 2, 30.0)
    link_fork = a.fork(0.2)  # its operations time out after 0.2 s
    other = T.fake_communicator(0, 2, 30.0)  # another communicator of the mesh
    _C._share_failure_domain(a, other)
    earlier = a.all_reduce(torch.ones(4), "sum")  # completed before the failure
    earlier.synchronize(1.0)
    T.fake_hold(link_fork, True)
    recv = link_fork.recv(torch.empty(4), 1)
    recv.wait()  # CUDA semantics: returns at once; the stream would wait
    time.sleep(0.5)  # the watchdog polls every 50 ms
    assert recv.is_completed()
    with pytest.raises(_C.CommTimeoutError, match=r"recv of float32\[4\] from rank 1: timed out \(the watchdog"):
        recv.synchronize(1.0)
    for comm in (a, other):
        for call in (lambda: comm.all_reduce(torch.ones(4), "sum"), comm.check, lambda: comm.synchronize(1.0)):
            with pytest.raises(_C.CommError, match="a communicator of this group failed before: .*recv.*timed out"):
                call()
    with pytest.raises(_C.CommError, match="failed before"):
        earlier.wait()
    # an explicit abort is no failure: it poisons nothing
    x = T.fake_communicator(0, 2, 30.0)
    y = x.fork(30.0)
    y.abort()
    x.all_reduce(torch.ones(4), "sum").synchronize(1.0)
    x.check()


def test_synchronize_waits_on_the_host_for_what_was_posted():
    """Item 6: synchronize() is the host check: it waits for every operation posted so far
    (CommTimeoutError past its timeout), then raises a failure."""
    a = T.fake_communicator(0, 2, 30.0)
    T.fake_hold(a, True)
    a.all_reduce(torch.ones(4), "sum")
    with pytest.raises(_C.CommTimeoutError, match="rank 0 of 2: synchronize: operations still in flight after 0.1 s"):
        a.synchronize(0.1)
    threading.Timer(0.2, T.fake_hold, (a, False)).start()
    assert 0.1 < _timed(a.synchronize, 5.0) < 4.0
    with pytest.raises(ValueError, match="timeout must be positive"):
        a.synchronize(0.0)


def test_a_failed_create_or_split_never_leaks_the_half_made_communicator():
    """Item 12: ncclCommInitRankConfig can fail at once after making the comm; it is aborted,
    not leaked. A split whose parent fails aborts the child NCCL made."""
    T.fake_nccl_reset(init_result="system_error", init_makes_comm=True)
    with pytest.raises(_C.CommError, match="rank 0 of 2: ncclCommInitRankConfig: NCCL error: unhandled system error"):
        T.fake_communicator(0, 2, 5.0)
    assert [call for _, call in T.fake_nccl_calls()] == ["init", "revoke", "abort"]
    made = {cid for cid, call in T.fake_nccl_calls()}
    assert len(made) == 1 and 0 not in made

    T.fake_nccl_reset(init_result="system_error", init_makes_comm=False)
    with pytest.raises(_C.CommError, match="ncclCommInitRankConfig"):
        T.fake_communicator(0, 2, 5.0)
    assert T.fake_nccl_calls() == [(0, "init")]  # nothing made, nothing to abort

    T.fake_nccl_reset(split_error="remote_error")  # the split's async job fails on the parent
    parent = T.fake_communicator(0, 2, 5.0)
    with pytest.raises(_C.CommError, match="ncclCommSplit: NCCL error: remote process exited"):
        parent.fork(5.0)
    calls = T.fake_nccl_calls()
    child = max(cid for cid, _ in calls)
    assert child != T.fake_id(parent)
    assert [call for cid, call in calls if cid == child] == ["revoke", "abort"]
    assert [call for cid, call in calls if cid == T.fake_id(parent)][-2:] == ["revoke", "abort"]


def test_enqueue_poll_spins_before_it_sleeps():
    """Item 7: a non-blocking group end answers ncclInProgress until it launched (tens of
    microseconds); the poll spins (yielding the core) for the first 50 us instead of sleeping
    1 us, which costs ~55 us with the kernel's timer slack. Mocked NCCL, launch of 10 us, no
    thread; medians."""
    spin = T.bench_nccl_post(300, 10.0, False, 50.0)
    sleep = T.bench_nccl_post(300, 10.0, False, 0.0)
    assert 10.0 <= spin < 35.0, f"{spin:.1f} us per post with the spin"
    assert sleep > spin + 10.0, f"sleeping {sleep:.1f} us vs spinning {spin:.1f} us per post"


def test_collectives_keep_nccl_types_and_p2p_moves_bytes():
    """Item 4: point-to-point moves numel * element_size uint8 for every dtype; collectives
    keep the typed mapping and name a dtype NCCL cannot reduce."""
    for dtype, size in ((torch.int16, 2), (torch.complex64, 8), (torch.float8_e4m3fn, 1), (torch.bfloat16, 2),
                        (torch.float64, 8), (torch.bool, 1)):
        assert T.nccl_p2p_bytes(dtype, 10) == 10 * size, dtype
    assert T.nccl_p2p_bytes(torch.int16, 0) == 0
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        T.nccl_collective_dtype(dtype)
    for dtype in (torch.int16, torch.complex64, torch.uint16):
        with pytest.raises(TypeError, match="all_reduce: dtype .* has no NCCL reduction type"):
            T.nccl_collective_dtype(dtype)


def test_close_finalizes_then_destroys():
    """close() is the collective end: finalize, poll until done, destroy (outside the lock)."""
    T.fake_nccl_reset(ready_after_us=2000.0)
    a = T.fake_communicator(0, 2, 5.0)
    a.close(5.0)
    assert [call for _, call in _calls(a)] == ["init", "finalize", "destroy"]
    with pytest.raises(_C.CommError, match="the communicator was closed"):
        a.all_reduce(torch.ones(1), "sum")
    a.close(5.0)  # idempotent


def test_mesh_host_check_and_abort_cover_the_failure_domain():
    """Item 6 (and 1): Mesh.synchronize (what PipelineRunner.step() calls before it returns)
    raises the failure of any communicator sharing the mesh's failure domain; Mesh.abort
    revokes and aborts the mesh's communicators and their forks together."""
    from tandem.comm import Communicator
    from tandem.mesh import Mesh

    mesh = Mesh.single()
    tp = Communicator(None, _impl=T.fake_communicator(0, 2, 30.0))
    pp = Communicator(None, _impl=T.fake_communicator(0, 2, 30.0))
    tp.share_failure_domain(pp)
    mesh._comms.update(tp=tp, pp=pp)
    link_fork = Communicator(None, _impl=pp._impl.fork(0.2))
    other = Communicator(None, _impl=pp._impl.fork(30.0))
    mesh.synchronize(5.0)  # healthy: returns
    T.fake_hold(link_fork._impl, True)
    link_fork.recv(torch.empty(2), 1)
    time.sleep(0.5)  # the fork's watchdog aborts the receive
    with pytest.raises(_C.CommError, match="failed before: .*recv of float32\\[2\\].*timed out"):
        mesh.synchronize(5.0)
    mesh.abort("a test")
    for comm in (tp, pp, other):
        with pytest.raises(_C.CommError, match="aborted|failed before"):
            comm.all_reduce(torch.ones(1))
    aborted = {cid for cid, call in T.fake_nccl_calls() if call == "abort"}
    assert {T.fake_id(c._impl) for c in (tp, pp, other, link_fork)} <= aborted


def test_bench_nccl_post_runs(tmp_path):
    """benchmarks/bench_nccl_post.py (the RESULTS.md figures of item 7) end to end, small."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import bench_nccl_post

    out = tmp_path / "post.json"
    assert bench_nccl_post.main(["--posts", "20", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * len(bench_nccl_post.LAUNCH_US)
    for row in rows:
        assert all(row[name] > 0 for name in bench_nccl_post.POLICIES), row
