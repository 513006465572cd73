"""The GPT of the optimizer tests on a mesh, its single-device twin, and how to compare them.

Every key projection's bias is frozen in both: its gradient is zero in exact arithmetic
(softmax ignores a shift of all keys), so AdamW would turn the roundoff of each layout into
steps of size lr, and no two layouts could agree.
"""

import torch

CFG = dict(vocab_size=64, max_seq_len=16, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)


def config(**kw):
    from tandem.models import GPTConfig

    return GPTConfig(**CFG, **kw)


def model(cfg, mesh, dtype=None):
    from tandem.models import GPT

    torch.manual_seed(0)
    m = GPT(cfg, mesh=mesh)
    for block in m.blocks:
        block.attn.k_proj.bias.requires_grad_(False)
    return m.to(dtype) if dtype is not None else m


def data(b=8):
    g = torch.Generator().manual_seed(3)
    s = CFG["max_seq_len"]
    return torch.randint(0, 64, (b, s), generator=g), torch.randint(0, 64, (b, s), generator=g)


def twin_name(stage_name: str, num_layers: int) -> str:
    """A pipeline stage's parameter name -> the single-device GPT's."""
    parts = stage_name.split(".")
    if parts[0] == "tied_copies":
        return "embed.tok.weight"
    i, rest = int(parts[1]), ".".join(parts[2:])
    prefix = "embed." if i == 0 else "head." if i == num_layers + 1 else f"blocks.{i - 1}."
    return prefix + rest


class Setup:
    """This rank's part of the GPT on ``mesh`` (a pipeline of 2 stages when pp = 2), fed its
    dp shard of the batch; ``make_opt(modules)`` builds the optimizer (None: plain grads,
    averaged over dp)."""

    def __init__(self, mesh, cfg, *, make_opt=None, schedule=None, dtype=None, microbatches=2):
        from tandem.nn import vocab_parallel_cross_entropy
        from tandem.pipeline import OneFOneB, PipelineRunner, split

        self.mesh, self.cfg = mesh, cfg
        self.full = model(cfg, mesh, dtype)
        ids, targets = data()
        rows = ids.shape[0] // mesh.dp
        sl = slice(rows * mesh.dp_rank, rows * (mesh.dp_rank + 1))
        self.ids, self.targets = ids[sl], targets[sl]
        self.runner = None
        if mesh.pp == 1:
            self.modules = [self.full]
            self.named = dict(self.full.named_parameters())
        else:
            stage = split(self.full.layers(), mesh.pp, balance="uniform")
            self.modules = [stage]
            self.named = {twin_name(n, cfg.num_layers): p for n, p in stage.named_parameters()}
        self.opt = make_opt(self.modules) if make_opt is not None else None
        if mesh.pp > 1:
            sched = schedule or OneFOneB(mesh.pp, microbatches)
            self.runner = PipelineRunner(self.modules[0], mesh=mesh, schedule=sched, timeout=60,
                                         num_microbatches=sched.num_microbatches, optimizer=self.opt,
                                         loss_fn=lambda y, t: vocab_parallel_cross_entropy(y, t, mesh=mesh))

    def forward_backward(self, ids=None, targets=None):
        """One step's gradients (dp-averaged in p.grad without an optimizer); the loss. ``ids``
        and ``targets``: part of this rank's shard (default all of it)."""
        from tandem.dp import all_reduce_grads

        ids = self.ids if ids is None else ids
        targets = self.targets if targets is None else targets
        if self.runner is not None:
            stage = self.modules[0]
            return self.runner.step(ids if stage.is_first else None, targets if stage.is_last else None)
        loss = self.full(ids, targets)
        (self.opt.scale_loss(loss) if self.opt is not None else loss).backward()
        if self.opt is None:
            all_reduce_grads(self.full.parameters(), self.mesh)
        loss = loss.detach().reshape(1)
        if self.mesh.dp > 1:  # the whole batch's loss
            self.mesh.dp_comm.all_reduce(loss).wait()
            loss /= self.mesh.dp
        return loss.reshape(())

    def close(self):
        if self.runner is not None:
            self.runner.close()
        if self.opt is not None:
            self.opt.remove()


def local_part(full: torch.Tensor, param, mesh) -> torch.Tensor:
    """This tp rank's part of a full tensor shaped like ``param``'s full weight."""
    dim = getattr(param, "tp_shard_dim", None)
    if dim is None or mesh.tp == 1:
        return full
    n = full.shape[dim] // mesh.tp
    return full.narrow(dim, mesh.tp_rank * n, n)


_twins: dict = {}


def _twin_key(cfg, *args) -> tuple:
    """What the twin depends on: neither sequence parallelism nor recomputation changes it."""
    import dataclasses

    return (repr(dataclasses.replace(cfg, sequence_parallel=False, recompute="none")), *args)


def twin_grads(cfg, max_norm=None, *, norm_type=2.0):
    """(norm before clipping or None, {name: gradient after clipping}) of the twin on the whole batch."""
    key = _twin_key(cfg, "grads", max_norm, norm_type)
    if key not in _twins:
        _twins[key] = _twin_grads(cfg, max_norm, norm_type)
    return _twins[key]


def _twin_grads(cfg, max_norm, norm_type):
    import tandem

    m = model(cfg, tandem.Mesh.single())
    m(*data()).backward()
    params = [p for p in m.parameters() if p.grad is not None]
    norm = None if max_norm is None else torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    return norm, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def twin_adamw(cfg, steps, *, lr, weight_decay, max_norm):
    """The twin's weights after ``steps`` AdamW steps (decay on weights only, clipped), and its losses."""
    key = _twin_key(cfg, "adamw", steps, lr, weight_decay, max_norm)
    if key not in _twins:
        _twins[key] = _twin_adamw(cfg, steps, lr, weight_decay, max_norm)
    return _twins[key]


def _twin_adamw(cfg, steps, lr, weight_decay, max_norm):
    import tandem
    from tandem.optim import weight_decay_groups

    m = model(cfg, tandem.Mesh.single())
    opt = torch.optim.AdamW(weight_decay_groups(m, weight_decay), lr=lr)
    ids, targets = data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = m(ids, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.grad is not None], max_norm)
        opt.step()
        losses.append(loss.item())
    return {n: p.detach().clone() for n, p in m.named_parameters()}, losses


def assert_relative(got, want, rel, what):
    """||got - want|| <= rel * ||want|| (Frobenius: the relative error of the whole tensor)."""
    got, want = got.detach().double(), want.detach().double()
    err, scale = (got - want).norm().item(), want.norm().item()
    assert err <= rel * scale, f"{what}: relative error {err / max(scale, 1e-300):.3e} > {rel:g}"
    return err / max(scale, 1e-300)
