"""tandem.lr (warmup then cosine / linear / constant) and tandem.metrics (model FLOPs against
Narayanan et al.'s closed form and torch's FLOP counter, MFU peaks, memory per rank)."""

import math

import pytest
import torch

from tandem.lr import LRSchedule
from tandem.metrics import (SavedActivations, memory_breakdown, model_flops_per_token, narayanan_flops,
                            peak_tflops)


def test_lr_schedule_warmup_then_decay():
    cos = LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14, decay="cosine")
    assert [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(4) == 1.0 and cos(13) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    assert cos(4 + 9 / 2) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    lin = LRSchedule(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14, decay="linear")
    assert lin(4) == 1.0 and lin(13) == pytest.approx(0.1) and lin(7) == pytest.approx(1.0 - 0.9 * 3 / 9)
    const = LRSchedule(lr=2e-3, total_steps=10, decay="constant", warmup_steps=2)
    assert [const(s) for s in (0, 1, 2, 9)] == [1e-3, 2e-3, 2e-3, 2e-3]
    assert LRSchedule(lr=1.0, total_steps=1)(0) == 1.0  # no decay span: the peak
    assert all(cos(s) >= cos(s + 1) for s in range(4, 20))  # monotone after warmup
    assert LRSchedule.from_state_dict(cos.state_dict()) == cos
    assert cos.differences(lin) == ["decay 'cosine' vs 'linear'"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=5.0)
    assert cos.apply(opt, 1) == 0.5 and opt.param_groups[0]["lr"] == 0.5
    for kw, message in ((dict(lr=0.0), "lr must be"), (dict(min_lr=2.0), "min_lr must be in"),
                        (dict(warmup_steps=20), "warmup_steps must be in"), (dict(decay="step"), "decay must be one"),
                        (dict(total_steps=0), "total_steps must be >= 1")):
        with pytest.raises(ValueError, match=message):
            LRSchedule(**{**dict(lr=1.0, total_steps=10), **kw})


def _cfg(**kw):
    from tandem.models import GPTConfig

    return GPTConfig(vocab_size=128, max_seq_len=32, num_layers=2, hidden_size=64, num_heads=4, **kw)


def test_model_flops_match_narayanan_and_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from tandem.models import GPT

    b, s = 3, 32
    gpt2 = _cfg()
    assert model_flops_per_token(gpt2) * b * s == pytest.approx(narayanan_flops(b, s, 2, 64, 128), rel=1e-12)
    # a Llama-class model (SwiGLU of another width, GQA): every GEMM torch's counter sees in
    # forward + backward, plus attention's two GEMMs (4 b s^2 h per layer forward, x3), which
    # the counter does not see inside SDPA on CPU
    llama = _cfg(norm="rmsnorm", position="rope", activation="swiglu", num_kv_heads=2, bias=False, ffn_hidden_size=96)
    torch.manual_seed(0)
    model = GPT(llama)
    ids = torch.randint(0, 128, (b, s))
    with FlopCounterMode(display=False) as counter:
        model(ids, ids).backward()
    attention = 3 * 4 * b * s * s * 64 * 2
    assert counter.get_total_flops() + attention == model_flops_per_token(llama) * b * s


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert peak_tflops("NVIDIA L40", "bf16") is None  # not L4, not L40S: unknown
    assert peak_tflops("NVIDIA GH200 480GB", "bf16") is None
    assert peak_tflops("cpu", "fp32") is None


def test_memory_of_params_grads_adam_and_saved_activations():
    lin = torch.nn.Linear(64, 32)  # 64*32 + 32 floats
    params = list(lin.parameters())
    meter = SavedActivations(exclude=params)
    x = torch.randn(8, 64, requires_grad=True)
    with meter.measure():
        h = lin(x)  # saves x (not the weight: a parameter)
        y = torch.exp(h)  # saves its result y
        loss = y.sum()
    assert meter.current == meter.peak == (8 * 64 + 8 * 32) * 4
    loss.backward()
    del h, y, loss
    assert meter.current == 0 and meter.peak == (8 * 64 + 8 * 32) * 4
    opt = torch.optim.AdamW(params)
    opt.step()
    nbytes = (64 * 32 + 32) * 4
    mem = memory_breakdown(params, opt, meter.peak)
    assert mem["params"] == mem["grads"] == nbytes
    assert mem["optimizer"] == 2 * nbytes + 2 * 4  # exp_avg, exp_avg_sq; a float32 step per tensor
    assert mem["activations"] == meter.peak and mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert not math.isnan(mem["total"])


def test_tf32_is_read_through_the_api_torch_was_set_with():
    """MFU's peak column: fp32 GEMMs count as tf32 when torch allows TF32, whether the
    legacy flag or the new fp32_precision API set it (reading the legacy flag after the new
    API raises in torch). The setting is global: one process of its own, legacy cases first."""
    import subprocess
    import sys

    code = """
import torch
from tandem.metrics import compute_dtype_name as name
m = torch.backends.cuda.matmul
seen = [name(torch.float32)]
m.allow_tf32 = True; seen.append(name(torch.float32))
m.allow_tf32 = False; seen.append(name(torch.float32))
m.fp32_precision = "tf32"; seen.append(name(torch.float32))
m.fp32_precision = "none"; torch.backends.fp32_precision = "tf32"; seen.append(name(torch.float32))
m.fp32_precision = "ieee"; seen.append(name(torch.float32))
print(*seen, name(torch.bfloat16), name(torch.float16))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["fp32", "tf32", "fp32", "tf32", "tf32", "fp32", "bf16", "fp16"], r.stdout
