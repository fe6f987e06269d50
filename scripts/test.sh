#!/usr/bin/env bash
# The test command: the whole suite against real ComfyUI on the CPU (a few minutes on two cores).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PACK_DIR"
exec "$PY" -m pytest -q -p no:cacheprovider --durations=12 tests "$@"
