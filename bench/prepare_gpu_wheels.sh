#!/usr/bin/env bash
# Prepare the folder bench/gpu_check.sh installs from on a GPU machine that has PyTorch but no network (issue 26).
# Run it here, where the project's venv is installed and the package registry is reachable:
#
#   bash bench/prepare_gpu_wheels.sh [DIR]     # default DIR: .gpu_wheels in the checkout (git ignores it)
#
# It fetches, at the versions this venv runs, what such a machine lacks: DeepSpeed (PyPI has only its source:
# built here into a pure-Python wheel, no compiled ops) and its pure-Python needs hjson, pydantic (+ its one
# compiled part, pydantic-core, for the GPU machine's Python and x86-64), annotated-types, typing-inspection and
# typing-extensions; it copies the tokenizer and the text the tests and the check use (DIR/cache, the layout of
# $FACTORLLM_DS_CACHE). It stops with an error if DIR would exceed 64 MiB, what travels to the GPU machine with
# the checkout. GPU_PYTHON_VERSION (default 3.12: the GPU image's python3) picks the Python the wheels are for.
# Then: carry DIR with the checkout to the GPU machine and run `bash bench/gpu_check.sh` there (docs/cluster.md).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/.gpu_wheels}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
PYVER="${GPU_PYTHON_VERSION:-3.12}"
LIMIT_MIB=64
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
[[ -x "$PY" ]] || { echo "prepare_gpu_wheels.sh: no Python at $PY (install the venv: bash launch/install.sh, or set PYTHON)" >&2; exit 2; }
if [[ -e "$DIR" && ! -f "$DIR/.prepare_gpu_wheels" ]]; then
    echo "prepare_gpu_wheels.sh: $DIR exists and was not made by this script; pass another DIR" >&2; exit 2
fi
rm -rf "$DIR.tmp"
trap 'rm -rf "$DIR.tmp"' EXIT  # a folder is complete or absent: DIR appears by the rename at the end
mkdir -p "$DIR.tmp/cache"
touch "$DIR.tmp/.prepare_gpu_wheels"

# DeepSpeed: the sdist built into a wheel with this venv's torch (no ops compiled: they are built on first use).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR.tmp" "deepspeed==$(version deepspeed)"
PLATFORM_FLAGS=()
for p in "${PLATFORMS[@]}"; do PLATFORM_FLAGS+=(--platform "$p"); done
for name in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${PLATFORM_FLAGS[@]}" -d "$DIR.tmp" "$name==$(version "$name")"
done

# The assets the tests and the check read (fetched once into this machine's cache if they are not there yet).
for asset in tokenizer botchan; do
    path="$("$PY" -m factorllm_ds.assets "$asset" | cut -f2)"
    cp -r "$path" "$DIR.tmp/cache/"
done

size=$(du -sb "$DIR.tmp" | cut -f1)
# the files the device tool sends: tracked and untracked-not-ignored (du per batch of xargs: sum the totals)
tree=$(cd "$REPO" && git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null |
       awk '$2 == "total" {sum += $1} END {print sum + 0}') || true
echo "wheels and assets: $(( size / 1024 )) KiB; the checkout that travels with them: $(( tree / 1024 )) KiB"
if (( size + tree > LIMIT_MIB * 1024 * 1024 )); then
    echo "prepare_gpu_wheels.sh: together over the $LIMIT_MIB MiB that travel to the GPU machine" >&2
    exit 1
fi
rm -rf "$DIR"
mv "$DIR.tmp" "$DIR"
ls -l "$DIR"
echo "ready: carry $DIR with the checkout and run bash bench/gpu_check.sh on the GPU machine"
