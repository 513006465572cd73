"""OverlappedGradReducer on 2 gloo ranks: averages, gradients no replica has stay None, and a
step whose waits failed leaves nothing behind for the next one."""

import pytest
import torch
from torch import nn

from distributed import run_ranks


def _worker(rank, world):
    import tandem
    from tandem.dp import OverlappedGradReducer

    mesh = tandem.init_mesh(dp=world)
    used, unused = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    reducer = OverlappedGradReducer([[used, unused]], mesh, bucket_bytes=1 << 20)

    def step(value, wait=None):
        used.grad = None
        reducer.begin_step()
        reducer.arm(0)
        (used * value).sum().backward()  # the hook marks `used`; `unused` gets nothing
        reducer.disarm(0)
        reducer.finish(wait)

    step(float(rank + 1))
    torch.testing.assert_close(used.grad, torch.full((3,), (1.0 + 2.0) / 2))  # the dp average
    assert unused.grad is None  # no replica had one: stays None, as without dp

    def broken(work, what):
        work.wait()
        raise RuntimeError("the wait failed")

    with pytest.raises(RuntimeError, match="the wait failed"):
        step(10.0 * (rank + 1), broken)
    step(100.0 * (rank + 1))  # nothing of the failed step is reused
    torch.testing.assert_close(used.grad, torch.full((3,), 150.0))
    reducer.remove()
    return True


def test_overlapped_grad_reducer():
    assert run_ranks(2, _worker, timeout=90) == [True, True]
