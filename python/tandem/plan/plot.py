"""`tandem plan --plot DIR`: memory per pipeline rank as stacked bars, and the planned
schedule drawn by ``tandem.pipeline.render`` from the simulation."""

from __future__ import annotations

import os

__all__ = ["plot_memory", "plot_estimate"]

_PARTS = [("weights", "#4E79A7"), ("grads", "#A0CBE8"), ("optimizer", "#F28E2B"), ("activations", "#59A14F"),
          ("working", "#8CD17D"), ("reserve", "#BAB0AC")]


def plot_memory(est, path: str) -> str:
    """Stacked bars of each pipeline rank's memory per GPU, with the device's capacity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r.rank for r in est.memory]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(ranks) + 3), 3.8))
    bottom = [0.0] * len(ranks)
    for name, colour in _PARTS:
        values = [getattr(r, name) / 1e9 for r in est.memory]
        ax.bar(ranks, values, bottom=bottom, color=colour,
               label="recomputation" if name == "working" else name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(est.capacity / 1e9, color="black", linestyle="--", linewidth=1,
               label=f"{est.profile.name} ({est.capacity / 1e9:.0f} GB)")
    ax.set_xlabel("pipeline rank")
    ax.set_ylabel("GB per GPU")
    ax.set_title(f"{est.model.name}: {est.layout}", fontsize=8)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_estimate(est, directory: str) -> list[str]:
    """memory.png and schedule.png of ``est`` in ``directory``."""
    from tandem.pipeline import render

    os.makedirs(directory, exist_ok=True)
    paths = [plot_memory(est, os.path.join(directory, "memory.png"))]
    sim = est.pipeline
    if sim.result is not None and est.layout.pp > 1:
        m = sim.simulated[-1]
        title = (f"planned: {est.layout.schedule_name()}, p={est.layout.pp}, m={m}"
                 + (f" of {est.num_microbatches}" if m != est.num_microbatches else "")
                 + f", bubble {sim.result.bubble_fraction:.1%}")
        paths.append(str(render(sim.result, os.path.join(directory, "schedule.png"), title=title)))
    return paths
