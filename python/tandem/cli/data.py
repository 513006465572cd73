"""The synthetic task of `tandem train`: arithmetic progressions modulo the vocabulary.

Each sequence is t_i = (a + i * k) mod V with a random start a and a random step k in
1..max_step. After two tokens the rest is determined, so a model that learns the task
drives the loss far below chance (ln V); only the first steps stay uncertain.
"""

import math

import torch

__all__ = ["batch", "chance_loss", "floor_loss"]


def batch(step: int, batch_size: int, seq_len: int, vocab: int, *, seed: int = 0, shard: int = 0,
          max_step: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each [batch_size, seq_len], for training step ``step``.

    ``shard`` (the dp rank) picks a different, reproducible slice of data per replica.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + shard)
    start = torch.randint(0, vocab, (batch_size, 1), generator=g)
    stride = torch.randint(1, max_step + 1, (batch_size, 1), generator=g)
    seq = (start + stride * torch.arange(seq_len + 1)) % vocab  # (b, s + 1)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def chance_loss(vocab: int) -> float:
    return math.log(vocab)


def floor_loss(vocab: int, seq_len: int, max_step: int = 4) -> float:
    """The best achievable mean loss: position 0 must guess the step, the rest is determined."""
    return math.log(max_step) / seq_len
