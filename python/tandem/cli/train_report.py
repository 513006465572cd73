"""What `tandem train` reports each step: loss, learning rate, gradient norm (when clipping
is on), step time, tokens/s, model TFLOP/s per device, MFU (when the peak is known) and peak
memory per rank; in the progress bar (a terminal), in a log line every --log-every steps
(anything else: no carriage returns in files), and in ``OUT/metrics.jsonl`` (one JSON record
per step, appended as the job runs; a resumed job keeps the records before its step), from
which ``metrics.json`` is written at the end.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

__all__ = ["Reporter"]

_MIB = float(1 << 20)


def _peak_tflops(args, mesh):
    from tandem import metrics

    if args.peak_tflops is not None:
        return args.peak_tflops
    if mesh.device.type != "cuda":
        return None  # a CPU has no entry: MFU is omitted unless --peak-tflops is given
    from tandem.optim import precision_dtype

    dtype = precision_dtype(args.precision)
    return metrics.peak_tflops(torch.cuda.get_device_name(mesh.device), metrics.compute_dtype_name(dtype))


class Reporter:
    """Per-step records, progress and logs of one rank (rank 0 prints and writes)."""

    def __init__(self, args, cfg, mesh, params, optimizer, *, unigram_entropy=None):
        from tandem import metrics

        self.args, self.mesh, self.params, self.optimizer = args, mesh, params, optimizer
        self.rank0 = mesh.rank == 0
        self.tokens_per_step = args.batch_size * cfg.max_seq_len * mesh.dp * args.grad_accum
        self.flops_per_step = metrics.model_flops_per_token(cfg) * self.tokens_per_step
        self.peak = _peak_tflops(args, mesh)
        self.meter = metrics.SavedActivations(exclude=params)
        self.unigram = unigram_entropy
        self.records, self.evals, self.resumes = [], [], []
        self.path = os.path.join(args.out, "metrics.jsonl")
        self.bar = None
        self.tty = sys.stderr.isatty()
        self.peak_memory = None

    # --- the log of records -------------------------------------------------------------------
    def begin(self, start: int, resumed_from) -> None:
        """Keep the records before ``start`` (of the run resumed from), start the log and the bar."""
        if not self.rank0:
            return
        os.makedirs(self.args.out, exist_ok=True)
        kept = []
        if resumed_from is not None:
            source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(resumed_from))), "metrics.jsonl")
            kept = [r for r in self._read(source) if r.get("step", 0) < start or r.get("event") == "resume"]
            kept.append({"event": "resume", "step": start, "checkpoint": resumed_from,
                         "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))})
        with open(self.path + ".tmp", "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(self.path + ".tmp", self.path)
        for r in kept:
            self._keep(r)
        self.log = open(self.path, "a")
        if resumed_from is not None:
            print(f"resumed from {resumed_from} at step {start}"
                  + (f" (restart {kept[-1]['restart']})" if kept[-1]["restart"] else ""), flush=True)
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.args.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    @staticmethod
    def _read(path: str) -> list:
        if not os.path.exists(path):
            return []
        out = []
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # the end of a line a killed job was writing
                    continue
        return out

    def _keep(self, r: dict) -> None:
        if r.get("event") == "resume":
            self.resumes.append(r)
        elif r.get("event") == "eval":
            self.evals.append(r)
        else:
            self.records.append(r)

    def _write(self, r: dict) -> None:
        self._keep(r)
        self.log.write(json.dumps(r) + "\n")
        self.log.flush()

    # --- each step ----------------------------------------------------------------------------
    def memory(self) -> dict:
        """This rank's bytes: CUDA's allocator peak, or (CPU) the exact breakdown."""
        from tandem import metrics

        mem = metrics.memory_breakdown(self.params, self.optimizer, self.meter.peak)
        if self.mesh.device.type == "cuda":
            mem = {"cuda_max_allocated": torch.cuda.max_memory_allocated(self.mesh.device), **mem}
            mem["peak"] = mem["cuda_max_allocated"]
        else:
            mem["peak"] = mem["total"]
        return mem

    def step(self, step: int, loss: float, lr: float, seconds: float, grad_norm=None, more=None) -> None:
        """Record step ``step`` (collective: the memory peak is the largest over ranks);
        ``more``: further fields of its record."""
        mem = self.memory()
        if self.peak_memory is None or mem["peak"] >= self.peak_memory["peak"]:
            self.peak_memory = mem  # the breakdown at this rank's peak (gradients included)
        # on the mesh's device: NCCL (the default group on GPUs) reduces CUDA tensors only
        peak = torch.tensor([float(mem["peak"])], dtype=torch.float64, device=self.mesh.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # (1,) over every rank
        if not self.rank0:
            return
        tflops = self.flops_per_step / seconds / self.mesh.world_size / 1e12
        r = {"step": step, "loss": loss, "lr": lr, "step_time_s": seconds,
             "tokens_per_s": self.tokens_per_step / seconds, "tflops_per_device": tflops,
             "memory_peak_bytes": int(peak.item())}
        if grad_norm is not None:
            r["grad_norm"] = grad_norm
        if self.peak is not None:
            r["mfu"] = tflops / self.peak
        r.update(more or {})
        self._write(r)
        if self.bar is not None:
            post = {"loss": f"{loss:.3f}", "lr": f"{lr:.1e}", "tok_s": f"{r['tokens_per_s']:,.0f}",
                    "mem": f"{r['memory_peak_bytes'] / _MIB:.0f}MiB"}
            if grad_norm is not None:
                post["gnorm"] = f"{grad_norm:.2f}"
            if "mfu" in r:
                post["mfu"] = f"{100 * r['mfu']:.1f}%"
            self.bar.set_postfix(post)
            self.bar.update()
        elif step % self.args.log_every == 0 or step == self.args.steps - 1:
            print(self._line(r), flush=True)

    def _line(self, r: dict) -> str:
        parts = [f"step {r['step'] + 1}/{self.args.steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        if "grad_norm" in r:
            parts.append(f"grad-norm {r['grad_norm']:.3f}")
        parts += [f"{r['step_time_s'] * 1e3:.0f} ms", f"{r['tokens_per_s']:,.0f} tok/s",
                  f"{r['tflops_per_device']:.3g} TFLOP/s/device"]
        if "mfu" in r:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        parts.append(f"mem {r['memory_peak_bytes'] / _MIB:.1f} MiB")
        return " | ".join(parts)

    def note(self, line: str) -> None:
        """Print ``line`` (rank 0), above the progress bar when there is one."""
        if self.rank0:
            (self.bar.write if self.bar is not None else print)(line)

    def eval(self, step: int, val_loss: float) -> None:
        """Record the validation loss after ``step`` + 1 steps (rank 0)."""
        if not self.rank0:
            return
        self._write({"event": "eval", "step": step, "val_loss": val_loss})
        note = f" (unigram entropy {self.unigram:.4f})" if self.unigram is not None else ""
        line = f"step {step + 1}/{self.args.steps} | val loss {val_loss:.4f}{note}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.rank0:
            self.log.close()

    def memory_per_rank(self) -> list:
        """Every rank's memory breakdown at its peak step (collective), on rank 0."""
        mine = {"rank": self.mesh.rank, **(self.peak_memory or self.memory())}
        everyone = [None] * dist.get_world_size() if dist.is_initialized() else [mine]
        if dist.is_initialized():
            dist.all_gather_object(everyone, mine)
        return everyone
