#!/usr/bin/env bash
# Install if needed, then run the test suite on CPU (2-process DeepSpeed tests included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/launch/install.sh" | tail -n 1)"
cd "$ROOT"
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
