"""What `tandem train` writes to --out, and the summary it prints."""

import json
import os

import torch.distributed as dist

from tandem.cli import data


def _gather_timeline(mesh, timeline) -> list:
    """Every pipeline rank's records (of tp rank 0, dp replica 0), on every rank."""
    from tandem.pipeline import ActionKind, TimelineRecord

    mine = []
    if mesh.tp_rank == 0 and mesh.dp_rank == 0:
        for r in timeline:
            if isinstance(r, TimelineRecord):
                mine.append(tuple(r))
            else:  # (kind, start, end) of an unpipelined step
                kind, start, end = r
                mine.append((mesh.pp_rank, 0, ActionKind[kind], 0, start, end))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    rows = [TimelineRecord(*r) for part in everyone for r in part]
    t0 = min((r.start_s for r in rows), default=0.0)
    return [r._replace(start_s=r.start_s - t0, end_s=r.end_s - t0) for r in rows]


def _last_step(rows: list) -> list:
    """The records of the last step (a picture of all steps is unreadable)."""
    if not rows:
        return rows
    firsts = sorted({r.start_s for r in rows if r.stage == 0 and r.microbatch == 0 and _kind(r) == "F"})
    begin = firsts[-1] if firsts else 0.0
    return [r._replace(start_s=r.start_s - begin, end_s=r.end_s - begin) for r in rows if r.start_s >= begin]


def _kind(record) -> str:
    """"F", "B", "W", "SEND_F", ... of a record (an ActionKind, or its name from a step record)."""
    return str(getattr(record.kind, "value", record.kind))


def text_timeline(rows: list, width: int = 72) -> str:
    """The timeline as text, one line per pipeline rank: F of microbatch m prints as the digit
    m, B as the letter a+m, W as A+m (m mod 10), idle as '.'. Every action keeps at least one
    cell: one shorter than a cell, or starting in a cell its predecessor took, is drawn in
    the next free cell (the rest of the line then runs late by as much; a line with more
    actions than cells grows past ``width``)."""
    if not rows:
        return ""
    span = max(r.end_s for r in rows) or 1.0
    ranks = sorted({r.rank for r in rows})
    lines = []
    for rank in ranks:
        cells = ["."] * width
        free = 0  # the first cell no action of this rank has taken
        for r in sorted((r for r in rows if r.rank == rank), key=lambda r: (r.start_s, r.end_s)):
            base = {"F": "0", "B": "a", "W": "A"}.get(_kind(r))
            if base is None:
                continue
            lo = max(int(r.start_s / span * width), free)
            free = max(lo + 1, int(r.end_s / span * width + 0.5))
            cells += ["."] * (free - len(cells))
            cells[lo:free] = chr(ord(base) + r.microbatch % 10) * (free - lo)
        lines.append(f"  rank {rank} |{''.join(cells)}|")
    lines.append(f"  {'':6} 0{'':{width - 12}}{span * 1e3:8.1f} ms")
    lines.append("  F: 0-9, B: a-j, W: A-J (microbatch mod 10), idle: .")
    return "\n".join(lines)


def _plot_loss(report, chance: float, floor, unigram, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    history = report.records
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="training loss")
    if report.evals:
        ax.plot([e["step"] for e in report.evals], [e["val_loss"] for e in report.evals], "o-",
                label="validation loss")
    ax.axhline(chance, color="gray", linestyle="--", label=f"chance (ln V = {chance:.2f})")
    if floor is not None:
        ax.axhline(floor, color="green", linestyle=":", label=f"best possible ({floor:.2f})")
    if unigram is not None:
        ax.axhline(unigram, color="red", linestyle=":", label=f"unigram entropy ({unigram:.2f})")
    for r in report.resumes:
        ax.axvline(r["step"], color="black", linewidth=0.5, alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def write_outputs(args, cfg, mesh, report, timeline, elapsed, steps_run, reference, memory=None,
                  optimizer="") -> None:
    from tandem.pipeline import chrome_trace, render

    rows = _gather_timeline(mesh, timeline)
    per_rank = report.memory_per_rank()
    if mesh.rank != 0:
        return
    out = args.out
    history = report.records
    chance = data.chance_loss(cfg.vocab_size)
    synthetic = args.data == "synthetic"
    floor = data.floor_loss(cfg.vocab_size, cfg.max_seq_len) if synthetic else None
    metrics = {
        "parallel": {"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp, "schedule": args.schedule if mesh.pp > 1 else None,
                     "microbatches": args.microbatches, "grad_accum": args.grad_accum, "device": mesh.device.type},
        "training": {"precision": args.precision, "recompute": cfg.recompute, "zero1": args.zero1,
                     "clip_grad": args.clip_grad, "weight_decay": args.weight_decay, "optimizer": optimizer,
                     "skipped_steps": sum(not h.get("stepped", True) for h in history),
                     "memory_rank0_bytes": memory},
        "model": cfg.__dict__,
        "data": {"train": args.data, "val": args.val_data or (f"last {args.val_fraction} of --data"
                                                              if args.val_fraction is not None else None)},
        "lr_schedule": report_schedule(args),
        "steps": history,
        "eval": report.evals,
        "resumes": report.resumes,
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "chance_loss": chance,
        "floor_loss": floor,
        "unigram_entropy": report.unigram,
        "model_flops_per_step": report.flops_per_step,
        "peak_tflops_per_device": report.peak,
        "memory": {"ranks": per_rank, "peak_bytes": max(m["peak"] for m in per_rank)},
        "elapsed_s": elapsed,
        "tokens_per_s": report.tokens_per_step * steps_run / elapsed if steps_run else None,
    }
    if report.evals:
        metrics["final_val_loss"] = report.evals[-1]["val_loss"]
    if reference is not None:
        diffs = [abs(h["loss"] - reference[h["step"]]) for h in history]
        metrics["check"] = {"reference_losses": reference, "max_loss_diff": max(diffs)}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(out, "timeline.json"), "w") as f:
        json.dump(chrome_trace(rows), f)
    render(_last_step(rows), os.path.join(out, "schedule.png"),
           title=f"measured: tp={mesh.tp} pp={mesh.pp} dp={mesh.dp}"
           + (f" {args.schedule}, m={args.microbatches}" if mesh.pp > 1 else "") + " (last step)")
    _plot_loss(report, chance, floor, report.unigram, os.path.join(out, "loss.png"))
    last = _last_step(rows)
    print(f"schedule of the last step, measured (picture: {out}/schedule.png):")
    print(text_timeline(last))
    rate = f", {metrics['tokens_per_s']:,.0f} tokens/s" if steps_run else ""
    bound = f"best possible {floor:.3f}" if floor is not None else f"unigram entropy {report.unigram:.3f}"
    print(f"loss {metrics['first_loss']:.3f} -> {metrics['final_loss']:.3f} (chance {chance:.3f}, {bound}) in "
          f"{len(history)} steps, {elapsed:.1f} s{rate}")
    if report.evals:
        ev = report.evals[-1]
        vs = f" vs unigram entropy {report.unigram:.4f}" if report.unigram is not None else ""
        print(f"validation loss {ev['val_loss']:.4f}{vs} after {ev['step'] + 1} steps")
    if memory is not None:
        print(f"memory of rank 0 ({args.precision}{', zero1' if args.zero1 else ''}): parameters "
              f"{_mib(memory['parameters'])}, gradients {_mib(memory['gradients'])}, fp32 masters "
              f"{_mib(memory['masters'])}, optimizer states {_mib(memory['optimizer_states'])}")
    skipped = metrics["training"]["skipped_steps"]
    if skipped:
        print(f"{skipped} step(s) skipped for inf/nan gradients")
    if reference is not None:
        print(f"check: largest loss difference to the tp=pp=dp=1 reference over {len(history)} steps: "
              f"{metrics['check']['max_loss_diff']:.2e}"
              + (f" ({args.precision} against fp32)" if args.precision != "fp32" else ""))
    print(f"wrote {out}/: metrics.json, metrics.jsonl, checkpoint/ (-> checkpoints/step-{args.steps:08d}), "
          "timeline.json, schedule.png, loss.png")


def report_schedule(args) -> dict:
    from tandem.cli.train_options import schedule

    return schedule(args).state_dict()
