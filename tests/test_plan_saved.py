"""The activation memory model against tandem's GPT: saved-tensor bytes measured with
torch.autograd.graph.saved_tensors_hooks (each storage once, parameters left out) at three
layouts (tp=1; tp=2; tp=2 with sequence parallelism), within 5% of tandem.plan's
prediction for the whole model (embedding, blocks, head and loss), recomputation none."""

import pytest
import torch

from distributed import run_ranks

CFG = dict(vocab_size=512, max_seq_len=64, num_layers=3, hidden_size=128, num_heads=4)
BATCH = 4


def _measure(mesh, sp: bool) -> int:
    from tandem.models import GPT, GPTConfig
    from tandem.plan.saved import saved_activation_bytes

    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG, sequence_parallel=sp), mesh=mesh)
    ids, targets = torch.randint(0, CFG["vocab_size"], (2, BATCH, CFG["max_seq_len"]))
    nbytes, loss = saved_activation_bytes(lambda: model(ids, targets), exclude=list(model.parameters()))
    loss.backward()  # the graph the bytes belong to runs
    return nbytes


def _predict(tp: int, sp: bool) -> float:
    from tandem.models import GPTConfig
    from tandem.plan import load_model
    from tandem.plan.activations import bytes_per_gpu, embedding_terms, head_terms, layer_activation_bytes

    model = load_model(GPTConfig(**CFG))
    kw = dict(seq_len=CFG["max_seq_len"], microbatch=BATCH, saved="tandem")
    block = layer_activation_bytes(model, tp=tp, sequence_parallel=sp, dtype_bytes=4, **kw)  # fp32 on CPU
    ends = embedding_terms(model, tp=tp, **kw) + head_terms(model, tp=tp, dtype_bytes=4, **kw)
    return float(CFG["num_layers"] * block + bytes_per_gpu(ends, tp, sp))


def _tp2(rank, world):
    import tandem

    mesh = tandem.init_mesh(tp=2)
    return {sp: _measure(mesh, sp) for sp in (False, True)}


def test_saved_activations_of_tandems_gpt_match_the_model():
    from tandem.mesh import Mesh

    measured = {(1, False): _measure(Mesh.single(), False)}
    for sp, nbytes in run_ranks(2, _tp2)[0].items():
        measured[(2, sp)] = nbytes
    rows = [f"tp={tp} sp={sp}: measured {nbytes:,} B, predicted {_predict(tp, sp):,.0f} B "
            f"({_predict(tp, sp) / nbytes - 1:+.2%})" for (tp, sp), nbytes in measured.items()]
    print("\n" + "\n".join(rows))
    for (tp, sp), nbytes in measured.items():
        assert _predict(tp, sp) == pytest.approx(nbytes, rel=0.05), "\n".join(rows)
