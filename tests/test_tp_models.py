"""GPT, parallelize (tandem's GPT, GPT-2- and Llama-style trees) and checkpoints across TP
sizes, against tp=1 (gloo, 2 and 4 ranks)."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed import run_ranks
from tp_utils import assert_dicts_close, full_grads


# ---- GPT-2- and Llama-style module trees, as users write them --------------------------

class _Attention(nn.Module):
    """q/k/v as three projections (Llama names) or one fused [q; k; v] c_attn (GPT-2 names)."""

    def __init__(self, h, heads, kv_heads, bias, out_name, fused=False):
        super().__init__()
        self.head_dim = h // heads
        if fused:
            self.c_attn = nn.Linear(h, 3 * h, bias=bias)
        else:
            self.q_proj = nn.Linear(h, h, bias=bias)
            self.k_proj = nn.Linear(h, kv_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(h, kv_heads * self.head_dim, bias=bias)
        setattr(self, out_name, nn.Linear(h, h, bias=bias))
        self.out_name, self.fused = out_name, fused

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, -1) if self.fused else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)  # heads from the (sharded) width
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        return getattr(self, self.out_name)(y)


class _GPT2MLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class _GPT2Block(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(h), _Attention(h, heads, heads, True, "c_proj", fused=True)
        self.ln_2, self.mlp = nn.LayerNorm(h), _GPT2MLP(h)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Style(nn.Module):
    def __init__(self, vocab=32, seq=8, h=16, heads=4, layers=2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, h), wpe=nn.Embedding(seq, h),
            h=nn.ModuleList(_GPT2Block(h, heads) for _ in range(layers)), ln_f=nn.LayerNorm(h)))
        self.lm_head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids, targets):
        t = self.transformer
        x = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
        for block in t.h:
            x = block(x)
        logits = self.lm_head(t.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class _LlamaMLP(nn.Module):
    def __init__(self, h, ffn):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, ffn, bias=False), nn.Linear(h, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _LlamaLayer(nn.Module):
    def __init__(self, h, heads, kv_heads):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(h), nn.RMSNorm(h)
        self.self_attn, self.mlp = _Attention(h, heads, kv_heads, False, "o_proj"), _LlamaMLP(h, 24)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStyle(nn.Module):
    def __init__(self, vocab=32, h=16, heads=4, kv_heads=4, layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, h)
        self.model.layers = nn.ModuleList(_LlamaLayer(h, heads, kv_heads) for _ in range(layers))
        self.model.norm = nn.RMSNorm(h)
        self.lm_head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids, targets):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return F.cross_entropy(self.lm_head(self.model.norm(x)).flatten(0, 1), targets.flatten())


# ---- training equivalence -----------------------------------------------------------------

def _train_and_compare(build, plan, mesh, steps=3, what=""):
    import tandem
    from tandem.mesh import Mesh

    torch.manual_seed(0)
    ref = build(Mesh.single())
    torch.manual_seed(0)
    model = tandem.parallelize(build(Mesh.single()), mesh, plan)
    assert_dicts_close(model.full_state_dict() if hasattr(model, "full_state_dict")
                       else tandem.nn.full_state_dict(model), tandem.nn.full_state_dict(ref), f"{what} init")
    # SGD, not Adam: Adam turns the ~1e-9 gradient of a key bias (softmax ignores it) into full steps
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        ids = torch.randint(0, 32, (2, 8), generator=gen)
        targets = torch.randint(0, 32, (2, 8), generator=gen)
        loss_ref, loss = ref(ids, targets), model(ids, targets)
        loss_ref.backward()
        loss.backward()
        torch.testing.assert_close(loss, loss_ref, msg=lambda m: f"{what} step {step} loss: {m}")
        assert_dicts_close(full_grads(model), full_grads(ref), f"{what} step {step} grads", rtol=1e-4, atol=1e-5)
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    assert_dicts_close(tandem.nn.full_state_dict(model), tandem.nn.full_state_dict(ref), f"{what} weights",
                       rtol=1e-4, atol=1e-5)


def _models_worker(rank, world_size):
    import tandem
    from tandem.models import GPT, GPTConfig

    mesh = tandem.init_mesh(tp=world_size)
    for tie, sp, kv in ((False, False, None), (True, True, 2), (True, False, 1)):
        cfg = GPTConfig(vocab_size=32, max_seq_len=8, num_layers=2, hidden_size=16, num_heads=4,
                        num_kv_heads=kv, ffn_hidden_size=32, tie_embeddings=tie, sequence_parallel=sp)
        _train_and_compare(lambda m: GPT(cfg, mesh=m), None, mesh, what=f"gpt tie={tie} sp={sp} kv={kv}")
    _train_and_compare(lambda m: GPT2Style(), tandem.GPT2_PLAN, mesh, what="gpt2-style")
    _train_and_compare(lambda m: LlamaStyle(kv_heads=world_size), tandem.LLAMA_PLAN, mesh, what="llama-style")
    _train_and_compare(lambda m: LlamaStyle(kv_heads=1), tandem.LLAMA_PLAN, mesh, what="llama-style kv=1 < tp")
    # built directly at tp (no parallelize): the same full weights as the seeded plain model
    torch.manual_seed(5)
    direct = GPT(cfg, mesh=mesh)
    torch.manual_seed(5)
    plain = GPT(cfg, mesh=tandem.Mesh.single())
    assert_dicts_close(direct.full_state_dict(), plain.full_state_dict(), "direct init")
    return True


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallelized_models_train_like_tp1(world_size):
    assert all(run_ranks(world_size, _models_worker, timeout=300))


# ---- checkpoints --------------------------------------------------------------------------

def _checkpoint_worker(rank, world_size, path):
    import tandem
    from tandem import checkpoint
    from tandem.models import GPT, GPTConfig

    shape = dict(vocab_size=32, max_seq_len=8, num_layers=2, hidden_size=16, num_heads=4, num_kv_heads=2,
                 ffn_hidden_size=32)
    # GPT-2-class, and Llama-class whose SwiGLU [gate; up] shards interleave by rank
    for cfg in (GPTConfig(**shape), GPTConfig(**shape, activation="swiglu", norm="rmsnorm", position="rope")):
        torch.manual_seed(3)
        m4 = GPT(cfg, mesh=tandem.init_mesh(tp=4))
        saved = m4.full_state_dict()
        checkpoint.save(m4, path, extra={"config": "x"})
        torch.manual_seed(4)  # different weights, overwritten by the load
        m2 = GPT(cfg, mesh=tandem.init_mesh(tp=2))
        checkpoint.load(m2, path)
        assert_dicts_close(m2.full_state_dict(), saved, f"{cfg.activation} tp=4 -> tp=2", rtol=0, atol=0)
        checkpoint.save(m2, path)  # over the existing checkpoint
        torch.manual_seed(5)
        m1 = GPT(cfg, mesh=tandem.Mesh.single())
        checkpoint.load(m1, path)
        assert_dicts_close(m1.full_state_dict(), saved, f"{cfg.activation} tp=2 -> tp=1", rtol=0, atol=0)
        assert checkpoint.read_extra(path) == {}
    return sorted(os.listdir(os.path.dirname(path)))


def test_checkpoint_moves_between_tp_sizes(tmp_path):
    path = str(tmp_path / "ckpt")
    listing = run_ranks(4, _checkpoint_worker, path, timeout=300)
    assert listing[0] == ["ckpt"]  # no .partial or .old left behind


def test_interrupted_save_never_loads(tmp_path):
    from tandem import checkpoint
    from tandem.models import GPT, GPTConfig
    from tandem.mesh import Mesh

    model = GPT(GPTConfig(num_layers=1), mesh=Mesh.single())
    path = str(tmp_path / "ckpt")
    os.makedirs(path + ".partial")  # what a save killed mid-way leaves
    (tmp_path / "ckpt.partial" / "__0_0.distcp").write_bytes(b"half")
    with pytest.raises(FileNotFoundError, match="interrupted save"):
        checkpoint.load(model, path)
    os.makedirs(path)  # a directory without the metadata is not a checkpoint either
    with pytest.raises(FileNotFoundError, match="not a complete tandem checkpoint"):
        checkpoint.load(model, path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(model, str(tmp_path / "missing"))


# ---- bad input ------------------------------------------------------------------------------

def _bad_mesh_worker(rank, world_size):
    import tandem

    msgs = []
    for kwargs in (dict(tp=3), dict(tp=1, pp=1, dp=3), dict(tp=0)):
        try:
            tandem.init_mesh(**kwargs)
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def test_bad_world_size_is_a_clear_error():
    msgs = run_ranks(2, _bad_mesh_worker)[0]
    assert len(msgs) == 3
    assert "world size 2 is not divisible by tp*pp = 3*1" in msgs[0]
    assert "world size 2 != tp*pp*dp = 1*1*3 = 3" in msgs[1]
    assert "tp must be a positive integer" in msgs[2]


def test_non_divisible_sizes_are_clear_errors():
    from tandem.mesh import Mesh
    from tandem.models import GPT, GPTConfig
    from tandem.nn import ColumnParallelLinear, ParallelSelfAttention, RowParallelLinear, VocabParallelEmbedding

    tp2 = Mesh(tp=2, pp=1, dp=1, rank=0, device=torch.device("cpu"))  # checks run before any communication
    with pytest.raises(ValueError, match=r"out_features=7 is not divisible by the tensor-parallel degree tp=2.*8"):
        ColumnParallelLinear(4, 7, mesh=tp2)
    with pytest.raises(ValueError, match="in_features=5 is not divisible"):
        RowParallelLinear(5, 4, mesh=tp2)
    with pytest.raises(ValueError, match="num_embeddings=33 is not divisible"):
        VocabParallelEmbedding(33, 4, mesh=tp2)
    with pytest.raises(ValueError, match="num_heads=3 is not divisible"):
        ParallelSelfAttention(12, 3, mesh=tp2)
    tp4 = Mesh(tp=4, pp=1, dp=1, rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="num_kv_heads=3 < tp=4 must divide tp"):
        ParallelSelfAttention(24, 12, num_kv_heads=3, mesh=tp4)
    with pytest.raises(ValueError, match="not divisible by tp=4: vocab_size=30"):
        GPT(GPTConfig(vocab_size=30), mesh=tp4)
    with pytest.raises(ValueError, match="hidden_size=10 is not divisible by num_heads=4"):
        GPTConfig(hidden_size=10)


def test_bad_plans_are_clear_errors():
    import tandem
    from tandem.mesh import Mesh

    tp2 = Mesh(tp=2, pp=1, dp=1, rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"pattern 'transformer.h.\*.nothing' matches no module"):
        tandem.parallelize(GPT2Style(), tp2, {"transformer.h.*.nothing": "colwise"})
    with pytest.raises(TypeError, match="'transformer.ln_f' is a LayerNorm, but style 'colwise' applies to nn.Linear"):
        tandem.parallelize(GPT2Style(), tp2, {"transformer.ln_f": "colwise"})
    with pytest.raises(ValueError, match="unknown style 'diagonal'"):
        tandem.parallelize(GPT2Style(), tp2, {"lm_head": "diagonal"})
    with pytest.raises(ValueError, match="pass a plan"):
        tandem.parallelize(GPT2Style(), tp2)
