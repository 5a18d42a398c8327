#!/usr/bin/env bash
# The one-GPU check (issue 26): on one GPU where only PyTorch is installed and nothing can be downloaded,
# in at most 8 minutes on an H100:
#   1. installs DeepSpeed and the other pure-Python needs from the wheel folder bench/prepare_gpu_wheels.sh made
#      ($GPU_WHEELS, default .gpu_wheels/ in the checkout; with its copy of the tokenizer and text the tests use);
#   2. runs the GPU tests: python -m pytest -m gpu tests/test_gpu.py;
#   3. runs bench/gpu_check.py: convert --device cuda vs --device cpu (seconds, peak GPU memory against
#      factorllm_ds.convert_cost), plan's prediction against torch.cuda.max_memory_allocated for training steps,
#      and bench-speed (prefill / decode, MoE vs dense) on a random model of TinyLlama-1.1B's shape.
# Every figure goes to files in $OUT (default: gpu_check_out/ in the checkout): env.json, pytest.log,
# convert.json, memory.json, speed.json, summary.md and gpu_check.log (every command's output).
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --dry-run    # (or DRY_RUN=1) the same steps at toy size on the CPU, with the
#                                        # installed packages; the CUDA-only parts are skipped with a message
#
# Exit 0 when the tests passed and every step ran; 1 otherwise (the files say which).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY="${DRY_RUN:-0}"
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu_check.sh: unknown argument '$arg' (the only flag is --dry-run)" >&2; exit 2 ;;
    esac
done
OUT_DIR="${OUT:-$REPO/gpu_check_out}"
WHEELS="${GPU_WHEELS:-$REPO/.gpu_wheels}"
PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-420}"  # seconds for the tests and the measurements, after the install
TEST_LIMIT=210                      # of which the GPU tests get at most this (one test at most 150 s)

mkdir -p "$OUT_DIR" || exit 2
LOG="$OUT_DIR/gpu_check.log"
log() { printf '[gpu_check.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG" >&2; }
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
cd "$REPO" || exit 2
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
START=$SECONDS

if [[ "$DRY" == 1 ]]; then
    log "dry run: toy sizes on the CPU with the installed packages; CUDA-only steps are skipped"
    export CUDA_VISIBLE_DEVICES=""  # the CPU path even on a machine with a GPU
    BUDGET="${GPU_CHECK_BUDGET:-120}"
    TEST_LIMIT=60
elif [[ -d "$WHEELS" ]]; then
    log "installing the wheels of $WHEELS into $WORK/site"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        log "pip install from $WHEELS failed (see $LOG)"; exit 1
    fi
    export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH#"$REPO"}"
    if [[ -d "$WHEELS/cache" ]]; then  # a writable copy: the assets' lock files are made next to them
        cp -r "$WHEELS/cache" "$WORK/cache" && export FACTORLLM_DS_CACHE="$WORK/cache"
    fi
else
    log "no wheel folder $WHEELS (bench/prepare_gpu_wheels.sh makes it): using the installed packages"
fi

"$PYTHON" - >"$OUT_DIR/env.json" 2>>"$LOG" <<'EOF'
import json, os, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(), "host": platform.node()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")
for name in ("deepspeed", "transformers", "safetensors", "tokenizers"):
    try:
        info[name] = __import__(name).__version__
    except Exception as err:  # recorded: the steps that need it will say more
        info[name] = f"not importable: {err}"
print(json.dumps(info))
EOF
log "environment: $(cat "$OUT_DIR/env.json")"

log "GPU tests: python -m pytest -m gpu tests/test_gpu.py (limit ${TEST_LIMIT} s)"
timeout -k 10 "$TEST_LIMIT" "$PYTHON" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v -rA --timeout=150 \
    >"$OUT_DIR/pytest.log" 2>&1
TESTS=$?
log "GPU tests: exit $TESTS ($(grep -E '(passed|failed|skipped|error)' "$OUT_DIR/pytest.log" | tail -1))"

LEFT=$(( BUDGET - (SECONDS - START) ))
DRY_FLAG=()
[[ "$DRY" == 1 ]] && DRY_FLAG=(--dry-run)
"$PYTHON" bench/gpu_check.py --out "$OUT_DIR" --work "$WORK/steps" --budget "$(( LEFT > 30 ? LEFT : 30 ))" \
    ${DRY_FLAG[@]+"${DRY_FLAG[@]}"}
STEPS=$?
log "done in $(( SECONDS - START )) s: tests exit $TESTS, measurements exit $STEPS; figures in $OUT_DIR"
[[ "$TESTS" == 0 && "$STEPS" == 0 ]]
