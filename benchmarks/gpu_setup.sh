# ComfyUI <version> for the GPU machine (no network there): installs the wheels this call carries under
# .device/whl-<version>/ into /tmp/site-<version> (skipping those an earlier call installed) and unpacks the trimmed
# ComfyUI (.device/comfyui-<version>.tar.xz, or the folder .device/comfyui-<version>/ComfyUI) to /tmp. 0.33's wheels
# exceed one call's 64 MiB, so calls made while the machine stays warm add up their parts in /tmp.
#   bash benchmarks/gpu_setup.sh 0.33.0 --stage    install what this call carries; check nothing
#   source benchmarks/gpu_setup.sh 0.33.0 || exit  the same, then fail loudly unless everything is there and imports;
#                                                  exports PYTHONPATH and COMFYUI_PATH
#   eval "$(bash benchmarks/gpu_setup.sh 0.33.0)"  the same, through the export lines it prints
_gpu_setup() {
  local version=$1 mode=${2:-} py=${PY:-python3} needed modules w name pending=() missing=()
  _GPU_SETUP_EXPORTS=
  case "$version" in  # the wheels it needs: benchmarks/gpu_wheels.txt
    0.33.0) modules="av sqlalchemy alembic.command pydantic_settings torchsde simpleeval blake3 comfy_aimdo.control comfy_kitchen comfyui_frontend_package" ;;
    0.3.64) modules="av sqlalchemy alembic.command pydantic_settings torchsde comfyui_frontend_package" ;;
    *) echo "gpu_setup: usage: gpu_setup.sh <0.33.0|0.3.64> [--stage]" >&2; return 2 ;;
  esac
  # dist-info names: name-version, the name's dashes as underscores
  needed=$(awk -v v="$version" '$1 == v { split($3, s, "=="); gsub("-", "_", s[1]); print s[1] "-" s[2] }' \
             benchmarks/gpu_wheels.txt)
  local site=/tmp/site-$version comfy=/tmp/comfyui-$version
  mkdir -p "$site"
  _gpu_installed() { ls "$site" | grep -qix "$1.dist-info"; }  # dist-info names: the wheel's name-version, any case
  for w in $(find ".device/whl-$version" -name '*.whl' 2>/dev/null | sort); do
    name=$(basename "$w" | cut -d- -f1-2)
    _gpu_installed "$name" || pending+=("$w")
  done
  if [ ${#pending[@]} -gt 0 ]; then
    echo "gpu_setup: installing ${#pending[@]} wheels into $site" >&2
    PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "${pending[@]}" >&2 || { echo "gpu_setup: pip install failed" >&2; return 1; }
  fi
  if [ ! -f "$comfy/ComfyUI/main.py" ]; then
    mkdir -p "$comfy"
    if [ -f ".device/comfyui-$version.tar.xz" ]; then
      tar -C "$comfy" -xJf ".device/comfyui-$version.tar.xz" 2>/dev/null ||
        "$py" -m tarfile -e ".device/comfyui-$version.tar.xz" "$comfy" || return 1
    elif [ -f ".device/comfyui-$version/ComfyUI/main.py" ]; then
      cp -a ".device/comfyui-$version/ComfyUI" "$comfy/"
    fi
  fi
  [ "$mode" = --stage ] && { echo "gpu_setup: staged; in $site: $(ls "$site" | grep -c 'dist-info$') wheels" >&2; return 0; }
  for name in $needed; do _gpu_installed "$name" || missing+=("$name"); done
  [ -f "$comfy/ComfyUI/main.py" ] || missing+=("ComfyUI $version (.device/comfyui-$version.tar.xz)")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_setup: MISSING on this machine (carry them, or the machine went cold): ${missing[*]}" >&2
    return 1
  fi
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" $modules ||
    { echo "gpu_setup: a carried package does not import" >&2; return 1; }
  _GPU_SETUP_EXPORTS="export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} COMFYUI_PATH=$comfy/ComfyUI"
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then  # sourced: export here
  _gpu_setup "$@" && { [ -z "$_GPU_SETUP_EXPORTS" ] || { eval "$_GPU_SETUP_EXPORTS"; echo "gpu_setup: $_GPU_SETUP_EXPORTS" >&2; }; }
else
  _gpu_setup "$@" || exit
  if [ -n "$_GPU_SETUP_EXPORTS" ]; then echo "$_GPU_SETUP_EXPORTS"; fi
fi
