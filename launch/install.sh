#!/usr/bin/env bash
# Create .venv (if missing) with the CPU build of torch and factorllm-ds + test extras.
# Idempotent: a second run only checks. On a GPU node, install torch for your CUDA first
# and set FACTORLLM_DS_TORCH to that version (or "skip").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FACTORLLM_DS_VENV:-$ROOT/.venv}"
TORCH="${FACTORLLM_DS_TORCH:-2.13.0}"

if ! command -v mpirun >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing OpenMPI (for mpirun / mpi4py)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
fi
if ! command -v g++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing g++ (pip builds llama-cpp-python, the GGUF runtime, from source)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [ ! -f "$VENV/.factorllm_ds_installed" ] || [ "$ROOT/pyproject.toml" -nt "$VENV/.factorllm_ds_installed" ]; then
    "${PIP[@]}" install --upgrade pip
    # torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
    if [ "$TORCH" != skip ]; then "${PIP[@]}" install "torch==$TORCH"; fi
    "${PIP[@]}" install -e "$ROOT[test]"
    touch "$VENV/.factorllm_ds_installed"
fi
echo "$VENV"
