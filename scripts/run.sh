#!/usr/bin/env bash
# The main job: sets everything up, then runs the shipped workflow through a real ComfyUI server.
# With the real model files in $COMFYUI_PATH/models it trains for real; otherwise it runs the CPU demo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" "$PACK_DIR/scripts/demo.py" "$@"
