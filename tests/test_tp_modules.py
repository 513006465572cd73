"""Each TP module against its single-device twin with the same full weights: outputs and
every gradient (gloo, 2 and 4 ranks)."""

import pytest
import torch
import torch.nn.functional as F

from distributed import run_ranks
from tp_utils import assert_dicts_close, full_grads, shard_of


def _twins(build, seed, mesh):
    """(TP module on mesh, single-device twin), both built from the same seed."""
    from tandem.mesh import Mesh

    torch.manual_seed(seed)
    tp_mod = build(mesh)
    torch.manual_seed(seed)
    ref = build(Mesh.single())
    assert_dicts_close(tp_mod.full_state_dict(), ref.full_state_dict(), "init")
    return tp_mod, ref


def _compare(tp_mod, ref, x, *, in_dim=None, out_dim=None, rank=0, size=1, what=""):
    """Run both on x (this rank's shard of x along in_dim, if any), compare the output (the
    twin's shard along out_dim, if any), the input gradient and every parameter gradient."""
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    x_loc = (shard_of(x, in_dim, rank, size) if in_dim is not None else x).clone().requires_grad_()
    y = tp_mod(x_loc)
    g_loc = shard_of(g, out_dim, rank, size) if out_dim is not None else g
    want = shard_of(y_ref, out_dim, rank, size) if out_dim is not None else y_ref
    torch.testing.assert_close(y, want.detach(), msg=lambda m: f"{what} output: {m}")
    y.backward(g_loc)
    want_dx = shard_of(x_ref.grad, in_dim, rank, size) if in_dim is not None else x_ref.grad
    torch.testing.assert_close(x_loc.grad, want_dx, msg=lambda m: f"{what} input grad: {m}")
    assert_dicts_close(full_grads(tp_mod), full_grads(ref), f"{what} grads")


def _linear_cases(rank, world_size):
    import tandem
    from tandem.nn import ColumnParallelLinear, ParallelMLP, RowParallelLinear

    mesh = tandem.init_mesh(tp=world_size)
    n = 0
    for bias in (True, False):
        for activation in (None, "gelu", "gelu_tanh"):
            for gather in (False, True):
                tp_mod, ref = _twins(lambda m: ColumnParallelLinear(12, 8, bias, activation=activation,
                                                                    gather_output=gather, mesh=m), n, mesh)
                x = torch.randn(3, 5, 12)
                _compare(tp_mod, ref, x, out_dim=None if gather else -1, rank=rank, size=world_size,
                         what=f"column bias={bias} act={activation} gather={gather}")
                n += 1
        for parallel_in in (True, False):
            for chunks in (1, 3):
                tp_mod, ref = _twins(lambda m: RowParallelLinear(8, 6, bias, input_is_parallel=parallel_in,
                                                                 overlap_chunks=chunks, mesh=m), n, mesh)
                x = torch.randn(2, 7, 8)  # 14 tokens: not divisible by 3 chunks
                _compare(tp_mod, ref, x, in_dim=-1 if parallel_in else None, rank=rank, size=world_size,
                         what=f"row bias={bias} parallel_in={parallel_in} chunks={chunks}")
                n += 1
    for sp in (False, True):
        tp_mod, ref = _twins(lambda m: ParallelMLP(8, 16, sequence_parallel=sp, mesh=m), n, mesh)
        x = torch.randn(2, 4, 8)  # sequence 4, divisible by tp
        sp_dim = 1 if sp else None
        _compare(tp_mod, ref, x, in_dim=sp_dim, out_dim=sp_dim, rank=rank, size=world_size, what=f"mlp sp={sp}")
        # the column + row pair with sequence parallelism, built by hand
        n += 1
    return n


def _attention_cases(rank, world_size):
    import tandem
    from tandem.nn import ParallelSelfAttention

    mesh = tandem.init_mesh(tp=world_size)
    n = 0
    for kv in (None, 2, 1):
        for sp in (False, True):
            for causal in (True, False):
                tp_mod, ref = _twins(lambda m: ParallelSelfAttention(16, 4, num_kv_heads=kv, causal=causal,
                                                                     sequence_parallel=sp, mesh=m), 100 + n, mesh)
                x = torch.randn(2, 8, 16)
                sp_dim = 1 if sp else None
                _compare(tp_mod, ref, x, in_dim=sp_dim, out_dim=sp_dim, rank=rank, size=world_size,
                         what=f"attention kv={kv} sp={sp} causal={causal}")
                n += 1
        # incremental decoding with the KV cache equals the full forward
        tp_mod, ref = _twins(lambda m: ParallelSelfAttention(16, 4, num_kv_heads=kv, mesh=m), 200 + n, mesh)
        x = torch.randn(2, 7, 16)
        with torch.no_grad():
            full = ref(x)
            cache = tp_mod.new_cache(2, 16)
            parts = [tp_mod(x[:, :4], cache), tp_mod(x[:, 4:5], cache), tp_mod(x[:, 5:], cache)]
        torch.testing.assert_close(torch.cat(parts, 1), full, msg=lambda m: f"kv cache kv={kv}: {m}")
        assert cache.k.shape[1] == tp_mod.local_kv_heads
    return n


def _vocab_cases(rank, world_size):
    import tandem
    from tandem.nn import VocabParallelEmbedding, vocab_parallel_cross_entropy

    mesh = tandem.init_mesh(tp=world_size)
    tp_mod, ref = _twins(lambda m: VocabParallelEmbedding(16, 6, mesh=m), 0, mesh)
    ids = torch.randint(0, 16, (3, 5))
    y, y_ref = tp_mod(ids), ref(ids)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert_dicts_close(full_grads(tp_mod), full_grads(ref), "embedding grads")

    for smoothing in (0.0, 0.1):
        logits = torch.randn(3, 5, 16, dtype=torch.float64)
        target = torch.randint(0, 16, (3, 5))
        target[0, :2] = -100
        full = logits.clone().requires_grad_()
        want = F.cross_entropy(full.view(-1, 16), target.view(-1), ignore_index=-100, label_smoothing=smoothing)
        want.backward()
        local = shard_of(logits, -1, rank, world_size).clone().requires_grad_()
        got = vocab_parallel_cross_entropy(local, target, label_smoothing=smoothing, mesh=mesh)
        assert got.dtype == torch.float64  # never downcast
        torch.testing.assert_close(got, want, msg=lambda m: f"ce smoothing={smoothing}: {m}")
        got.backward()
        torch.testing.assert_close(local.grad, shard_of(full.grad, -1, rank, world_size),
                                   msg=lambda m: f"ce grad smoothing={smoothing}: {m}")
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cross_entropy_without_tp_equals_the_sharded_formula(dtype):
    """tp = 1 takes ATen's fused cross entropy; the sharded formula is its reference: loss and
    gradient, with ignored targets, label smoothing, and every target ignored (loss 0)."""
    from tandem.mesh import Mesh
    from tandem.nn import vocab_parallel_cross_entropy
    from tandem.nn._tp import TPInfo
    from tandem.nn.embedding import sharded_cross_entropy

    g = torch.Generator().manual_seed(0)
    for smoothing in (0.0, 0.1):
        for ignored in (2, 15):  # some targets ignored, every target ignored
            logits = (3 * torch.randn(3, 5, 16, generator=g)).to(dtype)
            target = torch.randint(0, 16, (3, 5), generator=g)
            target.view(-1)[:ignored] = -100
            a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            got = vocab_parallel_cross_entropy(a, target, label_smoothing=smoothing, mesh=Mesh.single())
            want = sharded_cross_entropy(b, target, TPInfo(Mesh.single()), label_smoothing=smoothing)
            # low precision is upcast to float32; float64 stays float64, as in F.cross_entropy
            assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            flat = (logits.float() if dtype == torch.bfloat16 else logits).reshape(-1, 16)
            ref = torch.nn.functional.cross_entropy(flat, target.reshape(-1), label_smoothing=smoothing) \
                if ignored < 15 else None
            if ref is not None:
                torch.testing.assert_close(got, ref, msg=lambda m: f"{dtype} against F.cross_entropy: {m}")
            torch.testing.assert_close(got, want, msg=lambda m: f"{dtype} smoothing={smoothing}: {m}")
            got.backward()
            want.backward()
            torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"{dtype} grad smoothing={smoothing}: {m}")
            if ignored == 15:
                assert got.item() == 0.0 and not a.grad.any()


def _all_cases(rank, world_size):
    """Every module in one spawned world (each spawn costs seconds of imports)."""
    return _linear_cases(rank, world_size), _attention_cases(rank, world_size), _vocab_cases(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_modules_match_single_device(world_size):
    linear, attention, vocab = run_ranks(world_size, _all_cases, timeout=300)[0]
    assert (linear, attention, vocab) == (2 * (6 + 4) + 2, 12, True)  # every case ran
