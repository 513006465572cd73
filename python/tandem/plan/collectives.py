"""Collective and point-to-point times: the alpha-beta model with ring bus-bandwidth factors.

For n ranks and S bytes (the full tensor: all-reduce input, all-gather output,
reduce-scatter input), over a link of bus bandwidth B and per-step latency alpha:

    all-reduce      2 (n-1) alpha + S * 2 (n-1)/n / B
    all-gather        (n-1) alpha + S *   (n-1)/n / B
    reduce-scatter    (n-1) alpha + S *   (n-1)/n / B
    send/recv               alpha + S / B

The factors are those of ring algorithms (nccl-tests' busbw = algbw x the same factor, so B
is the bus bandwidth nccl-tests reports). The link is NVLink when the group fits in one node,
else the network: a group with k members per node drives k NICs at once, so its bus
bandwidth is min(NVLink, k x NIC) (NCCL's rings run one per NIC).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Link", "group_link", "all_reduce_time", "all_gather_time", "reduce_scatter_time", "p2p_time"]


@dataclass(frozen=True)
class Link:
    """Bus bandwidth (bytes/s) and per-step latency (s) of a group of ranks."""

    bandwidth: float
    latency: float
    inter_node: bool


def group_link(profile, *, size: int, stride: int, gpus_per_node: int) -> Link:
    """The link of a group of ``size`` ranks whose global ranks are ``stride`` apart."""
    intra = profile.intra_node_bw * profile.intra_node_efficiency
    span = (size - 1) * stride + 1
    if size <= 1 or span <= gpus_per_node:
        return Link(intra, profile.intra_node_latency, False)
    per_node = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
    inter = profile.inter_node_bw * profile.inter_node_efficiency * per_node
    return Link(min(intra, inter), profile.inter_node_latency, True)


def all_reduce_time(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * link.latency + nbytes * 2 * (n - 1) / n / link.bandwidth


def all_gather_time(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * link.latency + nbytes * (n - 1) / n / link.bandwidth


reduce_scatter_time = all_gather_time


def p2p_time(nbytes: float, link: Link) -> float:
    return link.latency + nbytes / link.bandwidth
