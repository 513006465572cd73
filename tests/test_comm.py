"""Communicator on CPU with gloo: every collective and p2p against a plain reference.

One spawned world per world size runs all cases (each process start costs seconds).
"""

import time

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks

DTYPES = (torch.float32, torch.bfloat16, torch.int64)


def _data(rank, shape, dtype, salt=0):
    """Rank-dependent values that every rank can recompute (small integers for ints/bf16)."""
    g = torch.Generator().manual_seed(1000 * rank + salt)
    if dtype.is_floating_point and dtype != torch.bfloat16:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-8, 9, shape, generator=g).to(dtype)


def _check_collectives(comm, rank, n):
    for dtype in DTYPES:
        # all_reduce: t [5, 3] summed over ranks, in place
        t = _data(rank, (5, 3), dtype)
        w = comm.all_reduce(t)
        w.wait()
        assert w.is_completed()
        expected = sum(_data(r, (5, 3), dtype).double() for r in range(n)).to(dtype)
        torch.testing.assert_close(t, expected, msg=f"all_reduce {dtype}")

        # all_gather: [4, 3] per rank -> [n*4, 3]
        inp = _data(rank, (4, 3), dtype, salt=1)
        out = torch.empty(n * 4, 3, dtype=dtype)
        comm.all_gather(out, inp).wait()
        assert torch.equal(out, torch.cat([_data(r, (4, 3), dtype, salt=1) for r in range(n)]))

        # reduce_scatter: [n*2, 3] per rank -> [2, 3], rank r keeps block r of the sum
        inp = _data(rank, (n * 2, 3), dtype, salt=2)
        out = torch.empty(2, 3, dtype=dtype)
        comm.reduce_scatter(out, inp).wait()
        total = sum(_data(r, (n * 2, 3), dtype, salt=2).double() for r in range(n))
        torch.testing.assert_close(out, total[2 * rank:2 * rank + 2].to(dtype), msg=f"reduce_scatter {dtype}")

    for op, ref in (("max", torch.amax), ("min", torch.amin), ("prod", torch.prod)):
        t = _data(rank, (6,), torch.int64, salt=3)
        comm.all_reduce(t, op=op).wait()
        assert torch.equal(t, ref(torch.stack([_data(r, (6,), torch.int64, salt=3) for r in range(n)]), dim=0)), op


def _check_out_of_order(comm, rank, n):
    a = torch.full((8,), float(rank))
    b_in, b_out = torch.full((2,), float(rank)), torch.empty(2 * n)
    c_in, c_out = torch.ones(3 * n), torch.empty(3)
    works = [comm.all_reduce(a), comm.all_gather(b_out, b_in), comm.reduce_scatter(c_out, c_in)]
    for w in reversed(works):
        w.wait()
    assert torch.equal(a, torch.full((8,), float(sum(range(n)))))
    assert torch.equal(b_out, torch.arange(n, dtype=torch.float32).repeat_interleave(2))
    assert torch.equal(c_out, torch.full((3,), float(n)))


def _check_p2p(comm, rank, n):
    nxt, prv = (rank + 1) % n, (rank - 1) % n
    # ring with one batch: send to next, recv from previous
    for dtype in DTYPES:
        got = torch.empty(7, dtype=dtype)
        ws = comm.batch_p2p([("send", _data(rank, (7,), dtype, 4), nxt), ("recv", got, prv)])
        assert len(ws) == 2
        for w in ws:
            w.wait()
        assert torch.equal(got, _data(prv, (7,), dtype, 4))
    # plain send/recv, in an order that needs no batching: even ranks send first
    got = torch.empty(3, 2)
    if rank % 2 == 0:
        w_send, w_recv = comm.send(torch.full((3, 2), float(rank)), nxt), comm.recv(got, prv)
    else:
        w_recv, w_send = comm.recv(got, prv), comm.send(torch.full((3, 2), float(rank)), nxt)
    w_recv.wait(), w_send.wait()
    assert torch.equal(got, torch.full((3, 2), float(prv)))
    # sends to this rank pair with recvs from it inside one batch
    mine, back = torch.arange(4.0) + rank, torch.empty(4)
    for w in comm.batch_p2p([("send", mine, rank), ("recv", back, rank)]):
        w.wait()
    assert torch.equal(back, mine)


def _check_bad_input(comm, rank, n):
    t = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="contiguous"):
        comm.all_reduce(t.t()[:, :2])
    with pytest.raises(ValueError, match="unknown reduce op"):
        comm.all_reduce(t, op="avg")
    with pytest.raises(ValueError, match="meta"):
        comm.all_reduce(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match=r"all_gather: out shape"):
        comm.all_gather(torch.zeros(n * 4 + 1, 4), t)
    with pytest.raises(TypeError, match="dtype"):
        comm.all_gather(torch.zeros(n * 4, 4, dtype=torch.float64), t)
    with pytest.raises(ValueError, match=r"reduce_scatter: in shape"):
        comm.reduce_scatter(torch.zeros(3, 4), t)
    with pytest.raises(ValueError, match=f"peer rank {n} is not in the group"):
        comm.send(t, n)
    with pytest.raises(ValueError, match="send to this rank"):
        comm.send(t, rank)
    with pytest.raises(ValueError, match="sends to this rank"):
        comm.batch_p2p([("send", t, rank)])
    with pytest.raises(ValueError, match='"send" or "recv"'):
        comm.batch_p2p([("put", t, 0)])


def _check_recv_timeout(comm, rank, n):
    """A recv whose peer never sends raises a timeout naming rank, peer, operation; the
    receive stays parked, so a message that arrives late lands there and the connection
    between the two ranks keeps working."""
    side = comm.fork()  # its own tag: nothing else can match this recv
    assert side.timeout == comm.timeout and comm.fork(timeout=7.5).timeout == 7.5
    with pytest.raises(ValueError, match="fork: timeout must be a finite number of seconds > 0"):
        comm.fork(timeout=float("inf"))
    if rank == 0:
        w = side.recv(torch.empty(3), 1)
        with pytest.raises(TimeoutError) as info:
            w.wait(timeout=0.3)
        assert isinstance(info.value, RuntimeError)
        msg = str(info.value)
        assert f"rank 0 of {n}" in msg and "recv" in msg and "from rank 1" in msg and "timed out" in msg, msg
    dist.barrier()
    if rank == 1:
        side.send(torch.ones(3), 0).wait()  # the late message
    # an unrelated exchange between the same two ranks still goes through
    if rank in (0, 1):
        t = torch.full((4,), float(rank))
        other = 1 - rank
        works = comm.batch_p2p([("send", t, other), ("recv", got := torch.empty(4), other)])
        for w in works:
            w.wait(timeout=20.0)
        assert torch.equal(got, torch.full((4,), float(other)))


def _check_wait_for_and_close(comm, rank, n):
    """wait_for blocks at most its slice and tells whether the operation is done; close()
    ends a communicator (later calls raise), the group stays usable."""
    from tandem.comm import CommError

    side = comm.fork()
    buf = torch.empty(4)
    if rank == 0:
        w = side.recv(buf, 1)
        start = time.monotonic()
        assert w.wait_for(0.05) is False  # rank 1 sends only after the barrier below
        assert 0.04 <= time.monotonic() - start < 1.0
    dist.barrier()
    if rank == 1:
        side.send(torch.arange(4.0), 0).wait()
    if rank == 0:
        assert w.wait_for(10.0) is True and w.is_completed()
        w.wait()
        assert torch.equal(buf, torch.arange(4.0))
    t = torch.ones(2)
    side.all_reduce(t).wait_for(10.0)
    assert torch.equal(t, torch.full((2,), float(n)))
    side.close()
    with pytest.raises(CommError, match=f"rank {rank} of {n}: all_reduce.*: the communicator was closed"):
        side.all_reduce(torch.ones(2))


def _world(rank, n):
    from tandem.comm import Communicator

    comm = Communicator(dist.group.WORLD, "cpu", timeout=30.0)
    assert (comm.rank, comm.size) == (rank, n)
    assert comm.backend == "c10d:gloo"
    _check_collectives(comm, rank, n)
    _check_out_of_order(comm, rank, n)
    _check_p2p(comm, rank, n)
    _check_bad_input(comm, rank, n)
    _check_recv_timeout(comm, rank, n)
    _check_wait_for_and_close(comm, rank, n)
    if n > 2:  # a subgroup: ranks are group ranks, not global ones
        sub = dist.new_group([1, 2, 3][: n - 1])
        if rank in (1, 2, 3)[: n - 1]:
            sc = Communicator(sub, "cpu", timeout=30.0)
            assert sc.rank == rank - 1 and sc.size == n - 1
            _check_collectives(sc, sc.rank, sc.size)
            _check_p2p(sc, sc.rank, sc.size)
    dist.barrier()
    return rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_communicator_gloo(world_size):
    assert run_ranks(world_size, _world, timeout=90) == list(range(world_size))
