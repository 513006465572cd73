"""Deferred weight gradients (W of zero-bubble schedules): B leaves the parameters' gradients
of tandem's layers pending, W computes exactly what one backward would have."""

import pytest
import torch
import torch.nn.functional as F

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
    # every GEMM weight, LayerNorm, bias and embedding waits for W; fc1's bias comes out of
    # the fused DGELU_BGRAD epilogue of B's GEMM, so it is computed in B (for free)
    assert {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.1.attn.q_proj.weight",
            "blocks.1.attn.k_proj.weight", "blocks.1.attn.o_proj.weight", "head.lm_head.weight",
            "blocks.0.ln1.weight", "blocks.1.ln2.bias", "head.ln_f.weight", "embed.tok.weight",
            "embed.pos.weight", "blocks.0.mlp.fc2.bias", "blocks.0.attn.o_proj.bias"} <= deferred
    in_b = {n for n, p in model.named_parameters()} - deferred
    assert in_b <= {f"blocks.{i}.mlp.fc1.bias" for i in range(2)}, in_b
    assert bucket
    wgrad.flush(bucket)  # W
    assert not bucket
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("affine", [True, False])
def test_deferred_layer_norm_and_embedding(affine):
    """wgrad.layer_norm / wgrad.embedding: outputs equal torch's; B gives the input gradient,
    W the parameters' (accumulating onto existing gradients); no context: torch's gradients."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(8, dtype=torch.float64, requires_grad=True) if affine else None
    table = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 3, 3, 0, 10]] * 3)
    params = [p for p in (w, b, table) if p is not None]

    def loss(ln, emb):
        return ((ln(x, (8,), w, b, 1e-5) + emb(ids, table)) ** 2).sum()

    ref = torch.autograd.grad(loss(F.layer_norm, F.embedding), [x] + params)
    got_now = torch.autograd.grad(loss(wgrad.layer_norm, wgrad.embedding), [x] + params)
    for r, g in zip(ref, got_now):
        torch.testing.assert_close(g, r)

    for p in params:  # W accumulates onto what is there
        p.grad = torch.ones_like(p)
    bucket = []
    with wgrad.defer_weight_grads(bucket):
        loss(wgrad.layer_norm, wgrad.embedding).backward()
    torch.testing.assert_close(x.grad, ref[0])
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)  # untouched in B
    wgrad.flush(bucket)
    for p, r in zip(params, ref[1:]):
        torch.testing.assert_close(p.grad, r + 1)
    assert torch.autograd.gradcheck(lambda x_: wgrad.layer_norm(x_, (8,), w, b, 1e-5), (x,))
