"""Deferred weight gradients (W of zero-bubble schedules): B leaves the linear layers' weight
gradients pending, W computes exactly what one backward would have."""

import torch

from tandem.mesh import Mesh
from tandem.models import GPT, GPTConfig
from tandem.nn import wgrad


def test_deferred_weight_grads_equal_one_backward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, max_seq_len=8, num_layers=2, hidden_size=16, num_heads=4,
                          num_kv_heads=2, ffn_hidden_size=32), mesh=Mesh.single())
    ids, targets = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    model(ids, targets).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    bucket = []
    with wgrad.defer_weight_grads(bucket):
        assert wgrad.deferring()
        model(ids, targets).backward()  # B
    assert not wgrad.deferring()
    deferred = {n for n, p in model.named_parameters() if p.grad is None}
    # every GEMM weight waits for W; LayerNorms, biases and embeddings got theirs in B
    assert {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.1.attn.q_proj.weight",
            "blocks.1.attn.k_proj.weight", "blocks.1.attn.o_proj.weight", "head.lm_head.weight"} <= deferred
    assert not any(".ln" in n or n.endswith(".bias") or n.startswith("embed.") for n in deferred)
    assert len(bucket) == len(deferred)
    wgrad.flush(bucket)  # W
    assert not bucket
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=lambda m: f"{n}: {m}")
