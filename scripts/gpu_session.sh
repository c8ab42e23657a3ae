#!/usr/bin/env bash
# GPU session kit: tests and benchmarks of fastchgnet on a lent GPU machine, in one command each.
#
#   bash scripts/gpu_session.sh part1    # CUDA test suite, training-step benchmarks
#   bash scripts/gpu_session.sh part2    # MD step (eager, compiled, CUDA graphs, 2,000 atoms),
#                                        # largest cell in 30 GB, scaling inputs
#   bash scripts/gpu_session.sh part3    # fused kernels, device graph, trainer benchmarks
#   bash scripts/gpu_session.sh all      # all three (longer than one 10-minute device command)
#
# The parts are in order of importance; three fit in one 30-minute session (~8 minutes each plus
# the machine's start). Each part is planned to end in under ~8 minutes: every step runs under its own `timeout`
# (KIT_T_<STEP> seconds, defaults below) and a failed or timed-out step does not stop the rest.
# Results go to $OUT (at most 8 files; more are packed into one .tar.gz); the step summary is
# printed last and appended to env.txt.
#
# Setup on the machine (GPU image: python3 3.12 with torch, triton, numpy, scipy, pytest ...):
# the wheels in .whl/ (pymatgen, ase, chgnet and what they need beyond the image) are installed
# into /tmp/site, .shared/data is made visible as ../shared/data (where tests/conftest.py and
# fastchgnet.bench look), and the repository is installed editable when `fastchgnet.kernels`
# (the kernels/ directory, mapped by pyproject.toml) does not import yet.
#
# Local check of the same steps on the CPU with tiny sizes (pytest files only collected):
#   FASTCHGNET_GPU_KIT_DEVICE=cpu PY=.venv/bin/python bash scripts/gpu_session.sh all
# (no wheel install, no ../shared link; $OUT defaults to a new temporary directory).
set -u -o pipefail

PART=${1:-}
case "$PART" in
    part1|part2|part3|all) ;;
    *) echo "usage: bash scripts/gpu_session.sh part1|part2|part3|all" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DEV=${FASTCHGNET_GPU_KIT_DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu-session.XXXXXX)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/session-$PART.log"
SUMMARY=()

if [ "$DEV" = cpu ]; then
    TAG=cpu-dryrun
    DRY=1
else
    TAG=$DEV
    DRY=0
fi

log() { echo "== $*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run CMD under `timeout -s INT` (pytest still writes its report), its
# output tee'd to the session log (and to $STEP_LOG when set); record rc and wall time; never stop
# the session.
step() {
    local name=$1 secs=$2
    shift 2
    log "$name (timeout ${secs}s): $*"
    local t0=$SECONDS
    timeout -s INT -k 10 "$secs" "$@" 2>&1 | tee -a "$LOG" ${STEP_LOG:+"$STEP_LOG"}
    local rc=${PIPESTATUS[0]}
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        what="FAILED rc=$rc"
    fi
    SUMMARY+=("$name: $what ($((SECONDS - t0)) s)")
    log "$name: $what ($((SECONDS - t0)) s)"
}

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

setup() {
    if [ "$DRY" = 0 ]; then
        if compgen -G ".whl/*.whl" >/dev/null; then
            log "installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
            # nvidia-ml-py3 (chgnet imports its nvidia_smi) also ships a 2017 pynvml.py that would
            # shadow the image's nvidia-ml-py (used by torch.cuda): keep the image's where it has one
            if [ -f /tmp/site/pynvml.py ] && "$PY" -c "import pynvml" >/dev/null 2>&1; then
                rm -f /tmp/site/pynvml.py
            fi
            # stray top-level folders of the palettable wheel
            rm -rf /tmp/site/build /tmp/site/docs /tmp/site/scripts /tmp/site/test
            export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
        else
            log "no .whl/ carried: pymatgen, ase and chgnet must already be installed"
        fi
        if [ -d .shared/data ] && [ ! -e ../shared/data ]; then
            mkdir -p ../shared && ln -s "$ROOT/.shared/data" ../shared/data
            log "linked ../shared/data -> .shared/data"
        fi
    fi
    [ -d .shared/data/structures ] && export FASTCHGNET_BENCH_DATA=$ROOT/.shared/data/structures
    if ! has_module fastchgnet.kernels; then
        log "fastchgnet.kernels does not import: editable install of the repository"
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tee -a "$LOG"
        if ! has_module fastchgnet.kernels && [ "$DRY" = 0 ] && [ ! -e fastchgnet/kernels ]; then
            # this copy of the tree only: the package layout pyproject.toml maps
            ln -s ../kernels fastchgnet/kernels && log "linked fastchgnet/kernels -> kernels"
        fi
    fi
}

write_env() {
    local env="$OUT/env.txt"
    {
        echo "# gpu_session.sh $PART, device $DEV, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
        command -v nvidia-smi >/dev/null && nvidia-smi
        "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], sys.executable, platform.platform())
for name in ("torch", "triton", "numpy", "scipy", "pymatgen.core", "ase", "spglib", "chgnet",
             "chgnet.model", "fastchgnet", "fastchgnet.kernels", "pytest", "pytest_benchmark",
             "xdist", "pytest_timeout"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:20s} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as exc:  # report every missing piece, not only the first
        print(f"{name:20s} IMPORT FAILED: {exc!r}")
try:
    import torch
    print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB",
              p.multi_processor_count, "SMs")
except Exception as exc:
    print("torch/cuda query failed:", repr(exc))
EOF
    } > "$env" 2>&1
    tee -a "$LOG" < "$env"
}

# sizes: the GPU runs' defaults, or tiny ones for the local CPU check
if [ "$DRY" = 1 ]; then
    TRAIN=(--batch-sizes 2 --max-atoms 8 --repeats 1 --warmup 1)
    MD=(--repeats 1 --warmup 1 --large 100 --variants eager,compiled,cudagraph)
    CELL=(--max-cell-start 16 --max-cell-limit 64)
    SCALING=(--tiny --batch-sizes 1,2 --max-atoms 8 --repeats 1 --warmup 1 --ranks 4,8)
    TRAINER=(--n-structures 8 --batch-sizes 4 --max-atoms 8 --repeats 1 --warmup 1)
    COLLECT=(--collect-only -q)
else
    TRAIN=(--batch-sizes 16,32,64)
    MD=(--repeats 10 --warmup 3 --large 2000 --variants eager,compiled,cudagraph)
    CELL=(--memory-gb 30 --max-cell-start 1000 --max-cell-limit 131072 --max-cell-seconds 60)
    SCALING=()
    TRAINER=()
    COLLECT=()
fi

part1() {
    local args=(tests -q -p no:cacheprovider --junitxml "$OUT/pytest-$TAG.xml")
    # all failures in one run rather than the first (-x): a GPU session is too short to repeat
    args+=(--maxfail "${KIT_MAXFAIL:-25}")
    has_module pytest_timeout && args+=(--timeout "${KIT_TEST_TIMEOUT:-120}")
    local threads=()
    if has_module xdist && [ "$DRY" = 0 ] && [ "${KIT_XDIST:-4}" -gt 1 ]; then
        # a test file per worker; the cores shared out so torch's threads do not oversubscribe
        args+=(-n "${KIT_XDIST:-4}" --dist loadfile)
        threads=(env OMP_NUM_THREADS=$(( $(nproc) / ${KIT_XDIST:-4} > 0 ? $(nproc) / ${KIT_XDIST:-4} : 1 )))
    fi
    [ "$DRY" = 1 ] && args+=(--collect-only)
    STEP_LOG="$OUT/pytest-$TAG.log" step pytest "${KIT_T_PYTEST:-250}" "${threads[@]}" "$PY" -m pytest "${args[@]}"
    step train-step "${KIT_T_TRAIN:-120}" "$PY" -m fastchgnet.bench.train_step --device "$DEV" \
        --models exact,decoupled,heads "${TRAIN[@]}" --json "$OUT/$TAG-train-step.json"
    step train-step-compiled "${KIT_T_TRAIN_COMPILED:-100}" "$PY" -m fastchgnet.bench.train_step \
        --device "$DEV" --models heads --compile "${TRAIN[@]}" \
        --json "$OUT/$TAG-train-step-compiled.json"
}

part2() {
    step md-step "${KIT_T_MD:-200}" "$PY" -m fastchgnet.bench.md --device "$DEV" "${MD[@]}" \
        --json "$OUT/$TAG-md-step.json"
    step max-cell "${KIT_T_CELL:-200}" "$PY" -m fastchgnet.bench.md --device "$DEV" --max-cell \
        "${CELL[@]}" --json "$OUT/$TAG-max-cell.json"
    step scaling "${KIT_T_SCALING:-80}" "$PY" -m fastchgnet.bench.scaling --device "$DEV" \
        "${SCALING[@]}" --json "$OUT/$TAG-scaling.json"
}

part3() {
    step kernels "${KIT_T_KERNELS:-180}" "$PY" -m pytest benchmarks/test_bench_kernels.py \
        -p no:cacheprovider --benchmark-only --benchmark-json "$OUT/$TAG-kernels.json" \
        "${COLLECT[@]}"
    step device-graph "${KIT_T_DEVGRAPH:-100}" env FASTCHGNET_BENCH_DEVICE="$DEV" "$PY" -m pytest \
        benchmarks/test_bench_device_graph.py -p no:cacheprovider --benchmark-only \
        --benchmark-json "$OUT/$TAG-devgraph.json" "${COLLECT[@]}"
    step trainer "${KIT_T_TRAINER:-150}" "$PY" -m fastchgnet.bench.trainer_epochs --device "$DEV" \
        "${TRAINER[@]}" --json "$OUT/$TAG-trainer.json"
}

# at most 8 files come back from $OUT: pack them into one archive when there are more
finish() {
    {
        echo "# steps"
        printf '%s\n' "${SUMMARY[@]}"
    } | tee -a "$OUT/env.txt" "$LOG"
    local n
    n=$(find "$OUT" -type f | wc -l)
    if [ "$n" -gt 8 ]; then
        (cd "$OUT" && tar czf "gpu-session-$PART.tar.gz" --remove-files -- *) && \
            echo "== $n files packed into $OUT/gpu-session-$PART.tar.gz"
    fi
    echo "== results in $OUT:"
    ls -la "$OUT"
}

log "gpu_session.sh $PART on $DEV, results in $OUT"
setup
write_env
case "$PART" in
    part1) part1 ;;
    part2) part2 ;;
    part3) part3 ;;
    all) part1; part2; part3 ;;
esac
finish
