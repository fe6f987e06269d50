#!/usr/bin/env bash
# Builds the git-ignored .device/ folder that benchmarks/gpu_setup.sh installs from on the lent GPU machine (Python
# 3.12, no network): trimmed ComfyUI trees as .device/comfyui-<version>.tar.xz and, per version, the cp312 wheels of
# what its requirements.txt names that the GPU image lacks. 0.33's wheels exceed one call's 64 MiB, so they come in
# two parts: whl-0.33.0/a (carried by a first call) and whl-0.33.0/b (av and the front end, by the next).
#   bash benchmarks/gpu_carry.sh [ComfyUI sources folder, default ../shared/comfyui]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SOURCES="${1:-$(cd .. && pwd)/shared/comfyui}"
OUT=.device
mkdir -p "$OUT"

# comfy_kitchen is repacked below without its ROCm backend (59 MB).
download() {  # dir, specs...
  local dir=$1; shift
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 -d "$dir" "$@"
}

while read -r version part; do  # each folder's specs, from the one list gpu_setup.sh checks against
  dir="$OUT/whl-$version"; [ "$part" = . ] || dir="$dir/$part"
  download "$dir" $(awk -v v="$version" -v p="$part" '$1 == v && $2 == p { print $3 }' benchmarks/gpu_wheels.txt)
done < <(awk '!/^#/ && NF == 3 { print $1, $2 }' benchmarks/gpu_wheels.txt | sort -u)

for kitchen in "$OUT"/whl-0.33.0/a/comfy_kitchen-*.whl; do
  [[ "$kitchen" == *nohip* ]] && continue
  python3 - "$kitchen" <<'PY'
import os, sys, zipfile
src = sys.argv[1]
dst = src + ".nohip"
drop = "comfy_kitchen/backends/hip/"  # ROCm only: imported only under a HIP build of torch
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for info in zin.infolist():
        if info.filename.startswith(drop):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(True) if not l.startswith(drop.encode()))
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
os.replace(dst, src)
PY
done

# ComfyUI trees without what neither an in-process benchmark nor main.py reads.
for tarball in "$SOURCES"/comfyui-*.tar.gz; do
  version="$(basename "$tarball" .tar.gz)"; version="${version#comfyui-}"
  work="$(mktemp -d)"
  tar -xzf "$tarball" -C "$work"
  (cd "$work/ComfyUI" && rm -rf tests tests-unit .git .github .ci script_examples blueprints openapi.yaml &&
     find . -name '*.md' -delete)
  # 0.33 finds its API nodes by glob; 0.3.64 imports a fixed list of them, so it keeps them
  [ "$version" = 0.3.64 ] || rm -rf "$work/ComfyUI/comfy_api_nodes"
  tar -C "$work" -cJf "$OUT/comfyui-$version.tar.xz" ComfyUI
  rm -rf "$work"
done
du -sh "$OUT"/comfyui-*.tar.xz "$OUT"/whl-*/* 2>/dev/null | sort -k2
