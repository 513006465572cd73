"""Collective and point-to-point times: the alpha-beta model with ring bus-bandwidth factors.

For n ranks and S bytes (the full tensor: all-reduce input, all-gather output,
reduce-scatter input), over a link of bus bandwidth B and per-step latency alpha:

    all-reduce      2 (n-1) alpha + S * 2 (n-1)/n / B
    all-gather        (n-1) alpha + S *   (n-1)/n / B
    reduce-scatter    (n-1) alpha + S *   (n-1)/n / B
    send/recv               alpha + S / B

A calibrated CPU profile carries measured all-reduce times over 2 ranks of a node
(``pair_all_reduce``): such groups interpolate them in log-log (an all-gather or a
reduce-scatter takes half, as in the model above), beyond the largest size at the bus
bandwidth B.

The factors are those of ring algorithms (nccl-tests' busbw = algbw x the same factor, so B
is the bus bandwidth nccl-tests reports). The link is NVLink when the group fits in one node,
else the network: a group with k members per node drives k NICs at once, so its bus
bandwidth is min(NVLink, k x NIC) (NCCL's rings run one per NIC).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

__all__ = ["Link", "group_link", "all_reduce_time", "all_gather_time", "reduce_scatter_time", "p2p_time"]


@dataclass(frozen=True)
class Link:
    """Bus bandwidth (bytes/s) and per-step latency (s) of a group of ranks."""

    bandwidth: float
    latency: float
    inter_node: bool
    measured: tuple = ()
    """((bytes, seconds), ...) of an all-reduce over 2 ranks of this link (the profile's)"""


def group_link(profile, *, size: int, stride: int, gpus_per_node: int) -> Link:
    """The link of a group of ``size`` ranks whose global ranks are ``stride`` apart."""
    intra = profile.intra_node_bw * profile.intra_node_efficiency
    span = (size - 1) * stride + 1
    if size <= 1 or span <= gpus_per_node:
        return Link(intra, profile.intra_node_latency, False, profile.pair_all_reduce)
    per_node = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
    inter = profile.inter_node_bw * profile.inter_node_efficiency * per_node
    return Link(min(intra, inter), profile.inter_node_latency, True)


def _measured(nbytes: float, link: Link) -> float:
    """The all-reduce over 2 ranks from the link's measured table (log-log interpolation)."""
    table = link.measured
    sizes = [b for b, _ in table]
    i = bisect.bisect_left(sizes, nbytes)
    if i == 0:
        return table[0][1]
    if i == len(table):
        return table[-1][1] + (nbytes - sizes[-1]) / link.bandwidth
    (b1, t1), (b2, t2) = table[i - 1], table[i]
    w = math.log(nbytes / b1) / math.log(b2 / b1)
    return math.exp(math.log(t1) + w * (math.log(t2) - math.log(t1)))


def all_reduce_time(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    if n == 2 and link.measured:
        return _measured(nbytes, link)
    return 2 * (n - 1) * link.latency + nbytes * 2 * (n - 1) / n / link.bandwidth


def all_gather_time(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    if n == 2 and link.measured:
        return _measured(nbytes, link) / 2
    return (n - 1) * link.latency + nbytes * (n - 1) / n / link.bandwidth


reduce_scatter_time = all_gather_time


def p2p_time(nbytes: float, link: Link) -> float:
    return link.latency + nbytes / link.bandwidth
