# Sourced by scripts/run.sh and scripts/test.sh: finds ComfyUI and prepares a cached virtual environment.
# Exports COMFYUI_PATH and PY (the environment's python). Exits with instructions when something is missing.
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

is_comfyui() { [ -f "$1/main.py" ] && [ -d "$1/comfy" ] && [ -f "$1/folder_paths.py" ]; }

# Which ComfyUI: $COMFYUI_PATH, else the one this pack is installed in (<ComfyUI>/custom_nodes/<pack>).
if [ -z "${COMFYUI_PATH:-}" ]; then
  enclosing="$(cd "$PACK_DIR/../.." && pwd)"
  if [ "$(basename "$(dirname "$PACK_DIR")")" = "custom_nodes" ] && is_comfyui "$enclosing"; then
    COMFYUI_PATH="$enclosing"
  fi
fi

if [ -z "${COMFYUI_PATH:-}" ] || ! is_comfyui "$COMFYUI_PATH"; then
  cat >&2 <<MSG
dev2pro-lora: ComfyUI was not found.
  Looked in: \$COMFYUI_PATH (${COMFYUI_PATH:-unset}) and the folder this pack is installed in ($PACK_DIR/../..)
  Fix one of:
    - install the pack as documented: git clone it into <ComfyUI>/custom_nodes/ and run the scripts from there
    - export COMFYUI_PATH=/path/to/your/ComfyUI   (a checkout containing main.py and comfy/)
    - bash .ci/run   (unpacks the ComfyUI sources in ../shared/comfyui/ and tests each of them)
  The tests run real ComfyUI; they never skip it.
MSG
  exit 1
fi
COMFYUI_PATH="$(cd "$COMFYUI_PATH" && pwd)"
export COMFYUI_PATH

# torch from the registry: the CUDA build runs on the CPU too, and the registry's torchvision needs it.
# torchaudio: ComfyUI 0.33 imports it at start; the newest release (2.11.1) imports fine beside torch 2.14.1
# but pins an older torch, hence --no-deps.
TORCH_SPEC="${DEV2PRO_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
TORCHAUDIO_SPEC="${DEV2PRO_TORCHAUDIO_SPEC:-torchaudio==2.11.1}"
PYTHON_BIN="${DEV2PRO_PYTHON:-python3}"
spec_hash="$( (echo "$TORCH_SPEC $TORCHAUDIO_SPEC"; cat "$COMFYUI_PATH/requirements.txt" "$PACK_DIR/requirements.txt" "$PACK_DIR/scripts/test-requirements.txt"; "$PYTHON_BIN" --version) | sha256sum | cut -c1-12)"
VENV="${DEV2PRO_VENV:-$HOME/.cache/dev2pro-lora/venv-$spec_hash}"
PY="$VENV/bin/python"
export PY

if [ ! -f "$VENV/.complete" ]; then
  echo "dev2pro-lora: building the virtual environment $VENV for $COMFYUI_PATH (one time, a few minutes)" >&2
  rm -rf "$VENV"
  "$PYTHON_BIN" -m venv "$VENV"
  comfy_reqs="$VENV/comfyui-requirements.txt"
  grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$COMFYUI_PATH/requirements.txt" > "$comfy_reqs"
  if ! { "$PY" -m pip install --disable-pip-version-check $TORCH_SPEC -r "$comfy_reqs" \
           -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/scripts/test-requirements.txt" \
      && "$PY" -m pip install --disable-pip-version-check --no-deps $TORCHAUDIO_SPEC; } > "$VENV/pip.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/pip.log" | tail -20 >&2
    echo "dev2pro-lora: installing the environment failed (full log: $VENV/pip.log)" >&2
    exit 1
  fi
  touch "$VENV/.complete"
fi
