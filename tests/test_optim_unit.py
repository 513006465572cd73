"""tandem.optim, tandem.recompute and tandem.memory in one process: against torch's own
optimizer and clipping on the same model, the loss-scale rule, weight-decay groups, saved
activation bytes against the model of benchmarks/bench_memory.py, and bad input."""

import math
import os
import sys

import pytest
import torch
from torch import nn

import tandem
from tandem.models import GPT, GPTConfig
from tandem.optim import (DistributedOptimizer, DynamicLossScaler, MixedPrecisionOptimizer, clip_grad_norm_,
                          weight_decay_groups)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _gpt(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, max_seq_len=16, num_layers=2, hidden_size=32, num_heads=4)
    return GPT(GPTConfig(**{**cfg, **kw}), mesh=tandem.Mesh.single())


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)


def test_weight_decay_groups_decay_linear_weights_only():
    model = _gpt(tie_embeddings=False)
    decay, no_decay = weight_decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        n for n, p in model.named_parameters()
        if n.endswith("weight") and p.dim() == 2 and not n.startswith("embed."))
    assert {names[id(p)] for p in no_decay["params"]} >= {"embed.tok.weight", "embed.pos.weight", "head.ln_f.weight",
                                                          "blocks.0.attn.o_proj.bias", "blocks.1.ln2.bias"}
    assert "head.lm_head.weight" in {names[id(p)] for p in decay["params"]}
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        weight_decay_groups(model, -1.0)


@pytest.mark.parametrize("cls", [MixedPrecisionOptimizer, DistributedOptimizer])
def test_fp32_steps_equal_torch_adamw_with_clipping(cls):
    ref, model = _gpt(tie_embeddings=True), _gpt(tie_embeddings=True)
    for m in (ref, model):  # softmax ignores the key bias: AdamW would step on roundoff
        for block in m.blocks:
            block.attn.k_proj.bias.requires_grad_(False)
    opt_ref = torch.optim.AdamW(weight_decay_groups(ref, 0.1), lr=1e-3)
    opt = cls(weight_decay_groups(model, 0.1), torch.optim.AdamW, mesh=tandem.Mesh.single(), lr=1e-3,
              bucket_bytes=4096)
    assert len(opt.layout.buckets) > 3  # several buckets, one parameter split by none
    for _ in range(4):
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            m(*_batch()).backward()
        want = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 0.5)
        got = clip_grad_norm_(opt, 0.5)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        opt_ref.step()
        assert opt.step()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert opt.state_bytes() == 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_clip_plain_gradients_like_torch_and_report_non_finite():
    model, ref = _gpt(), _gpt()
    for m in (model, ref):
        m(*_batch()).backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    got = tandem.clip_grad_norm_(model, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=0)
    inf = tandem.clip_grad_norm_(model.parameters(), 1e-3, norm_type=math.inf)
    assert inf == max(p.grad.abs().max() for p in ref.parameters())
    model.blocks[0].ln1.weight.grad[0] = float("nan")
    before = [p.grad.clone() for p in model.parameters()]
    norm = tandem.clip_grad_norm_(model, 1e-3)
    assert math.isnan(norm), norm  # reported, and no gradient was scaled by it
    for a, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match="the total norm of order 2.0 of the gradients is nan"):
        tandem.clip_grad_norm_(model, 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        tandem.clip_grad_norm_(model, 0.0)


def test_fp16_loss_scale_skips_overflow_and_grows():
    model = _gpt().to(torch.float16)
    opt = MixedPrecisionOptimizer(model.parameters(), torch.optim.AdamW, mesh=tandem.Mesh.single(), lr=1e-3,
                                  loss_scaler=DynamicLossScaler(init_scale=1024.0, growth_interval=2))
    assert opt.scaler is not None and opt.loss_scale == 1024.0
    weights = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    opt.scale_loss(model(*_batch())).backward()
    assert all(p.grad is None and p.main_grad.dtype == torch.float32 for p in model.parameters())
    model.embed.pos.weight.main_grad[0, 0] = float("inf")
    assert opt.step() is False and opt.loss_scale == 512.0
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for _ in range(2):
        opt.zero_grad()
        opt.scale_loss(model(*_batch())).backward()
        assert opt.step() is True
    assert opt.loss_scale == 1024.0 and opt.scaler.skipped_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert all(pc.master.dtype == torch.float32 for pc in opt.layout.pieces)


def test_loss_scaler_and_optimizer_refuse_bad_input():
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        DynamicLossScaler(backoff_factor=2.0)
    with pytest.raises(ValueError, match="growth_interval must be an int >= 1"):
        DynamicLossScaler(growth_interval=0)
    model = _gpt()
    with pytest.raises(TypeError, match="optimizer_class must be a torch.optim.Optimizer subclass"):
        MixedPrecisionOptimizer(model.parameters(), "adamw")
    with pytest.raises(ValueError, match="empty parameter list"):
        MixedPrecisionOptimizer([], torch.optim.AdamW)
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match=r"a parameter of shape \(2,\) does not require grad"):
        MixedPrecisionOptimizer([frozen], torch.optim.AdamW)
    with pytest.raises(ValueError, match="appears twice"):
        MixedPrecisionOptimizer([model.embed.pos.weight, model.embed.pos.weight], torch.optim.AdamW)
    with pytest.raises(TypeError, match="use module.parameters()"):
        MixedPrecisionOptimizer(model, torch.optim.AdamW)
    with pytest.raises(ValueError, match="reduce_dtype must be"):
        MixedPrecisionOptimizer(model.parameters(), torch.optim.AdamW, reduce_dtype=torch.float16)
    with pytest.raises(TypeError, match='loss_scaler must be "dynamic"'):
        MixedPrecisionOptimizer(model.parameters(), torch.optim.AdamW, loss_scaler=3.0)


def test_recompute_same_gradients_and_bad_modes():
    grads = {}
    for mode in ("none", "selective", "full"):
        model = _gpt(recompute=mode, num_kv_heads=2)
        assert tandem.recomputation.recompute_mode(model.blocks[0]) == mode
        model(*_batch()).backward()
        grads[mode] = [p.grad for p in model.parameters()]
        with torch.no_grad():  # decoding: no checkpoint, same tokens
            prompt = _batch()[0][:1, :4]
            assert torch.equal(model.generate(prompt, 3), _gpt(num_kv_heads=2).generate(prompt, 3))
    for mode in ("selective", "full"):
        for a, b in zip(grads["none"], grads[mode]):
            assert torch.equal(a, b), mode
    block = _gpt().blocks[0]
    tandem.recompute(block, "full")
    tandem.recompute(block, "none")  # undone
    assert tandem.recomputation.recompute_mode(block) == "none" and "forward" not in vars(block)
    with pytest.raises(ValueError, match="recompute: mode must be one of"):
        tandem.recompute(block, "some")
    with pytest.raises(ValueError, match="holds no module with an attention_core"):
        tandem.recompute(nn.Linear(2, 2), "selective")
    with pytest.raises(ValueError, match="recompute must be 'none', 'selective' or 'full'"):
        GPTConfig(recompute="all")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_saved_activation_bytes_match_the_model(dtype):
    """One block, tp = 1: measured bytes equal the benchmark's model of tandem's block
    (Korthikanti et al. without dropout) for flash attention without recomputation, selective
    and full; full recomputation keeps exactly the paper's 2sbh."""
    import bench_memory
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from tandem.memory import korthikanti_bytes, saved_activation_bytes
    from tandem.models.gpt import GPTBlock

    s, b, h, a = 32, 2, 64, 4
    width = torch.finfo(dtype).bits // 8
    stats = torch.ops.aten.native_layer_norm(torch.zeros(1, 2, dtype=dtype), [2], None, None, 1e-5)[1].element_size()
    measured = {}
    for mode in ("none", "selective", "full"):
        cfg = GPTConfig(vocab_size=64, max_seq_len=s, num_layers=1, hidden_size=h, num_heads=a)
        torch.manual_seed(0)
        block = tandem.recompute(GPTBlock(cfg, mesh=tandem.Mesh.single(), dtype=dtype), mode)
        x = torch.randn(b, s, h, dtype=dtype, requires_grad=True)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            measured[mode], y = saved_activation_bytes(block, x, params=list(block.parameters()))
            y.float().sum().backward()
        model = bench_memory.tandem_model(s=s, b=b, h=h, a=a, t=1, sp=False, recompute=mode, attention="flash",
                                          bytes_per_value=width, stats_bytes=stats)
        assert measured[mode] == model, (mode, measured[mode], model)
    assert measured["full"] == korthikanti_bytes(s=s, b=b, h=h, a=a, recompute="full", bytes_per_value=width)
    assert measured["none"] > measured["selective"] > 10 * measured["full"]
    assert korthikanti_bytes(s=s, b=b, h=h, a=a) == s * b * h * (34 + 5 * a * s / h)
    assert korthikanti_bytes(s=s, b=b, h=h, a=a, t=4, sequence_parallel=True, recompute="selective") == \
        s * b * h * 34 / 4
