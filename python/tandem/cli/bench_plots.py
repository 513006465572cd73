"""PNG plots of the benchmark JSON files written by `tandem bench --json/--plot`."""

import json
import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure():
    plt = _pyplot()
    return plt, *plt.subplots(figsize=(6.5, 3.8))


def _save(plt, fig, ax, title, path):
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _caption(record) -> str:
    env = record.get("env", {})
    return f"{env.get('device', '?')}, {env.get('date', '?')}, world {env.get('world_size', '?')}"


def _comm(record, out, name):
    plt, fig, ax = _figure()
    rows = record["results"]
    for op in sorted({r["op"] for r in rows}):
        mine = [r for r in rows if r["op"] == op]
        for who, style in (("tandem", "-"), ("torch", "--")):
            ax.plot([r["bytes"] for r in mine], [r[f"{who}_busbw"] for r in mine], style, marker=".",
                    label=f"{op} ({who})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    return _save(plt, fig, ax, f"{name}: bus bandwidth vs size\n{_caption(record)}", os.path.join(out, f"{name}.png"))


def _gemm(record, out, name):
    plt, fig, ax = _figure()
    rows = record["results"]
    shapes = sorted({(r["m"], r["k"], r["n"]) for r in rows})
    labels = [f"{m}x{k}x{n}" for m, k, n in shapes]
    for v in sorted({r["variant"] for r in rows}):
        by = {(r["m"], r["k"], r["n"]): r.get("fwd_tflops") for r in rows if r["variant"] == v}
        ax.plot(range(len(shapes)), [by.get(s) for s in shapes], marker="o", label=v)
    ax.set_xticks(range(len(shapes)), labels, rotation=70, fontsize=6)
    ax.set_xlabel("shape M x K x N")
    ax.set_ylabel("forward TFLOP/s")
    return _save(plt, fig, ax, f"{name}: TFLOP/s vs shape\n{_caption(record)}", os.path.join(out, f"{name}.png"))


def _pipeline(record, out, name):
    plt, fig, ax = _figure()
    rows = record["results"]
    for i, sched in enumerate(sorted({r["schedule"] for r in rows})):
        mine = sorted((r for r in rows if r["schedule"] == sched), key=lambda r: r["m"])
        color = f"C{i}"  # one colour per schedule: solid measured, dashed simulated
        ax.plot([r["m"] for r in mine], [r["bubble"] for r in mine], marker="o", color=color,
                label=f"{sched} measured")
        ax.plot([r["m"] for r in mine], [r.get("sim_bubble") for r in mine], "--", marker=".", color=color,
                label=f"{sched} simulated")
    ax.set_xlabel("microbatches m")
    ax.set_ylabel("bubble fraction")
    return _save(plt, fig, ax, f"{name}: bubble vs microbatches\n{_caption(record)}", os.path.join(out, f"{name}.png"))


def _bars(record, out, name, key, label):
    plt, fig, ax = _figure()
    rows = record["results"]
    names = [str(r.get("variant") or r.get("module")) for r in rows]
    ax.bar(range(len(rows)), [r.get(key) or 0 for r in rows], label=label)
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set_ylabel(label)
    return _save(plt, fig, ax, f"{name}\n{_caption(record)}", os.path.join(out, f"{name}.png"))


def _generate(record, out, name):
    """Per layout, one request's latency (ttft, tpot) and N requests' tokens/s (one batch,
    and with pp > 1 the request groups in flight), side by side."""
    plt = _pyplot()
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = record["results"]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    x = list(range(len(layouts)))
    most = max(r["requests"] for r in rows)
    one = {r["layout"]: r for r in rows if r["requests"] == 1}
    batch = {r["layout"]: r for r in rows if r["requests"] == most and r["groups"] == 1}
    flight = {r["layout"]: r for r in rows if r["requests"] == most and r["groups"] > 1}
    bars = ((lat, one, "ttft_ms", -0.2, "time to first token"), (lat, one, "tpot_ms", 0.2, "time per output token"),
            (thr, batch, "tokens_per_s", -0.2, f"{most} requests, one batch"),
            (thr, flight, "tokens_per_s", 0.2, f"{most} requests, pp groups in flight"))
    for ax, rows_of, key, shift, label in bars:
        ax.bar([i + shift for i in x], [rows_of[l][key] if l in rows_of else 0 for l in layouts], 0.4, label=label)
    for ax, unit in ((lat, "ms (1 request)"), (thr, "tokens/s")):
        ax.set_xticks(x, layouts)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lat.set_title("latency of one request", fontsize=9)
    return _save(plt, fig, thr, f"{name}: throughput\n{_caption(record)}", os.path.join(out, f"{name}.png"))


def plot_all(files: dict, out: str) -> list:
    """{suite: json path} -> the PNG paths written into ``out``."""
    os.makedirs(out, exist_ok=True)
    pngs = []
    for name, path in files.items():
        with open(path) as f:
            record = json.load(f)
        if not record.get("results"):
            continue
        if name in ("comm", "p2p"):
            pngs.append(_comm(record, out, name))
        elif name == "gemm":
            pngs.append(_gemm(record, out, name))
        elif name == "pipeline":
            pngs.append(_pipeline(record, out, name))
        elif name == "overlap":
            pngs.append(_bars(record, out, name, "ms", "time (ms)"))
        elif name == "generate":
            pngs.append(_generate(record, out, name))
        elif name == "tp":
            pngs.append(_bars(record, out, name, "ratio", "tandem / PyTorch TP step time"))
    return pngs
