#!/usr/bin/env bash
# GPU session kit: tests and benchmarks of fastchgnet on a lent GPU machine.
#
#   bash scripts/gpu_session.sh            # = kit: the one 9-minute session (below)
#   bash scripts/gpu_session.sh kit        # CUDA test subset, kernel benchmarks, training step vs
#                                          # chgnet at batch 16/32/64 (time, peak memory, kernel
#                                          # launches), MD step (eager, compiled, CUDA graphs)
#   bash scripts/gpu_session.sh part1|part2|part3|all    # the longer, older split (~8 min each):
#                                          # part2 adds the largest cell in 30 GB and the scaling
#                                          # inputs, part3 the device graph and the trainer
#
# A lent GPU comes with 15 minutes of device time in all, machine start included, so `kit` is
# planned to end in under 9 minutes: every stage runs under its own `timeout` (KIT_T_<STAGE>
# seconds, defaults below; their sum plus set-up is 8.5 minutes) and a failed or timed-out stage
# does not stop the rest. Everything goes into one folder, $OUT/gpu-kit-<time>/ ($OUT defaults to
# a new temporary directory): versions.json (device, driver, CUDA, torch, triton, python, git
# commit), env.txt, session log, one result file per stage and summary.txt (one line per stage:
# ok / FAILED rc / TIMED OUT, seconds, result file). With more than 8 files the folder is also
# packed into one .tar.gz next to it (the device tool returns few files); summary.txt and
# versions.json stay unpacked beside it.
#
# Setup on the machine (GPU image: python3 with torch, triton, numpy, scipy, pytest ...):
# the wheels in .whl/ (pymatgen, ase, chgnet and what they need beyond the image) are installed
# into /tmp/site, .shared/data is made visible as ../shared/data (where tests/conftest.py and
# fastchgnet.bench look), and the repository is installed editable when `fastchgnet.kernels`
# (the kernels/ directory, mapped by pyproject.toml) does not import yet.
#
# Dry run on the CPU (tiny versions of every stage, no wheel install, no ../shared link): check
# the kit before a GPU session with
#   GPU_KIT_DRY=1 PY=.venv/bin/python bash scripts/gpu_session.sh kit
# (FASTCHGNET_GPU_KIT_DEVICE=cpu is the same). It takes a few minutes on 2 CPU cores.
set -u -o pipefail

PART=${1:-kit}
case "$PART" in
    kit|part1|part2|part3|all) ;;
    *) echo "usage: bash scripts/gpu_session.sh [kit|part1|part2|part3|all]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
if [ "${GPU_KIT_DRY:-0}" = 1 ]; then
    DEV=cpu
else
    DEV=${FASTCHGNET_GPU_KIT_DEVICE:-cuda}
fi
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu-session.XXXXXX)}
if [ "$PART" = kit ]; then
    FOLDER_NAME=gpu-kit-$(date -u +%Y%m%dT%H%M%SZ)
    OUT="$OUT/$FOLDER_NAME"
fi
mkdir -p "$OUT"
KIT_T0=$SECONDS
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
    SUMMARY+=("$name: $what ($((SECONDS - t0)) s)${RESULT:+ -> $RESULT}")
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

# versions.json: what the numbers were measured with (device, driver, CUDA, torch, triton ...)
write_versions() {
    GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown) KIT_PART=$PART KIT_DEV=$DEV \
        "$PY" - "$OUT/versions.json" <<'EOF2' 2>&1 | tee -a "$LOG"
import json, os, platform, subprocess, sys, time
info = {"kit": os.environ["KIT_PART"], "device_requested": os.environ["KIT_DEV"],
        "dry_run": os.environ["KIT_DEV"] == "cpu", "git_commit": os.environ["GIT_COMMIT"],
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": sys.version.split()[0],
        "platform": platform.platform(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}
for name in ("torch", "triton", "numpy", "pymatgen.core", "ase", "chgnet", "fastchgnet"):
    try:
        mod = __import__(name, fromlist=["_"])
        info[name.split(".")[0]] = getattr(mod, "__version__", "?")
    except Exception as exc:
        info[name.split(".")[0]] = f"import failed: {exc!r}"
try:
    import torch
    info["cuda"] = torch.version.cuda
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs)"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
except Exception as exc:
    info["device"] = f"torch query failed: {exc!r}"
try:
    info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
except Exception:
    info["driver"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF2
}

# kit: the one session that fits the GPU time (see the header); each stage under its own timeout
kit() {
    local tests=(tests/test_kernels_radial.py tests/test_kernels_angle.py tests/test_kernels_gated.py
                 tests/test_kernels_model.py
                 tests/test_device_graph.py::test_cuda_matches_cpu_and_syncs_once
                 tests/test_no_host_sync.py::test_forward_no_host_sync_cuda
                 tests/test_export.py::test_cuda_graph_replay_equals_eager
                 tests/test_trainer.py::test_tf32_accuracy_holds_on_cuda)
    local pyargs=(-q -p no:cacheprovider -m "not slow" --junitxml "$OUT/pytest-$TAG.xml" --maxfail 25)
    has_module pytest_timeout && pyargs+=(--timeout 60)
    local train=(--batch-sizes 16,32,64 --models exact,heads --repeats 5 --warmup 2)
    local kern=(--benchmark-only --benchmark-json "$OUT/$TAG-kernels.json")
    local md=(--repeats 10 --warmup 3 --large 2000 --variants eager,compiled,cudagraph)
    if [ "$DRY" = 1 ]; then
        # tiny versions on the CPU: a few quick tests (the CUDA ones skip), the kernels collected only
        tests+=(tests/test_compile_default.py)
        pyargs+=(-k "cuda or policy_values or wait_policy or console_script or compiler_probe")
        train=(--batch-sizes 2 --max-atoms 8 --models exact --repeats 1 --warmup 1)
        kern=(--collect-only -q)
        md=(--repeats 1 --warmup 1 --variants eager --no-reference)
    fi
    # a 2-core CPU is much slower than the GPU machine: the dry run gets 3x the time per stage
    local x=1
    [ "$DRY" = 1 ] && x=3
    RESULT=pytest-$TAG.xml STEP_LOG="$OUT/pytest-$TAG.log" step tests $((x * ${KIT_T_TESTS:-110})) \
        "$PY" -m pytest "${tests[@]}" "${pyargs[@]}"
    RESULT=$TAG-kernels.json step kernels $((x * ${KIT_T_KERNELS:-70})) "$PY" -m pytest \
        benchmarks/test_bench_kernels.py -p no:cacheprovider "${kern[@]}"
    RESULT=$TAG-train-step.json step train-step $((x * ${KIT_T_TRAIN:-150})) "$PY" -m fastchgnet.bench.train_step \
        --device "$DEV" "${train[@]}" --json "$OUT/$TAG-train-step.json"
    RESULT=$TAG-md-step.json step md-step $((x * ${KIT_T_MD:-100})) "$PY" -m fastchgnet.bench.md \
        --device "$DEV" "${md[@]}" --json "$OUT/$TAG-md-step.json"
    RESULT=
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
        echo "# gpu_session.sh $PART on $DEV, $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - KIT_T0)) s in all"
        echo "# stages (ok / FAILED rc / TIMED OUT, seconds, result file)"
        printf '%s\n' "${SUMMARY[@]}"
    } | tee "$OUT/summary.txt" | tee -a "$OUT/env.txt" "$LOG"
    if [ "$PART" = kit ]; then
        local n
        n=$(find "$OUT" -type f | wc -l)
        if [ "$n" -gt 8 ]; then
            (cd "$OUT/.." && tar czf "$FOLDER_NAME.tar.gz" "$FOLDER_NAME" && \
                cp "$FOLDER_NAME/summary.txt" "$FOLDER_NAME-summary.txt" && \
                cp "$FOLDER_NAME/versions.json" "$FOLDER_NAME-versions.json" && \
                rm -rf "$FOLDER_NAME") && \
                echo "== $n files packed into $(dirname "$OUT")/$FOLDER_NAME.tar.gz (summary and versions beside it)"
        fi
        echo "== results:"
        ls -la "$(dirname "$OUT")"
        return
    fi
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
write_versions
case "$PART" in
    kit) kit ;;
    part1) part1 ;;
    part2) part2 ;;
    part3) part3 ;;
    all) part1; part2; part3 ;;
esac
finish
