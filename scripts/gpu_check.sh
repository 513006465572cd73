#!/usr/bin/env bash
# tandem GPU check: the one prepared run for a machine with one GPU, a preinstalled CUDA
# torch and no network. It builds the core in place, runs the CUDA tests, the benchmarks and
# compute-sanitizer, writes logs and JSON to OUTDIR and prints a summary table last.
#
#   bash scripts/gpu_check.sh [OUTDIR]                  (default OUTDIR: out/gpu_check)
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh out/x
#
# Knobs (environment):
#   PYTHON                 interpreter with torch (default python3)
#   BUDGET_S               seconds for the whole run (default 450: under 8 minutes with
#                          the summary); every step's timeout is cut to what is left
#   BUILD                  auto (default: build unless the core is up to date), always, never
#   BUILD_TIMEOUT_S        cap of the build step (default 300; a slow machine needs more)
#   MAX_JOBS               compile jobs (default: nproc)
#   TORCH_CUDA_ARCH_LIST   default 9.0 (Hopper)
#
# Steps: env, build; fused_accuracy (fp32 / bf16 / fp16 max error of the fused op against
# the composite with TF32 off, and whether cuBLASLt's epilogue ran for the aligned shapes);
# tests_cuda (NCCL_DEBUG=WARN); on 2+ GPUs multigpu (the multi-GPU tests) and link_abort
# (StageLink.abort() timed with a killed peer, < 1 s); then benchmarks and compute-sanitizer.
# Without a GPU the CUDA steps report SKIP and the benchmark runs its --quick CPU smoke test.
# Exit status: 0 when no step failed (SKIP and a missed performance target are not
# failures), 1 otherwise.
#
# Adding a check: write a function `section_<name>` that runs its commands through
#   run_step <log name> <cap seconds> -- <command...>   (output: OUTDIR/<log name>.log)
# and reports with
#   record <row name> ok|FAIL|TIMEOUT|SKIP "<detail>"   (a FAIL or TIMEOUT fails the run),
# then add <name> to SECTIONS at the bottom. $PY, $OUT, $HAVE_GPU, left() are available.

set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/out/gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
PY=${PYTHON:-python3}
[[ $PY == */* ]] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # a path, from here
cd "$ROOT" || exit 1
BUDGET_S=${BUDGET_S:-450}
BUILD=${BUILD:-auto}
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build of tandem._C
export PYTHONUNBUFFERED=1
T0=$SECONDS
HAVE_GPU=0
NGPUS=0
ROWS=()
FAILED=0

# ---------------------------------------------------------------------------------------
# helpers

left() { echo $((BUDGET_S - (SECONDS - T0))); }

# record NAME STATUS DETAIL: one summary row (the step's seconds come from the last run_step)
record() {
    ROWS+=("$1|$2|${STEP_S:-0}|$3")
    case $2 in FAIL | TIMEOUT) FAILED=$((FAILED + 1)) ;; esac
    echo "== [$1] $2: $3"
}

# run_step LOG CAP -- CMD...: CMD with a timeout of min(CAP, time left - 15 s), stdout and
# stderr to OUT/LOG.log. Sets STEP_RC (124/137: timed out, 125: no time left) and STEP_S.
run_step() {
    local log=$1 cap=$2 t s
    shift 3
    t=$(($(left) - 15))
    ((cap < t)) && t=$cap
    STEP_S=0
    if ((t < 5)); then
        echo "not run: no time left in the ${BUDGET_S} s budget" >"$OUT/$log.log"
        STEP_RC=125
        return
    fi
    echo "-- $log (timeout ${t} s): $*"
    s=$SECONDS
    timeout --kill-after=10 "$t" "$@" >"$OUT/$log.log" 2>&1
    STEP_RC=$?
    STEP_S=$((SECONDS - s))
    if ((STEP_RC != 0)); then tail -n 15 "$OUT/$log.log" | sed 's/^/   | /'; fi
}

# status_of RC: ok, TIMEOUT or FAIL
status_of() {
    case $1 in 0) echo ok ;; 124 | 137) echo TIMEOUT ;; *) echo FAIL ;; esac
}

# why RC: a word on a non-zero exit
why() {
    case $1 in 0) echo "" ;; 124 | 137) echo "timed out; " ;; 125) echo "no time left; " ;; *) echo "exit $1; " ;; esac
}

# ---------------------------------------------------------------------------------------
# sections

section_env() {
    run_step env 60 -- "$PY" - <<'PYEOF'
import os, platform, shutil, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print("gpus", n)
for i in range(n):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu{i}", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB")
print("nproc", os.cpu_count(), "nvcc", shutil.which("nvcc"), "compute-sanitizer", shutil.which("compute-sanitizer"))
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
PYEOF
    if ((STEP_RC != 0)); then
        record env "$(status_of $STEP_RC)" "$(why $STEP_RC)$PY cannot run torch: see env.log"
        return
    fi
    local gpus torch_v gpu
    gpus=$(awk '$1 == "gpus" {print $2}' "$OUT/env.log")
    torch_v=$(awk '$1 == "python" {print $4}' "$OUT/env.log")
    gpu=$(awk '$1 == "gpu0" {$1 = ""; print substr($0, 2)}' "$OUT/env.log")
    NGPUS=${gpus:-0}
    if [[ ${gpus:-0} -ge 1 ]]; then
        HAVE_GPU=1
        record env ok "torch $torch_v, $gpus GPU(s): $gpu"
    else
        record env ok "torch $torch_v, NO GPU: the CUDA steps below skip"
    fi
}

# Is python/tandem/_C up to date? Newer than every source and build file, importable, built
# for this torch, with CUDA kernels when this torch can use a GPU. Prints the reason.
core_up_to_date() {
    timeout 120 "$PY" - 2>&1 <<'PYEOF' | tail -n 1
import glob, os, sys, sysconfig
so = os.path.join("python", "tandem", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
if not os.path.exists(so):
    sys.exit(f"no {so}")
inputs = [p for p in glob.glob("csrc/**", recursive=True) if os.path.isfile(p)]
inputs += ["setup.py", "pyproject.toml"] + glob.glob("buildtools/*.py")
newer = [p for p in inputs if os.path.getmtime(p) > os.path.getmtime(so)]
if newer:
    sys.exit(f"{len(newer)} source file(s) newer than {so}, e.g. {newer[0]}")
import torch, tandem
info = tandem.build_info()
if info["torch_version"] != torch.__version__.split("+")[0]:
    sys.exit(f"built for torch {info['torch_version']}, running {torch.__version__}")
if torch.cuda.is_available() and not info["cuda"]:
    sys.exit("a CPU-only core, but this torch sees a GPU")
print(f"{so} is up to date")
PYEOF
}

section_build() {
    local reason did_build=0
    if [[ $BUILD == never ]] || { [[ $BUILD == auto ]] && reason=$(core_up_to_date) && [[ $reason == *"up to date" ]]; }; then
        STEP_S=0
        echo "${reason:-BUILD=never}: not rebuilt" >"$OUT/build.log"
    else
        echo "-- rebuilding the core: ${reason:-BUILD=$BUILD}"
        run_step build "${BUILD_TIMEOUT_S:-300}" -- env MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" "$PY" setup.py build_ext --inplace
        did_build=1
        if ((STEP_RC != 0)); then
            record build "$(status_of $STEP_RC)" "$(why $STEP_RC)setup.py build_ext --inplace: see build.log"
            return
        fi
    fi
    local built=$STEP_S info
    run_step build_info 60 -- "$PY" -c 'import tandem
print(tandem.__file__)
print(" ".join(f"{k}={v}" for k, v in tandem.build_info().items()))'
    STEP_S=$((STEP_S + built))
    info=$(tail -n 1 "$OUT/build_info.log")
    if ((STEP_RC != 0)); then
        record build FAIL "$(why $STEP_RC)import tandem failed: $info"
    elif ((did_build == 0)); then
        record build ok "kept (${reason:-BUILD=never}); $info"
    else
        record build ok "built in place; $info"
    fi
}

# pytest_counts XML: "passed failed errors skipped" from a junit file
pytest_counts() {
    "$PY" - "$1" 2>/dev/null <<'PYEOF' || echo "0 0 0 0"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
s = root if root.tag == "testsuite" else root.find("testsuite")
t, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
print(t - f - e - k, f, e, k)
PYEOF
}

# The fused op first, cheap: fp32 and bf16 max error against the composite (TF32 off), and
# the path counters: aligned bf16/fp16 tanh shapes must have run cuBLASLt's epilogue (the
# CUDA tests compare against the general path, so a fused path that never ran passes them).
section_fused_accuracy() {
    STEP_S=0
    if ((HAVE_GPU == 0)); then
        record fused_accuracy SKIP "no GPU"
        return
    fi
    run_step fused_accuracy 120 -- "$PY" - <<'PYEOF'
import torch, torch.nn.functional as F
from tandem import _C, ops
torch.backends.cuda.matmul.allow_tf32 = False
g = torch.Generator(device="cuda").manual_seed(0)
bad = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    worst, worst_plain, runs, epi, within = 0.0, 0.0, 0, 0, True
    for m, k, n in ((64, 128, 256), (512, 1024, 2048), (2048, 4096, 4096)):
        x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.float64)
        w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float64) / k ** 0.5
        b = torch.randn(n, device="cuda", generator=g, dtype=torch.float64)
        exact = F.gelu(F.linear(x, w, b), approximate="tanh")
        xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
        _C._reset_linear_gelu_paths()
        fused = ops.linear_bias_gelu(xd, wd, bd, "tanh")
        epi += _C._linear_gelu_paths()["forward_epilogue"]
        runs += 1
        plain = F.gelu(F.linear(xd, wd, bd), approximate="tanh")
        err = (fused.double() - exact).abs().max().item()
        err_plain = (plain.double() - exact).abs().max().item()
        floor = torch.finfo(dtype).eps * exact.abs().max().item() * 0.5  # half an ulp of the largest value
        within = within and err <= 2 * err_plain + floor
        worst, worst_plain = max(worst, err), max(worst_plain, err_plain)
    path = f"epilogue {epi}/{runs}"
    print(f"{str(dtype)[6:]}: max err {worst:.3g} (composite {worst_plain:.3g}), {path}")
    if dtype == torch.float32 and (epi or not within):
        bad.append(f"fp32 must take the general path within 2x the composite ({path}, err {worst:.3g})")
    if dtype != torch.float32 and (epi != runs or not within):
        bad.append(f"{str(dtype)[6:]}: {path}, err {worst:.3g} vs composite {worst_plain:.3g}")
print("RESULT", "; ".join(bad) if bad else "ok")
raise SystemExit(1 if bad else 0)
PYEOF
    local detail
    detail=$(grep -E "^(float32|bfloat16|float16):" "$OUT/fused_accuracy.log" | sed 's/^/ /' | tr '\n' ';')
    record fused_accuracy "$(status_of $STEP_RC)" "$(why $STEP_RC)TF32 off:${detail%;}"
}

section_tests_cuda() {
    # NCCL_DEBUG=WARN: NCCL's own warnings land in the log beside tandem's errors
    run_step tests_cuda 180 -- env NCCL_DEBUG=WARN "$PY" -m pytest -m cuda -q -rfEs -p no:cacheprovider \
        --junitxml "$OUT/tests_cuda.xml" tests
    local p f e k
    read -r p f e k <<<"$(pytest_counts "$OUT/tests_cuda.xml")"
    local counts="$p passed, $f failed, $e errors, $k skipped"
    if ((STEP_RC == 5)); then
        record tests_cuda FAIL "no CUDA tests collected"
    elif ((STEP_RC != 0)); then
        record tests_cuda "$(status_of $STEP_RC)" "$(why $STEP_RC)$counts (tests_cuda.log)"
    elif ((HAVE_GPU == 0)); then
        record tests_cuda SKIP "no GPU: $counts"
    else
        record tests_cuda ok "$counts (NCCL_DEBUG=WARN)"
    fi
}

# 2+ GPUs: the multi-GPU tests, then StageLink.abort() timed while a receive from a killed
# peer is pending and a send on the other fork is queued behind it (must return in < 1 s).
section_multigpu() {
    STEP_S=0
    if ((NGPUS < 2)); then
        record multigpu SKIP "$NGPUS GPU(s): the multi-GPU tests need 2"
        return
    fi
    run_step multigpu 240 -- env NCCL_DEBUG=WARN "$PY" -m pytest -m multigpu -q -rfEs -p no:cacheprovider \
        --junitxml "$OUT/multigpu.xml" tests
    local p f e k
    read -r p f e k <<<"$(pytest_counts "$OUT/multigpu.xml")"
    record multigpu "$(status_of $STEP_RC)" "$(why $STEP_RC)$p passed, $f failed, $e errors, $k skipped (NCCL_DEBUG=WARN)"
}

section_link_abort() {
    STEP_S=0
    if ((NGPUS < 2)); then
        record link_abort SKIP "$NGPUS GPU(s): needs 2"
        return
    fi
    # a file, not stdin: the spawned ranks import their function from it
    cat >"$OUT/link_abort.py" <<'PYEOF'
import os, sys, tempfile, time
import torch, torch.distributed as dist, torch.multiprocessing as mp

def rank_main(rank, init, queue):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    from tandem.comm import Communicator, StageLink
    comm = Communicator(dist.group.WORLD, f"cuda:{rank}", timeout=60.0)
    link = StageLink(comm, None if rank == 0 else 0, 1 if rank == 0 else None, shapes="static", timeout=60.0)
    if rank == 0:
        link.send_forward(torch.ones(1024, device="cuda"))
        link.wait_sends()
        torch.cuda.synchronize()
        time.sleep(1.0)
        os._exit(17)  # killed: never sends the second activation
    link.recv_forward()
    x = link.irecv_forward().wait()  # the current stream waits for a receive that never lands
    link.send_backward(torch.ones(1024, device="cuda"))  # another fork, queued behind that stream
    time.sleep(3.0)  # rank 0 is gone by now
    start = time.monotonic()
    link.abort()
    queue.put(time.monotonic() - start)
    os._exit(0)

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=rank_main, args=(r, os.path.join(tmp, "rdv"), queue)) for r in range(2)]
        for p in procs:
            p.start()
        took = queue.get(timeout=90)
        for p in procs:
            p.join(30)
    print(f"abort_s {took:.3f}")
    sys.exit(0 if took < 1.0 else 1)
PYEOF
    run_step link_abort 120 -- env NCCL_DEBUG=WARN "$PY" "$OUT/link_abort.py"
    local took
    took=$(awk '$1 == "abort_s" {print $2}' "$OUT/link_abort.log")
    record link_abort "$(status_of $STEP_RC)" "$(why $STEP_RC)StageLink.abort() with a killed peer: ${took:-?} s (must be < 1 s)"
}

# The benchmark rows of the summary: one line per target from the JSON.
bench_targets() {
    "$PY" - "$1" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
for t in r["targets"]:
    v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
    print(f"{'PASS' if t['pass'] else 'MISS'}|{t['key']} = {v} (target >= {t['target']:.2f})")
print(f"{len(r['speedups'])} shapes, {len(r['skipped_shapes'])} skipped for time, {r['wrong']} wrong values")
PYEOF
}

section_bench_linear_gelu() {
    local json="$OUT/bench_linear_gelu.json" what
    rm -f "$json"
    if ((HAVE_GPU)); then
        # ~1 min on an H100; start no new shape after 150 s (or what the budget leaves)
        local budget=$(($(left) - 90))
        ((budget > 150)) && budget=150
        what="cuda bf16, all shapes"
        run_step bench_linear_gelu 240 -- "$PY" benchmarks/bench_linear_gelu.py --device cuda \
            --dtype bfloat16 --warmup 10 --iters 30 --time-budget "$budget" --json "$json"
    else
        what="NO GPU: CPU --quick smoke run, not a GPU measurement"
        run_step bench_linear_gelu 120 -- "$PY" benchmarks/bench_linear_gelu.py --quick --device cpu \
            --json "$json"
    fi
    local rc=$STEP_RC lines status
    if [[ ! -s $json ]]; then
        record bench_linear_gelu "$(status_of $rc)" "$(why $rc)no JSON ($what): see bench_linear_gelu.log"
        return
    fi
    mapfile -t lines < <(bench_targets "$json")
    status=$(status_of $rc)
    ((rc == 0 && HAVE_GPU == 0)) && status=SKIP
    record bench_linear_gelu "$status" "$(why $rc)$what; ${lines[-1]}"
    local line
    for line in "${lines[@]:0:${#lines[@]}-1}"; do
        ROWS+=("  target|${line%%|*}||${line#*|}$( ((HAVE_GPU)) || echo ' [cpu smoke]')")
    done
}

find_sanitizer() {
    local c
    for c in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
        /usr/local/cuda/bin/compute-sanitizer; do
        [[ -n $c && -x $c ]] && { echo "$c"; return; }
    done
}

section_sanitizer() {
    local san
    san=$(find_sanitizer)
    STEP_S=0
    if ((HAVE_GPU == 0)); then
        record sanitizer SKIP "no GPU"
        return
    elif [[ -z $san ]]; then
        record sanitizer FAIL "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
        return
    fi
    # Each tensor its own cudaMalloc, so an out-of-bounds access cannot land in a cached block.
    # A small run: the epilogue and general paths of every dtype, forward and backward.
    local select="test_forward_and_grads and tanh and not nobias and not 512-1024-2048"
    run_step sanitizer 180 -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck \
        --report-api-errors no --error-exitcode 99 --print-limit 50 \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_linear_gelu_cuda.py -k "$select"
    local summary tests
    summary=$(grep -m1 -o "ERROR SUMMARY: [0-9]* error[s]*" "$OUT/sanitizer.log")
    tests=$(grep -E -o "[0-9]+ (passed|failed)[^=]*" "$OUT/sanitizer.log" | tail -n 1)
    if ((STEP_RC == 99)); then
        record sanitizer FAIL "memcheck: ${summary:-errors}; ${tests} (sanitizer.log)"
    else
        record sanitizer "$(status_of $STEP_RC)" "$(why $STEP_RC)memcheck: ${summary:-no summary}; ${tests:-no tests}"
    fi
}

# ---------------------------------------------------------------------------------------
# communication runtime (tandem.comm): single-GPU benchmarks. Its CUDA tests
# (tests/test_comm_cuda.py, marked cuda) run in tests_cuda above. One GPU means a world of
# one rank: the NCCL path runs end to end (own communicator, comm stream, events), but the
# collectives are local copies, so bandwidth and overlap targets are not measured here.

# comm_bench_summary JSON: the target lines, then "<rows> rows, <wrong> wrong values"
comm_bench_summary() {
    "$PY" - "$1" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
for t in r["targets"]:
    v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
    print(f"{'PASS' if t['pass'] else 'MISS'}|{t['description']} = {v} (target >= {t['target']:.2f})")
print(f"{len(r['results'])} rows, {r['wrong']} wrong values")
PYEOF
}

# comm_bench NAME CAP GPU_ARGS CPU_ARGS: run benchmarks/NAME.py, record it and its targets
comm_bench() {
    local name=$1 cap=$2 gpu_args=$3 cpu_args=$4 json="$OUT/$1.json" what lines status line
    rm -f "$json"
    if ((HAVE_GPU)); then
        what="cuda, one rank"
        # shellcheck disable=SC2086
        run_step "$name" "$cap" -- "$PY" "benchmarks/$name.py" --device cuda $gpu_args --json "$json"
    else
        what="NO GPU: CPU smoke run"
        # shellcheck disable=SC2086
        run_step "$name" 60 -- "$PY" "benchmarks/$name.py" --device cpu $cpu_args --json "$json"
    fi
    local rc=$STEP_RC
    if [[ ! -s $json ]]; then
        record "$name" "$(status_of $rc)" "$(why $rc)no JSON ($what): see $name.log"
        return
    fi
    mapfile -t lines < <(comm_bench_summary "$json")
    status=$(status_of $rc)
    ((rc == 0 && HAVE_GPU == 0)) && status=SKIP
    record "$name" "$status" "$(why $rc)$what; ${lines[-1]}"
    for line in "${lines[@]:0:${#lines[@]}-1}"; do
        ROWS+=("  target|${line%%|*}||${line#*|}")
    done
}

section_bench_comm() {
    comm_bench bench_comm 90 "-b 8 -e 256M -f 4 --warmup 5 --iters 20" "-e 64K -f 8"
}

section_bench_overlap() {
    comm_bench bench_overlap 90 "--dtype bf16 --warmup 3 --iters 10" "--iters 5"
}

# ---------------------------------------------------------------------------------------
# tensor parallelism: tandem's ParallelMLP / ParallelSelfAttention vs PyTorch TP at tp=1 on
# one GPU (one rank; the multi-GPU runs need `torchrun --nproc-per-node N benchmarks/bench_tp.py`)

section_bench_tp() {
    comm_bench bench_tp 120 "--dtype bf16 --warmup 5 --iters 20" "--quick"
}

# ---------------------------------------------------------------------------------------
# run, then the summary

print_summary() {
    local row n s t d
    echo
    echo "# ================================================================================"
    echo "# tandem gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(hostname)  outdir $OUT"
    echo "# elapsed $((SECONDS - T0)) s (budget ${BUDGET_S} s); python $PY"
    printf "# %-18s %-7s %5s  %s\n" step status sec detail
    for row in "${ROWS[@]}"; do
        IFS='|' read -r n s t d <<<"$row"
        printf "  %-18s %-7s %5s  %s\n" "$n" "$s" "$t" "$d"
    done
    if ((FAILED)); then
        echo "# result: FAILED ($FAILED step(s) failed; logs in $OUT)"
    elif ((HAVE_GPU == 0)); then
        echo "# result: ok, but NO GPU: the CUDA steps were skipped"
    else
        echo "# result: ok"
    fi
}

SECTIONS=(env build fused_accuracy tests_cuda multigpu link_abort bench_linear_gelu sanitizer)
SECTIONS+=(bench_comm bench_overlap)  # communication runtime, see its block above
SECTIONS+=(bench_tp)  # tensor parallelism
for section in "${SECTIONS[@]}"; do
    echo "== section $section ($(left) s left)"
    "section_$section"
done
print_summary | tee "$OUT/summary.txt"
((FAILED == 0))
