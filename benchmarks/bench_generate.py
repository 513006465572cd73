"""Inference latency and throughput of pipelined decoding (tandem.pipeline.generate) on a
Llama-class GPT (RMSNorm, RoPE, SwiGLU, grouped-query attention; random weights) at several
TP x PP layouts, measured in one run:

    python benchmarks/bench_generate.py [--layouts tp1,tp2,pp2,tp2xpp2] [--requests 8] [--quick] [--json out.json]

Cases per layout: 1 request; N requests as one batch; with pp > 1, the N requests cut into
pp request groups in flight (while the last stage picks group i's token, the first stage
already works on group i + 1). Per case, the median over the rounds after warm-up of:

    ttft    time to first token: from the call to a request's first new token (the prefill
            of the prompt and the first decoding step), mean over the requests
    tpot    time per output token after the first: (last token - first token) / (new - 1),
            mean over the requests
    e2e     the whole generate call, on the slowest rank
    tok/s   requests x new tokens / e2e
    cores   CPU time of the layout's ranks (each process, its communication threads included)
            over e2e: how many cores the call kept busy. One rank at a time computes in a
            pipeline with one batch; pp groups in flight can keep pp ranks busy, when the
            machine has cores to spare (on a loaded machine they queue for them)
    #wrong  requests whose greedy tokens differ from the single-device model's
            (GPT.generate, the same full weights), in a float64 run before timing

A token's time is taken on the last stage when the host holds it (``on_token``, where a
server would stream it out). Each layout is its own gloo world of tp x pp ranks (see
worlds.py), one thread per rank (each rank stands for one device); all worlds live at once
and take turns, one case at a time, round after round, so that drift of the machine's load
hits every layout alike. The ``compare`` lines are ratios of this run's medians: a layout
with PP against the same tp without PP, for 1 request (PP's added latency) and for N
requests in flight (PP's throughput); the ``shows`` lines say whether the numbers show it.
"""

import argparse
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from worlds import Worlds  # noqa: E402

__all__ = ["Layout", "Case", "parse_layouts", "cases", "request_times", "summarize", "compare", "shows"]

METRICS = ("ttft_ms", "tpot_ms", "last_ms", "e2e_ms")  # per call, from the ranks' clocks


@dataclass(frozen=True)
class Layout:
    """A TP x PP layout: tp * pp ranks."""

    tp: int
    pp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp

    @property
    def name(self) -> str:
        if self.pp == 1:
            return f"tp{self.tp}"
        return f"pp{self.pp}" if self.tp == 1 else f"tp{self.tp}xpp{self.pp}"


@dataclass(frozen=True)
class Case:
    """``requests`` prompts decoded together, cut into ``groups`` request groups."""

    requests: int
    groups: int


def parse_layouts(text: str) -> list:
    """"tp1,tp2,pp2,tp2xpp2" -> [Layout, ...]; ValueError naming a bad or repeated item."""
    layouts = []
    for item in text.split(","):
        m = re.fullmatch(r"(?:tp(\d+))?(?:(?<=\d)x(?=pp))?(?:pp(\d+))?", item.strip())
        if not item.strip() or m is None or not any(m.groups()):
            raise ValueError(f"--layouts: {item!r} is not tpN, ppN or tpNxppM (e.g. tp1,tp2,pp2,tp2xpp2)")
        tp, pp = int(m.group(1) or 1), int(m.group(2) or 1)
        if tp < 1 or pp < 1:
            raise ValueError(f"--layouts: {item!r}: tp and pp must be >= 1")
        if Layout(tp, pp) in layouts:
            raise ValueError(f"--layouts: {Layout(tp, pp).name} is given twice")
        layouts.append(Layout(tp, pp))
    return layouts


def cases(layout: Layout, requests: int) -> list:
    """1 request; ``requests`` as one batch; with pp > 1 also in pp groups."""
    out = [Case(1, 1), Case(requests, 1)] if requests > 1 else [Case(1, 1)]
    if layout.pp > 1 and requests >= layout.pp:
        out.append(Case(requests, layout.pp))
    return out


def request_times(stamps: dict, t0: float, new_tokens: int, requests: int) -> dict:
    """{request row: [perf_counter of each new token]} of one call that started at ``t0`` ->
    means over the requests, in ms: ttft (first token - t0), tpot ((last - first) / (new - 1))
    and last (last token - t0). ValueError when a request lacks tokens."""
    if new_tokens < 2:
        raise ValueError(f"request_times: time per output token needs >= 2 new tokens, got {new_tokens}")
    short = [r for r in range(requests) if len(stamps.get(r, ())) != new_tokens]
    if short:
        raise ValueError(f"request_times: requests {short} do not have {new_tokens} token times")
    firsts = [stamps[r][0] - t0 for r in range(requests)]
    lasts = [stamps[r][-1] - t0 for r in range(requests)]
    return {"ttft_ms": 1e3 * statistics.mean(firsts), "last_ms": 1e3 * statistics.mean(lasts),
            "tpot_ms": 1e3 * statistics.mean((b - a) / (new_tokens - 1) for a, b in zip(firsts, lasts))}


def summarize(layout: Layout, case: Case, samples: list, new_tokens: int, wrong: int) -> dict:
    """One table row: the median of each metric over the rounds, tok/s from the median e2e."""
    row = {"layout": layout.name, "tp": layout.tp, "pp": layout.pp, "ranks": layout.world,
           "requests": case.requests, "groups": case.groups, "rounds": len(samples), "wrong": wrong}
    for key in (*METRICS, "cores"):
        row[key] = statistics.median(s[key] for s in samples)
    row["tokens_per_s"] = case.requests * new_tokens / (row["e2e_ms"] * 1e-3)
    return row


def compare(rows: list) -> list:
    """Ratios of one run's rows: each layout with PP against the same tp without PP. For 1
    request ttft and tpot (above 1: PP adds latency); for the most requests tok/s with pp
    groups in flight over the layout without PP as one batch (above 1: PP pays off) and over
    the PP layout as one batch (what the groups in flight bring)."""
    by = {(r["layout"], r["requests"], r["groups"]): r for r in rows}
    most = max(r["requests"] for r in rows)
    out = []
    for r in rows:
        if r["pp"] == 1 or r["requests"] != 1:
            continue
        base = Layout(r["tp"], 1).name
        one = by.get((base, 1, 1))
        if one is None:
            continue
        entry = {"layout": r["layout"], "base": base, "requests": most, "groups": r["pp"],
                 "ttft_ratio": r["ttft_ms"] / one["ttft_ms"], "tpot_ratio": r["tpot_ms"] / one["tpot_ms"],
                 "throughput_ratio": None, "groups_vs_batch": None}
        flight, batch, base_batch = (by.get((r["layout"], most, r["pp"])), by.get((r["layout"], most, 1)),
                                     by.get((base, most, 1)))
        if flight is not None and base_batch is not None:
            entry["throughput_ratio"] = flight["tokens_per_s"] / base_batch["tokens_per_s"]
        if flight is not None and batch is not None:
            entry["groups_vs_batch"] = flight["tokens_per_s"] / batch["tokens_per_s"]
        out.append(entry)
    return out


def _verdict(values: list) -> str:
    if not values:
        return "not measured"
    return "yes" if all(v > 1 for v in values) else "no" if all(v <= 1 for v in values) else "mixed"


def shows(comparisons: list) -> list:
    """The two claims, judged on this run's ratios: {claim, verdict, values}."""
    latency = [c[k] for c in comparisons for k in ("ttft_ratio", "tpot_ratio")]
    throughput = [c["throughput_ratio"] for c in comparisons if c["throughput_ratio"] is not None]
    most = comparisons[0]["requests"] if comparisons else None
    requests = f"{most} request{'' if most == 1 else 's'}"
    return [{"claim": "PP adds latency to a single request", "verdict": _verdict(latency), "values": latency},
            {"claim": f"PP pays off in throughput with {requests} in flight", "verdict": _verdict(throughput),
             "values": throughput}]


# ---------------------------------------------------------------------------------------
# one rank of one layout (runs in a forked process)

def model_config(args):
    from tandem.models import GPTConfig

    return GPTConfig(vocab_size=args.vocab, max_seq_len=args.prompt_len + args.new_tokens, num_layers=args.layers,
                     hidden_size=args.hidden, num_heads=args.heads, num_kv_heads=args.kv_heads,
                     ffn_hidden_size=args.ffn, norm="rmsnorm", position="rope", activation="swiglu", bias=False)


class LayoutRank:
    """This rank's stage of the model, the prompts and the checks; ``run(case index)`` times
    one generate call of that case (collective over the layout's ranks)."""

    def __init__(self, spec, rank: int):
        import tandem
        from tandem.models import GPT
        from tandem.nn import full_state_dict

        args, layout = spec
        torch.set_num_threads(args.threads)
        self.args, self.layout = args, layout
        self.mesh = tandem.init_mesh(tp=layout.tp, pp=layout.pp, timeout=args.timeout)
        cfg = model_config(args)
        torch.manual_seed(args.seed)
        full = GPT(cfg, mesh=tandem.Mesh.single())  # the same full weights on every rank and layout
        params = sum(p.numel() for p in full.parameters())
        state = full_state_dict(full)
        del full
        g = torch.Generator().manual_seed(args.seed + 1)
        self.prompt = torch.randint(0, cfg.vocab_size, (args.requests, args.prompt_len), generator=g)
        self.cases = cases(layout, args.requests)
        wrong = self._check(cfg, state, rank)
        self.stage = self._stage(cfg, state, torch.float32)
        self.info = {"wrong": wrong, "params": params}

    def _stage(self, cfg, state: dict, dtype):
        from tandem.models import GPT
        from tandem.nn import load_full_state_dict
        from tandem.pipeline import split

        model = GPT(cfg, mesh=self.mesh, dtype=dtype)
        load_full_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
        model.eval()
        return split(model.layers(), self.mesh.pp, balance="params", mesh=self.mesh)

    def _check(self, cfg, state: dict, rank: int) -> list:
        """Per case, the requests whose float64 greedy tokens differ from the single-device
        model's (counted on rank 0)."""
        import tandem
        from tandem.models import GPT
        from tandem.nn import load_full_state_dict
        from tandem.pipeline import generate

        n = min(self.args.check_tokens, self.args.new_tokens)
        stage = self._stage(cfg, state, torch.float64)
        got = [generate(stage, self.prompt[:c.requests], n, mesh=self.mesh, num_microbatches=c.groups,
                        timeout=self.args.timeout) for c in self.cases]
        del stage
        if rank != 0:
            return []
        ref_model = GPT(cfg, mesh=tandem.Mesh.single(), dtype=torch.float64)
        load_full_state_dict(ref_model, {k: v.double() for k, v in state.items()})
        want = ref_model.eval().generate(self.prompt, n)
        return [int((g != want[:c.requests]).any(dim=1).sum()) for g, c in zip(got, self.cases)]

    def run(self, index: int) -> dict:
        import torch.distributed as dist
        from tandem.pipeline import generate

        case, n = self.cases[index], self.args.new_tokens
        stamps: dict = {}

        def on_token(rows, tokens):
            tokens.tolist()  # the host holds them: where a server streams them out
            now = time.perf_counter()
            for r in rows:
                stamps.setdefault(r, []).append(now)

        dist.barrier()
        cpu0, t0 = time.process_time(), time.perf_counter()
        out = generate(self.stage, self.prompt[:case.requests], n, mesh=self.mesh, num_microbatches=case.groups,
                       on_token=on_token, timeout=self.args.timeout)
        e2e, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if tuple(out.shape) != (case.requests, self.args.prompt_len + n):
            raise RuntimeError(f"{self.layout.name}: generate returned {tuple(out.shape)}")
        times = request_times(stamps, t0, n, case.requests) if stamps else dict.fromkeys(METRICS, 0.0)
        # the last stage has the token times, every rank its e2e: the maximum of each
        vec = torch.tensor([times["ttft_ms"], times["tpot_ms"], times["last_ms"], e2e * 1e3], dtype=torch.float64)
        dist.all_reduce(vec, op=dist.ReduceOp.MAX)
        busy = torch.tensor([cpu / e2e], dtype=torch.float64)  # cores this rank kept busy
        dist.all_reduce(busy)  # summed over the layout's ranks
        return {**dict(zip(METRICS, vec.tolist())), "cores": float(busy)}


def _setup(spec, rank):
    return LayoutRank(spec, rank)


# ---------------------------------------------------------------------------------------
# the run: every layout, round after round

QUICK = dict(hidden=128, layers=4, heads=4, kv_heads=2, ffn=352, vocab=1024, prompt_len=16, new_tokens=6,
             requests=4, warmup=1, iters=3, check_tokens=4)
FULL = dict(hidden=512, layers=8, heads=8, kv_heads=2, ffn=1408, vocab=8192, prompt_len=64, new_tokens=32,
            requests=8, warmup=2, iters=7, check_tokens=8)


def _arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small model and few rounds (a CPU runs it in seconds)")
    p.add_argument("--layouts", default="tp1,tp2,pp2,tp2xpp2", help="tpN, ppN, tpNxppM, comma-separated")
    for name, help_ in (("hidden", "model width"), ("layers", "transformer blocks"), ("heads", "query heads"),
                        ("kv_heads", "key/value heads"), ("ffn", "SwiGLU width"), ("vocab", "vocabulary"),
                        ("prompt_len", "prompt tokens per request"), ("new_tokens", "tokens decoded per request"),
                        ("requests", "N: requests decoded together"), ("warmup", "untimed rounds first"),
                        ("iters", "timed rounds; medians are reported"),
                        ("check_tokens", "tokens of the float64 check")):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None,
                       help=f"{help_} (default {FULL[name]}, --quick {QUICK[name]})")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any wait may take")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        layouts = parse_layouts(args.layouts)
        for name in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab", "prompt_len", "requests",
                     "iters", "check_tokens", "threads"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.new_tokens < 2 or args.warmup < 0:
            raise ValueError("--new-tokens must be >= 2 (time per output token) and --warmup >= 0")
        cfg = model_config(args)
        for layout in layouts:
            cfg.check_tp(layout.tp)
            if layout.pp > cfg.num_layers + 2:
                raise ValueError(f"{layout.name}: pp={layout.pp} exceeds the model's {cfg.num_layers + 2} layers")
    except ValueError as e:
        p.error(str(e))
    return args, layouts


def _measure(args, layouts) -> tuple:
    """Every layout's worlds, warm-up rounds, then timed rounds: -> (env, table rows)."""
    samples = {}
    with Worlds({lay.name: (lay.world, (args, lay)) for lay in layouts}, _setup, timeout=args.timeout) as worlds:
        # every world is forked before this process touches torch's thread pools (environment())
        params = worlds.info[layouts[0].name]["params"]
        env = common.environment(torch.device("cpu"), dtype=torch.float32, warmup=args.warmup, iters=args.iters,
                                 world_size=max(lay.world for lay in layouts), backend="gloo",
                                 layouts=" ".join(lay.name for lay in layouts),
                                 model=(f"Llama-class L={args.layers} h={args.hidden} heads={args.heads} "
                                        f"kv_heads={args.kv_heads} ffn={args.ffn} V={args.vocab} "
                                        f"({params / 1e6:.1f}M params, random)"),
                                 requests=f"1 and {args.requests}, prompt {args.prompt_len} tokens, "
                                          f"{args.new_tokens} new (greedy)",
                                 threads_per_rank=args.threads,
                                 loadavg=" ".join(f"{v:.2f}" for v in os.getloadavg()))
        common.print_header("bench_generate: time to first token, time per output token, tokens/s per layout", env)
        for r in range(args.warmup + args.iters):
            for lay in layouts:
                for i, case in enumerate(cases(lay, args.requests)):
                    got = worlds.run(lay.name, i)
                    if r >= args.warmup:
                        samples.setdefault((lay, case), []).append(got)
    rows = [summarize(lay, case, samples[(lay, case)], args.new_tokens, worlds.info[lay.name]["wrong"][i])
            for lay in layouts for i, case in enumerate(cases(lay, args.requests))]
    return env, rows


def _notes(comparisons: list, verdicts: list) -> list:
    notes = []
    for c in comparisons:
        notes.append(f"# compare  {c['layout']} vs {c['base']}, 1 request: ttft {c['ttft_ratio']:.2f}x, "
                     f"tpot {c['tpot_ratio']:.2f}x (above 1: PP adds latency)")
        if c["throughput_ratio"] is not None:
            notes.append(f"# compare  {c['layout']} vs {c['base']}, {c['requests']} requests: tok/s "
                         f"{c['throughput_ratio']:.2f}x with {c['groups']} groups in flight against {c['base']} "
                         f"as one batch (above 1: PP pays off); {c['groups_vs_batch']:.2f}x against "
                         f"{c['layout']} as one batch")
    for v in verdicts:
        values = ", ".join(f"{x:.2f}x" for x in v["values"])
        notes.append(f"# shows    {v['claim']}: {v['verdict']}" + (f" ({values})" if values else ""))
    return notes


TABLE = common.Table([common.Column("layout", width=9), common.Column("tp", width=3), common.Column("pp", width=3),
                      common.Column("ranks", width=5), common.Column("requests", width=8),
                      common.Column("groups", width=6), common.Column("ttft", "ms", 9, ".2f"),
                      common.Column("tpot", "ms", 9, ".2f"), common.Column("e2e", "ms", 9, ".1f"),
                      common.Column("tok/s", "", 9, ".1f"), common.Column("cores", "busy", 6, ".2f"),
                      common.Column("#wrong", width=6)])
COLUMNS = ("layout", "tp", "pp", "ranks", "requests", "groups", "ttft_ms", "tpot_ms", "e2e_ms", "tokens_per_s",
           "cores", "wrong")


def main(argv=None) -> int:
    args, layouts = _arguments(argv)
    t_start = time.perf_counter()
    env, rows = _measure(args, layouts)
    print(TABLE.header())
    for row in rows:
        print(TABLE.row([row[k] for k in COLUMNS]))
    comparisons = compare(rows)
    verdicts = shows(comparisons)
    notes = _notes(comparisons, verdicts)
    env["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    notes.append(f"# load average {env['loadavg']} at the start, {env['loadavg_end']} at the end; "
                 f"{time.perf_counter() - t_start:.0f} s")
    wrong = sum(r["wrong"] for r in rows)
    common.report("bench_generate", args, env, rows, [], rank=0, wrong=wrong, notes=tuple(notes),
                  comparisons=comparisons, shows=verdicts)
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
