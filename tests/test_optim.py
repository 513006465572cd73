"""tandem.optim on 4 gloo ranks against the single-device twin (tests/optim_utils.py):

- clip_grad_norm_: the returned norm equals torch.nn.utils.clip_grad_norm_ on the twin (1e-6
  relative) and every gradient after clipping equals the twin's, at tp=4 (replicated KV
  projections, SP on, tied), tp=2 x dp=2, pp=2 x dp=2, tp=2 x pp=2 (SP on, tied and untied),
  and with the distributed optimizer (sharded fp32 gradients) at tp=2 x dp=2, pp=2 x dp=2 and
  tp=2 x pp=2; the inf-norm too;
- DistributedOptimizer: 5 AdamW steps (weight decay on weights only, clipping at 1.0) equal
  torch.optim.AdamW on the twin to 1e-6 relative at dp=4, tp=2 x dp=2 and pp=2 x dp=2; the
  optimizer-state bytes of each rank are the total / dp up to the buckets' padding, measured
  on the state tensors; at pp=2 x dp=2 the parameters' all-gather overlaps the next step;
- gradient accumulation with the distributed optimizer (no_sync() on all micro-steps but
  the last, scale_grads) equals the twin's AdamW steps on the whole batch at dp=4 and
  pp=2 x dp=2;
- mixed precision at tp=2 x pp=2: bf16 masters are fp32; with fp16 an inf injected on one
  rank skips the step on every rank, leaves every weight untouched and halves the scale;
  gradients reduced over dp=4 in bf16 (reduce_dtype) match the twin's to bf16's precision;
- activation recomputation at tp=2 x pp=2 with SP, under 1F1B and ZB-H1 (split B/W): the
  same gradients as without it;
- checkpoints: the distributed optimizer's state saved at tp=2 x dp=2 loads at dp=1 (tp=4),
  dp=4 and pp=2 x dp=2, and training goes on as if uninterrupted.

One spawned world runs every case.
"""

import math

import torch

from distributed import run_ranks

LR, WD, STEPS = 1e-3, 0.1, 5


def _adamw(mesh, **kw):
    from tandem.optim import DistributedOptimizer, weight_decay_groups

    def make(modules):
        return DistributedOptimizer(weight_decay_groups(modules, WD), torch.optim.AdamW, mesh=mesh, lr=LR,
                                    bucket_bytes=4096, **kw)

    return make


def _check_clip(setup, what, max_norm=0.05, norm_type=2.0):
    """Clip this layout's gradients; compare the norm and every clipped gradient with the twin's."""
    import tandem
    from optim_utils import assert_relative, local_part, twin_grads

    setup.forward_backward()
    target = setup.opt if setup.opt is not None else setup.modules
    norm = tandem.clip_grad_norm_(target, max_norm, mesh=setup.mesh, norm_type=norm_type)
    want_norm, want = twin_grads(setup.cfg, max_norm, norm_type=norm_type)
    assert_relative(norm, want_norm, 1e-6, f"{what}: norm")
    if setup.opt is None:
        for name, p in setup.named.items():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, local_part(want[name], p, setup.mesh), rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{what}: clipped gradient {name}: {m}")
    else:  # the fp32 gradient of each piece this rank owns
        names = {id(p): n for n, p in setup.named.items()}
        for pc in setup.opt.layout.pieces:
            full = local_part(want[names[id(pc.param)]], pc.param, setup.mesh).reshape(-1)
            torch.testing.assert_close(pc.master.grad, full[pc.start:pc.end], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{what}: clipped fp32 gradient {names[id(pc.param)]}: {m}")
    return norm.item()


def _clip_cases(rank):
    import tandem
    from optim_utils import Setup, config

    norms = {}
    for (tp, pp, dp), kw, zero in [((4, 1, 1), dict(sequence_parallel=True, tie_embeddings=True), False),
                                   ((2, 1, 2), dict(tie_embeddings=True), False),
                                   ((1, 2, 2), dict(tie_embeddings=True), False),
                                   ((2, 2, 1), dict(sequence_parallel=True, tie_embeddings=True), False),
                                   ((2, 2, 1), dict(sequence_parallel=True), False),
                                   ((2, 1, 2), dict(tie_embeddings=True), True),
                                   ((1, 2, 2), dict(tie_embeddings=True), True),
                                   ((2, 2, 1), dict(sequence_parallel=True, tie_embeddings=True), True)]:
        mesh = tandem.init_mesh(tp=tp, pp=pp, dp=dp)
        what = f"tp={tp} pp={pp} dp={dp} {kw}" + (" distributed optimizer" if zero else "")
        setup = Setup(mesh, config(**kw), make_opt=_adamw(mesh) if zero else None)
        norms[what] = _check_clip(setup, what)
        setup.close()
    # the inf-norm: the largest |g| anywhere
    mesh = tandem.init_mesh(tp=2, pp=2, dp=1)
    setup = Setup(mesh, config(tie_embeddings=True))
    _check_clip(setup, "tp=2 pp=2 inf-norm", norm_type=math.inf, max_norm=1e-3)
    setup.close()
    return norms


def _adamw_cases(rank):
    import tandem
    from optim_utils import Setup, assert_relative, config, local_part, twin_adamw
    from tandem.pipeline import ZeroBubbleH1

    out = {}
    cfg = config(tie_embeddings=True)
    want, want_losses = twin_adamw(cfg, STEPS, lr=LR, weight_decay=WD, max_norm=1.0)
    for tp, pp, dp in [(1, 1, 4), (2, 1, 2), (1, 2, 2)]:
        mesh = tandem.init_mesh(tp=tp, pp=pp, dp=dp)
        what = f"AdamW tp={tp} pp={pp} dp={dp}"
        # pp=2 x dp=2: ZB-H1 (deferred W into the fp32 buffers), the parameters' all-gather
        # waited for only at the next forward
        setup = Setup(mesh, cfg, make_opt=_adamw(mesh, overlap_param_gather=pp > 1),
                      schedule=ZeroBubbleH1(2, 2) if pp > 1 else None)
        opt = setup.opt
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            losses.append(setup.forward_backward().item())
            tandem.clip_grad_norm_(opt, 1.0)
            assert opt.step()
        for got, exp in zip(losses, want_losses):
            assert abs(got - exp) <= 1e-6 * abs(exp), (what, losses, want_losses)
        opt.finish_param_gather()  # with overlap_param_gather: else at the next forward
        worst = max(assert_relative(p, local_part(want[name], p, mesh), 1e-6, f"{what}: {name}")
                    for name, p in setup.named.items())
        # optimizer state: AdamW's two fp32 moments of the elements this rank owns
        owned = sum(pc.numel for pc in opt.layout.pieces)
        assert opt.state_bytes() == 8 * owned, (opt.state_bytes(), owned)
        local = sum(p.numel() for p in opt.params)  # this tp/pp rank's parameters
        summed = torch.tensor([float(opt.state_bytes())])
        mesh.dp_comm.all_reduce(summed).wait()  # (1,) summed over dp: each element's state exactly once
        assert summed.item() == 8 * local, (what, summed.item(), local)
        # each rank: a 1/dp share, up to the buckets' padding (< dp elements per bucket)
        assert abs(opt.state_bytes() - 8 * local / dp) <= 8 * dp * len(opt.layout.buckets), (what, opt)
        out[what] = (opt.state_bytes(), 8 * local, worst)
        setup.close()
    return out


def _accumulation_cases(rank):
    """Gradient accumulation: each dp shard in 2 micro-steps, the first inside no_sync()
    (the runner leaves the buckets unreduced), then scale_grads(1/2): the same 5 AdamW steps
    as the twin on the whole batch, at dp=4 and at pp=2 x dp=2 (ZB-H1)."""
    import tandem
    from optim_utils import Setup, assert_relative, config, local_part, twin_adamw
    from tandem.pipeline import ZeroBubbleH1

    cfg = config(tie_embeddings=True)
    want, want_losses = twin_adamw(cfg, STEPS, lr=LR, weight_decay=WD, max_norm=1.0)
    out = {}
    for tp, pp, dp in [(1, 1, 4), (1, 2, 2)]:
        mesh = tandem.init_mesh(tp=tp, pp=pp, dp=dp)
        what = f"accumulation pp={pp} dp={dp}"
        setup = Setup(mesh, cfg, make_opt=_adamw(mesh), schedule=ZeroBubbleH1(2, 2) if pp > 1 else None)
        opt, half = setup.opt, setup.ids.shape[0] // 2
        losses, reduced_inside = [], []
        for _ in range(STEPS):
            opt.zero_grad()
            total = 0.0
            for micro in range(2):
                rows = slice(micro * half, (micro + 1) * half)
                if micro == 0:
                    with opt.no_sync():
                        total += setup.forward_backward(setup.ids[rows], setup.targets[rows]).item()
                    reduced_inside.append(opt._grads_reduced)
                else:
                    total += setup.forward_backward(setup.ids[rows], setup.targets[rows]).item()
            opt.scale_grads(0.5)
            tandem.clip_grad_norm_(opt, 1.0)
            assert opt.step()
            losses.append(total / 2)
        assert not any(reduced_inside), what
        for got, exp in zip(losses, want_losses):
            assert abs(got - exp) <= 1e-6 * abs(exp), (what, losses, want_losses)
        opt.finish_param_gather()
        out[what] = max(assert_relative(p, local_part(want[name], p, mesh), 1e-6, f"{what}: {name}")
                        for name, p in setup.named.items())
        setup.close()
    return out


def _mixed_precision_cases(rank):
    import tandem
    from optim_utils import Setup, config
    from tandem.optim import MixedPrecisionOptimizer

    out = {}
    mesh = tandem.init_mesh(tp=2, pp=2, dp=1)
    for dtype in (torch.bfloat16, torch.float16):
        setup = Setup(mesh, config(tie_embeddings=True), dtype=dtype,
                      make_opt=lambda mods: MixedPrecisionOptimizer([p for m in mods for p in m.parameters()
                                                                     if p.requires_grad], torch.optim.AdamW,
                                                                    mesh=mesh, lr=LR))
        opt = setup.opt
        assert all(pc.master.dtype == torch.float32 for pc in opt.layout.pieces)
        assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
        assert all(p.dtype == dtype for p in opt.params)
        assert (opt.scaler is not None) == (dtype == torch.float16)
        opt.zero_grad()
        setup.forward_backward()
        assert all(p.grad is None for p in opt.params), "gradients were left in param.grad"
        assert all(p.main_grad.dtype == torch.float32 for p in opt.params)
        before = [p.detach().clone() for p in opt.params]
        masters = [pc.master.clone() for pc in opt.layout.pieces]
        if dtype == torch.float16:
            scale = opt.loss_scale
            if rank == 3:  # one rank overflows
                opt.params[0].main_grad.view(-1)[0] = float("inf")
            assert opt.step() is False  # skipped on every rank
            assert opt.loss_scale == scale / 2 and opt.scaler.skipped_steps == 1
            assert all(torch.equal(a, b) for a, b in zip(before, opt.params))
            assert all(torch.equal(a, pc.master) for a, pc in zip(masters, opt.layout.pieces))
            opt.zero_grad()
            setup.forward_backward()
        out[str(dtype)] = opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, opt.params)), "the step changed nothing"
        setup.close()
    # fp32 gradients reduced over dp in bf16 (half the traffic): the twin's gradients to bf16's precision
    from optim_utils import assert_relative, twin_grads

    mesh = tandem.init_mesh(tp=1, pp=1, dp=4)
    setup = Setup(mesh, config(tie_embeddings=True),
                  make_opt=lambda mods: MixedPrecisionOptimizer([p for p in mods[0].parameters() if p.requires_grad],
                                                                torch.optim.AdamW, mesh=mesh, lr=LR,
                                                                reduce_dtype=torch.bfloat16))
    setup.opt.zero_grad()
    setup.forward_backward()
    setup.opt.prepare_grads()
    _, want = twin_grads(setup.cfg)
    names = {id(p): n for n, p in setup.named.items()}
    for pc in setup.opt.layout.pieces:  # each summand rounded to bf16 (8 bits): 1% of the norm
        expect = want[names[id(pc.param)]].reshape(-1)[pc.start:pc.end]
        assert_relative(pc.master.grad, expect, 1e-2, f"bf16 reduction: {names[id(pc.param)]}")
        assert not torch.equal(pc.master.grad, expect) or expect.abs().max() == 0  # it did round
    setup.close()
    return out


def _recompute_cases(rank):
    import tandem
    from optim_utils import Setup, config
    from tandem.pipeline import OneFOneB, ZeroBubbleH1

    mesh = tandem.init_mesh(tp=2, pp=2, dp=1)
    for sched in (OneFOneB(2, 2), ZeroBubbleH1(2, 2)):
        grads = {}
        for mode in ("none", "selective", "full"):
            setup = Setup(mesh, config(sequence_parallel=True, tie_embeddings=True, recompute=mode), schedule=sched)
            setup.forward_backward()
            grads[mode] = {n: p.grad.clone() for n, p in setup.named.items() if p.requires_grad}
            setup.close()
        for mode in ("selective", "full"):
            for n, g in grads["none"].items():
                torch.testing.assert_close(grads[mode][n], g, rtol=0, atol=0,
                                           msg=lambda m: f"{sched}: recompute={mode}: {n}: {m}")
    return True


def _checkpoint_cases(rank, path):
    """DistributedOptimizer state saved after 3 steps at tp=2 x dp=2, loaded into zeroed models
    at dp=1 (tp=4), dp=4 and pp=2 x dp=2 (the last stage's tied copy takes the embedding's
    state): 2 more steps give the twin's weights after 5."""
    import tandem
    from optim_utils import Setup, assert_relative, config, local_part, twin_adamw

    cfg = config(tie_embeddings=True)
    want, _ = twin_adamw(cfg, STEPS, lr=LR, weight_decay=WD, max_norm=1.0)

    def train(setup, steps):
        for _ in range(steps):
            setup.opt.zero_grad()
            setup.forward_backward()
            tandem.clip_grad_norm_(setup.opt, 1.0)
            setup.opt.step()

    mesh = tandem.init_mesh(tp=2, dp=2)
    setup = Setup(mesh, cfg, make_opt=_adamw(mesh))
    train(setup, 3)
    tandem.checkpoint.save(setup.full, path, optimizer=setup.opt)
    setup.close()
    for tp, pp, dp in [(4, 1, 1), (1, 1, 4), (1, 2, 2)]:
        mesh = tandem.init_mesh(tp=tp, pp=pp, dp=dp)
        setup = Setup(mesh, cfg, make_opt=_adamw(mesh))
        mine = [p for m in setup.modules for p in m.parameters()]  # this stage's (a tied copy included)
        with torch.no_grad():
            for p in mine:
                p.zero_()
        tandem.checkpoint.load(setup.full, path, params=mine, optimizer=setup.opt)
        assert setup.opt.inner.state, "no optimizer state was loaded"
        train(setup, STEPS - 3)
        for name, p in setup.named.items():
            assert_relative(p, local_part(want[name], p, mesh), 1e-6, f"resumed at tp={tp} pp={pp} dp={dp}: {name}")
        setup.close()
    return True


def _worker(rank, world, path):
    return {"clip": _clip_cases(rank), "adamw": _adamw_cases(rank), "accumulate": _accumulation_cases(rank),
            "mixed": _mixed_precision_cases(rank),
            "recompute": _recompute_cases(rank), "checkpoint": _checkpoint_cases(rank, path)}


def test_optimizers_clipping_recomputation(tmp_path):
    results = run_ranks(4, _worker, str(tmp_path / "ckpt"), timeout=420)
    for r in results:
        assert r["mixed"] == {"torch.bfloat16": True, "torch.float16": True}
        assert r["recompute"] is True and r["checkpoint"] is True
        assert sorted(r["accumulate"]) == ["accumulation pp=1 dp=4", "accumulation pp=2 dp=2"]
        assert r["clip"] == results[0]["clip"]  # every rank: the same norm
        dp4 = r["adamw"]["AdamW tp=1 pp=1 dp=4"]
        assert 3.5 < dp4[1] / dp4[0] < 4.5, dp4  # a quarter of the state per rank at dp=4
