"""Llama-class variants of tandem's GPT (RMSNorm, RoPE with and without Llama 3 scaling,
SwiGLU, GQA with replicated KV heads, Qwen2's q/k/v-only biases) against their single-device
twins at tp=2 and tp=4, sequence parallelism on and off: a block's output, input gradient
and every weight gradient in float64; the whole model's loss and gradients over 3 SGD steps;
KV-cached decoding of left-padded prompts. Plus the pieces on one process: RMSNorm and RoPE
against transformers' formulas, the deferred (W) gradient of RMSNorm, config errors."""

import pytest
import torch

from distributed import run_ranks
from tp_utils import assert_dicts_close, full_grads

F64 = dict(rtol=1e-6, atol=1e-9)  # norm statistics are float32 (as transformers): not 1e-15


def _configs():
    from tandem.models import GPTConfig

    base = dict(vocab_size=32, max_seq_len=16, num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=48,
                activation="swiglu", norm="rmsnorm", norm_eps=1e-6, position="rope")
    return {
        "llama gqa": GPTConfig(**base, num_kv_heads=2, bias=False),
        "llama3 tied": GPTConfig(**base, num_kv_heads=4, bias=False, tie_embeddings=True, rope_theta=5e5,
                                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=8)),
        "qwen2 kv=1": GPTConfig(**base, num_kv_heads=1, bias=False, qkv_bias=True),
        "rmsnorm gelu learned": GPTConfig(**{**base, "activation": "gelu_tanh", "position": "learned"}),
    }


def _block_check(cfg, mesh, what):
    """GPTBlock at tp against tp=1: output, input gradient, every weight gradient (float64)."""
    from tandem.mesh import Mesh
    from tandem.models.gpt import GPTBlock

    torch.manual_seed(1)  # the same full weights on every rank
    ref = GPTBlock(cfg, mesh=Mesh.single(), dtype=torch.float64)
    blk = GPTBlock(cfg, mesh=mesh, dtype=torch.float64)
    blk.load_full_state_dict(ref.full_state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, cfg.hidden_size, generator=g, dtype=torch.float64)
    w = torch.randn(2, 8, cfg.hidden_size, generator=g, dtype=torch.float64)  # d loss / d output
    tp, r = mesh.tp, mesh.tp_rank
    sp = cfg.sequence_parallel
    mine = (lambda t: t.chunk(tp, dim=1)[r]) if sp else (lambda t: t)  # (b, s/tp, h) with sp
    x_ref, x_tp = x.clone().requires_grad_(), mine(x).clone().requires_grad_()
    y_ref, y_tp = ref(x_ref), blk(x_tp)
    (y_ref * w).sum().backward()
    (y_tp * mine(w)).sum().backward()
    torch.testing.assert_close(y_tp, mine(y_ref), msg=lambda m: f"{what} output: {m}", **F64)
    torch.testing.assert_close(x_tp.grad, mine(x_ref.grad), msg=lambda m: f"{what} input grad: {m}", **F64)
    assert_dicts_close(full_grads(blk), full_grads(ref), f"{what} weight grads", **F64)


def _decode_check(cfg, mesh, what):
    """KV-cached greedy decoding of left-padded prompts at tp equals tp=1."""
    from dataclasses import replace

    from tandem.mesh import Mesh
    from tandem.models import GPT

    cfg = replace(cfg, sequence_parallel=False)
    torch.manual_seed(4)
    ref = GPT(cfg, mesh=Mesh.single(), dtype=torch.float64)
    model = GPT(cfg, mesh=mesh, dtype=torch.float64)
    model.load_full_state_dict(ref.full_state_dict())
    prompt = torch.randint(1, 32, (3, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    want = ref.generate(prompt, 8, attention_mask=mask)
    got = model.generate(prompt, 8, attention_mask=mask)
    assert torch.equal(got, want), f"{what}: decoding differs\n{got}\n{want}"


def _worker(rank, world_size):
    from dataclasses import replace

    import tandem
    from tandem.models import GPT
    from test_tp_models import _train_and_compare

    mesh = tandem.init_mesh(tp=world_size)
    configs = _configs()
    for name, cfg in configs.items():
        for sp in (False, True):
            _block_check(replace(cfg, sequence_parallel=sp), mesh, f"{name} sp={sp} tp={world_size}")
    # the whole model over SGD steps: loss, every gradient, the weights after
    for name, sp in (("llama gqa", True), ("qwen2 kv=1", False), ("llama3 tied", False)):
        c = replace(configs[name], sequence_parallel=sp)
        _train_and_compare(lambda m: GPT(c, mesh=m), None, mesh, steps=2, what=f"{name} sp={sp} tp={world_size}")
    _decode_check(configs["llama gqa"], mesh, "llama gqa")
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_llama_variants_match_tp1(world_size):
    assert all(run_ranks(world_size, _worker, timeout=300))


# ---- one process ------------------------------------------------------------------------------

def test_rms_norm_matches_transformers_formula_and_defers_its_weight_grad():
    from tandem.nn import wgrad as W

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 16, generator=g).to(dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(16, generator=g)).to(dtype).requires_grad_()
        # transformers' LlamaRMSNorm, written out
        xf = x.to(torch.float32)
        want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        got = W.rms_norm(x, w, 1e-6)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        dy = torch.randn(3, 5, 16, generator=g).to(dtype)
        gx_want, gw_want = torch.autograd.grad(want, (x, w), dy)
        gx, gw = torch.autograd.grad(got, (x, w), dy)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(gx, gx_want, **tol)
        torch.testing.assert_close(gw, gw_want, **tol)
    # inside defer_weight_grads the input gradient comes at once, the weight's at flush (W)
    x = torch.randn(4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.nn.Parameter(torch.rand(16, generator=g, dtype=torch.float64) + 0.5)
    dy = torch.randn(4, 16, generator=g, dtype=torch.float64)
    gx_now, gw_now = torch.autograd.grad(W.rms_norm(x, w), (x, w), dy)
    bucket = []
    with W.defer_weight_grads(bucket):
        W.rms_norm(x, w).backward(dy)
    torch.testing.assert_close(x.grad, gx_now)
    assert w.grad is None and len(bucket) == 1
    W.flush(bucket)
    torch.testing.assert_close(w.grad, gw_now)


def test_rope_matches_the_rotate_half_formula_and_llama3_scaling():
    import math

    from tandem.nn.rope import apply_rope, rope_cos_sin, rope_inv_freq

    hd, theta = 8, 10000.0
    inv = rope_inv_freq(hd, theta)
    torch.testing.assert_close(inv, torch.tensor([theta ** (-2 * i / hd) for i in range(hd // 2)]))
    pos = torch.tensor([[0, 3, 7]])
    cos, sin = rope_cos_sin(pos, inv, torch.float64)
    q = torch.randn(1, 2, 3, hd, dtype=torch.float64)
    got = apply_rope(q, cos, sin)
    # dimension i pairs with i + hd/2, rotated by pos * inv[i]
    for s, p in enumerate(pos[0].tolist()):
        for i in range(hd // 2):
            a = torch.tensor(p * float(inv[i]), dtype=torch.float32).double()  # angles in float32
            x1, x2 = q[0, :, s, i], q[0, :, s, i + hd // 2]
            torch.testing.assert_close(got[0, :, s, i], x1 * a.cos() - x2 * a.sin(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(got[0, :, s, i + hd // 2], x2 * a.cos() + x1 * a.sin(), rtol=1e-6, atol=1e-7)
    # rotations keep norms; position 0 is the identity
    torch.testing.assert_close(got.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(got[:, :, 0], q[:, :, 0])
    # Llama 3: long wavelengths divided by factor, short ones kept
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    big = rope_inv_freq(64, 5e5, scaling)
    plain = rope_inv_freq(64, 5e5)
    wavelen = 2 * math.pi / plain
    torch.testing.assert_close(big[wavelen < 16], plain[wavelen < 16])
    torch.testing.assert_close(big[wavelen > 64], plain[wavelen > 64] / 8)


def test_bad_configs_are_clear_errors():
    from tandem.mesh import Mesh
    from tandem.models import GPT, GPTConfig

    with pytest.raises(ValueError, match="norm must be 'layernorm' or 'rmsnorm'"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="position must be 'learned' or 'rope'"):
        GPTConfig(position="alibi")
    with pytest.raises(ValueError, match="activation must be one of"):
        GPTConfig(activation="relu")
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        GPTConfig(position="rope", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"llama3 scaling needs \['low_freq_factor'"):
        GPTConfig(position="rope", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        GPTConfig(num_kv_heads=3)
    tp2 = Mesh(tp=2, pp=1, dp=1, rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="ffn_hidden_size=51"):
        GPT(GPTConfig(activation="swiglu", ffn_hidden_size=51), mesh=tp2)
    model = GPT(GPTConfig(position="rope", norm="rmsnorm", activation="swiglu"))
    with pytest.raises(ValueError, match="padding must be on the left"):
        model.generate(torch.ones(2, 3, dtype=torch.int64), 2, attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="a row has no token"):
        model.generate(torch.ones(2, 3, dtype=torch.int64), 2, attention_mask=torch.tensor([[0, 0, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(torch.ones(1, 3, dtype=torch.int64), 2, temperature=1.0, top_p=1.5)


def test_sampling_filters():
    from tandem.models.sampling import Sampling, filter_logits, pick

    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.9]])
    kept = filter_logits(logits, 2, None).isfinite()
    assert kept.tolist() == [[True, False, True, False], [False, False, True, True]]
    # probabilities of row 0: 0.64, 0.09, 0.24, 0.03: top-p 0.7 keeps 3.0 and 2.0
    kept = filter_logits(logits, None, 0.7).isfinite()
    assert kept[0].tolist() == [True, False, True, False]
    assert filter_logits(logits, None, 1e-9).isfinite().sum(-1).tolist() == [1, 1]  # the best always stays
    # top_k=1 is greedy whatever the temperature; a sample stays inside the top-k set
    assert torch.equal(pick(logits, Sampling(temperature=5.0, top_k=1), step=0), logits.argmax(-1))
    wide = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    allowed = wide.topk(5, dim=-1).indices
    for step in range(20):
        tok = pick(wide, Sampling(temperature=2.0, top_k=5, seed=1), step)
        assert (allowed == tok[:, None]).any(-1).all()
    # the noise belongs to the whole batch: any grouping of rows draws the same tokens
    s = Sampling(temperature=1.0, seed=9)
    whole = pick(wide, s, 3)
    rows = torch.tensor([5, 6, 7])
    assert torch.equal(pick(wide[rows], s, 3, rows=rows, batch=64), whole[rows])
