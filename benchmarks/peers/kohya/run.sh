#!/usr/bin/env bash
# kohya-ss/sd-scripts flux_train_network.py on random weights (make_files.py), timed by benchmarks/peers/sitecustomize.py.
# On the lent GPU machine, from the checkout's root:
#   bash benchmarks/peers/kohya/run.sh --stage                          carry .device/peers/kohya: install, unpack
#   bash benchmarks/peers/kohya/run.sh --resolutions "512 1024" [--steps 13]   one JSON row per resolution on stdout
# Rehearsal here: PY=<venv python> SRC=<sd-scripts tree> FILES=<folder> MAKE_ARGS="--double 1 --single 1 --size 256"
# Here, once: bash benchmarks/peers/kohya/run.sh --pack <sd-scripts git dir from fetch>   builds .device/peers/kohya
# (20 MB): sd-scripts at COMMIT without docs, and cp312 wheels of its pins that the GPU image lacks or has newer
# (diffusers 0.32.1 fails to import beside the image's transformers 5.17).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
peers=$(dirname "$here")
PY=${PY:-python3}
SITE=${SITE:-/tmp/kohya-site} SRC=${SRC:-/tmp/kohya-src} FILES=${FILES:-/tmp/kohya-files} WORK=${WORK:-/tmp/kohya-work}
COMMIT=48d368fa557731ad0488c07304dfeba8c07910eb
stage=0 resolutions="512 1024" steps=13
WHEELS="accelerate==1.6.0 transformers==4.54.1 diffusers==0.32.1 huggingface-hub==0.34.3 tokenizers==0.21.4 toml==0.10.2
        voluptuous==0.15.2 imagesize==1.4.1 importlib-metadata==10.2.0"
while [ $# -gt 0 ]; do
  case "$1" in
    --pack)
      mkdir -p .device/peers/kohya/wheels "$WORK/pack"
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device/peers/kohya/wheels $WHEELS
      rm -rf "$WORK/pack/src" && ../shared/tools/extract-snapshot "$2" "$WORK/pack/src" "$COMMIT" >/dev/null
      tar -C "$WORK/pack/src" -cJf .device/peers/kohya/sd-scripts.tar.xz --exclude=./docs --exclude=./images \
        --exclude=./tests --exclude=./bitsandbytes_windows --exclude='*.md' .
      du -sh .device/peers/kohya; exit 0 ;;
    --stage) stage=1 ;;
    --resolutions) resolutions=$2; shift ;;
    --steps) steps=$2; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -d .device/peers/kohya ]; then
  if ls .device/peers/kohya/wheels/*.whl >/dev/null 2>&1 && [ ! -f "$SITE/.done" ]; then
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .device/peers/kohya/wheels/*.whl >&2 && touch "$SITE/.done"
  fi
  if [ ! -f "$SRC/flux_train_network.py" ] && [ -f .device/peers/kohya/sd-scripts.tar.xz ]; then
    mkdir -p "$SRC" && tar -C "$SRC" -xJf .device/peers/kohya/sd-scripts.tar.xz
  fi
fi
[ "$stage" = 1 ] && { echo "kohya: staged ($(ls "$SITE" 2>/dev/null | grep -c dist-info) wheels, source: $(test -f "$SRC/flux_train_network.py" && echo yes || echo no))" >&2; exit 0; }
[ -f "$SRC/flux_train_network.py" ] || { echo "kohya: no sd-scripts in $SRC (carry .device/peers/kohya)" >&2; exit 1; }
export PYTHONPATH="$SITE:$peers${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ ! -f "$FILES/t5xxl_bf16.safetensors" ]; then
  start=$(date +%s)
  (cd "$SRC" && "$PY" "$here/make_files.py" "$FILES" ${MAKE_ARGS:-}) >&2
  echo "kohya: random files in $(( $(date +%s) - start )) s" >&2
fi

versions=$("$PY" -c 'import accelerate, diffusers, transformers, torch, json; print(json.dumps({"torch": torch.__version__, "accelerate": accelerate.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__}))')
for res in $resolutions; do
  work="$WORK/$res"; rm -rf "$work"; mkdir -p "$work/out"
  cp -r "$FILES/data" "$work/data"
  cat > "$work/dataset.toml" <<TOML
[general]
caption_extension = ".txt"
[[datasets]]
resolution = $res
batch_size = 1
enable_bucket = false
  [[datasets.subsets]]
  image_dir = "$work/data"
  num_repeats = 50
TOML
  # The documented Flux LoRA recipe (docs/flux_train_network.md) at our benchmark's shape: rank 16, alpha 16, torch
  # AdamW, bf16 with an fp8 e4m3fn base, checkpointing, guidance 1.0, latents and text-encoder outputs cached.
  flags=(--pretrained_model_name_or_path "$FILES/flux1-dev-fp8.safetensors" --clip_l "$FILES/clip_l.safetensors"
         --t5xxl "$FILES/t5xxl_bf16.safetensors" --ae "$FILES/ae.safetensors"
         --tokenizer_cache_dir "$FILES/tokenizers" --dataset_config "$work/dataset.toml"
         --output_dir "$work/out" --output_name lora --save_model_as safetensors
         --network_module networks.lora_flux --network_dim 16 --network_alpha 16 --network_train_unet_only
         --optimizer_type AdamW --learning_rate 1e-4 --lr_scheduler constant --max_train_steps "$steps"
         --mixed_precision bf16 --fp8_base_unet --sdpa --gradient_checkpointing --seed 0
         --guidance_scale 1.0 --timestep_sampling flux_shift --model_prediction_type raw
         --cache_latents --cache_latents_to_disk --cache_text_encoder_outputs --cache_text_encoder_outputs_to_disk
         --max_data_loader_n_workers 2 --persistent_data_loader_workers)
  start=$(date +%s%N)
  rc=0
  (cd "$SRC" && PEER_STEP_LOG="$work/steps.jsonl" "$PY" flux_train_network.py "${flags[@]}") > "$work/log.txt" 2>&1 || rc=$?
  wall=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  [ -n "${OUT:-}" ] && cp "$work/log.txt" "$OUT/kohya_${res}_log.txt" 2>/dev/null || true
  [ "$rc" = 0 ] || { echo "kohya: $res failed (rc $rc); last lines:" >&2; tail -30 "$work/log.txt" >&2; continue; }
  [ -f "$work/steps.jsonl" ] || touch "$work/steps.jsonl"
  settings=$("$PY" -c 'import json, sys; print(json.dumps({"commit": sys.argv[1], "flags": sys.argv[3:], **json.loads(sys.argv[2])}))' "$COMMIT" "$versions" "${flags[@]}")
  "$PY" "$peers/summarize.py" "$work/steps.jsonl" --trainer "kohya-ss/sd-scripts flux_train_network.py" \
    --resolution "$res" --settings "$settings" --wall "$wall"
done
