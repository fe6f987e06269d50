# Sourced by scripts/run.sh and scripts/test.sh: finds ComfyUI and prepares a cached virtual environment.
# Exports COMFYUI_PATH and PY (the environment's python). Exits with instructions when something is missing.
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFYUI_VERSION="0.3.64"
COMFYUI_PATH="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
export COMFYUI_PATH

find_comfyui() {
  if [ -f "$COMFYUI_PATH/main.py" ] && [ -d "$COMFYUI_PATH/comfy" ]; then
    return 0
  fi
  if [ -n "${DEV2PRO_NO_CLONE:-}" ]; then
    return 1
  fi
  echo "dev2pro-lora: no ComfyUI at $COMFYUI_PATH; trying to clone ComfyUI v$COMFYUI_VERSION there" >&2
  mkdir -p "$(dirname "$COMFYUI_PATH")"
  GIT_TERMINAL_PROMPT=0 timeout 300 git clone --quiet --depth 1 --branch "v$COMFYUI_VERSION" https://github.com/comfyanonymous/ComfyUI.git "$COMFYUI_PATH" 2>/dev/null
}

if ! find_comfyui; then
  cat >&2 <<MSG
dev2pro-lora: ComfyUI was not found and could not be cloned.
  Looked in: \$COMFYUI_PATH (${COMFYUI_PATH})
  Fix one of:
    - export COMFYUI_PATH=/path/to/your/ComfyUI   (a checkout containing main.py and comfy/)
    - git clone --branch v$COMFYUI_VERSION https://github.com/comfyanonymous/ComfyUI.git ~/comfy/ComfyUI
    - comfy-cli:  pip install comfy-cli && comfy --workspace ~/comfy/ComfyUI install
  The tests run real ComfyUI; they never skip it.
MSG
  exit 1
fi

# torch from the registry: the CUDA build runs on the CPU too, and the registry's torchvision needs it.
TORCH_SPEC="${DEV2PRO_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
PYTHON_BIN="${DEV2PRO_PYTHON:-python3}"
spec_hash="$( (echo "$TORCH_SPEC"; cat "$COMFYUI_PATH/requirements.txt" "$PACK_DIR/requirements.txt" "$PACK_DIR/scripts/test-requirements.txt"; "$PYTHON_BIN" --version) | sha256sum | cut -c1-12)"
VENV="${DEV2PRO_VENV:-$HOME/.cache/dev2pro-lora/venv-$spec_hash}"
PY="$VENV/bin/python"
export PY

if [ ! -f "$VENV/.complete" ]; then
  echo "dev2pro-lora: building the virtual environment $VENV (one time, a few minutes)" >&2
  rm -rf "$VENV"
  "$PYTHON_BIN" -m venv "$VENV"
  comfy_reqs="$VENV/comfyui-requirements.txt"
  # torch, torchvision and torchaudio come from TORCH_SPEC; torchaudio is optional for ComfyUI.
  grep -v -E '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$COMFYUI_PATH/requirements.txt" > "$comfy_reqs"
  if ! "$PY" -m pip install --disable-pip-version-check $TORCH_SPEC -r "$comfy_reqs" \
      -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/scripts/test-requirements.txt" > "$VENV/pip.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/pip.log" | tail -20 >&2
    echo "dev2pro-lora: installing the environment failed (full log: $VENV/pip.log)" >&2
    exit 1
  fi
  touch "$VENV/.complete"
fi
