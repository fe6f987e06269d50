#!/usr/bin/env bash
# SimpleTuner 4.10.1 Flux.1-dev LoRA step-time benchmark driver (random weights, offline).
#
#   bash benchmarks/peers/simpletuner/run.sh --stage DIR [DIR...]      install the wheels in DIR/*.whl into $ST_SITE
#   bash benchmarks/peers/simpletuner/run.sh --generate                 only write the random model (+ dataset)
#   bash benchmarks/peers/simpletuner/run.sh --resolutions "512 1024"   generate if missing, then train each
#   options: --tiny (tiny config, CPU rehearsal), --steps N (optimizer steps, default 13 = 3 warm-up + 10 timed, as
#            ../summarize.py counts them), --precision P (base_model_precision, default fp8-torchao; falls back automatically
#            to fp8-native, then no_change, when a run dies before logging a step)
# Writes under $OUT (default $ST_WORK/out): train_<res>.log, steps_<res>.jsonl, settings_<res>.json,
# result_<res>.json; prints one JSON line per resolution on stdout.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
ST_SITE="${ST_SITE:-/tmp/st-site}"  # not ai-toolkit's /tmp/peer-site: its diffusers, pydantic and torchao pins clash
ST_WORK="${ST_WORK:-/tmp/peers/simpletuner/gpu}"
OUT="${OUT:-$ST_WORK/out}"
STAGE=()
RESOLUTIONS=""
TINY=0
GENERATE_ONLY=0
STEPS="${ST_STEPS:-13}"
PRECISION="${ST_PRECISION:-fp8-torchao}"
T_START=$(date +%s)
DEADLINE="${ST_DEADLINE:-420}"   # seconds after start past which no fallback retry is started

while [ $# -gt 0 ]; do
  case "$1" in
    --stage) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do STAGE+=("$1"); shift; done ;;
    --resolutions) RESOLUTIONS="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --generate) GENERATE_ONLY=1; shift ;;
    --steps) STEPS="$2"; shift 2 ;;
    --precision) PRECISION="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$OUT" "$ST_WORK" && OUT="$(cd "$OUT" && pwd)" && ST_WORK="$(cd "$ST_WORK" && pwd)"

if [ ${#STAGE[@]} -gt 0 ]; then
  mkdir -p "$ST_SITE"
  for d in "${STAGE[@]}"; do
    echo "[run.sh] installing $(ls "$d"/*.whl | wc -l) wheels from $d into $ST_SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$ST_SITE" "$d"/*.whl \
      || { echo "[run.sh] pip install of $d failed" >&2; exit 1; }
    if [ -d "$d/optional" ]; then
      # wheels of packages the GPU image already has; installed only where its version is missing or too old
      OPT=$("$PY" - "$d/optional" <<'EOF'
import glob, os, sys
from importlib.metadata import version, PackageNotFoundError
from packaging.version import Version
need = {"typing_extensions": "4.16.0", "peft": "0.18.0", "anyio": "4.1.0", "annotated_doc": "0.0.2"}
for whl in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    name = os.path.basename(whl).split("-")[0]
    try:
        have = version(name.replace("_", "-"))
    except PackageNotFoundError:
        have = None
    if have is None or Version(have) < Version(need.get(name, "0")):
        print(whl)
        print(f"[run.sh] {name}: have {have}, need >= {need.get(name)}: installing carried wheel", file=sys.stderr)
    else:
        print(f"[run.sh] {name}: have {have} (>= {need.get(name)}), carried wheel not needed", file=sys.stderr)
EOF
)
      if [ -n "$OPT" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$ST_SITE" $OPT \
          || { echo "[run.sh] pip install of optional wheels failed" >&2; exit 1; }
      fi
    fi
  done
  du -sh "$ST_SITE"
fi

# a fresh machine without the staged site: stage from the default wheel folder when it travelled along
DEFAULT_WHEELS="$(cd "$HERE/../../.." && pwd)/.device/peers/simpletuner/wheels/all"
if [ ${#STAGE[@]} -eq 0 ] && [ -n "$RESOLUTIONS$([ $GENERATE_ONLY = 1 ] && echo g)" ] && [ ! -d "$ST_SITE/simpletuner" ] \
   && [ -d "$DEFAULT_WHEELS" ] && ! "$PY" -c "import simpletuner" 2>/dev/null; then
  echo "[run.sh] $ST_SITE has no simpletuner: staging $DEFAULT_WHEELS first" >&2
  bash "$HERE/run.sh" --stage "$DEFAULT_WHEELS" || exit 1
fi

export PYTHONPATH="$PEERS:$ST_SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIFFUSERS_OFFLINE=1
export HF_HOME="$ST_WORK/hf_home" WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export SIMPLETUNER_CONFIG_BACKEND=cmd SIMPLETUNER_LOG_LEVEL="${SIMPLETUNER_LOG_LEVEL:-INFO}"

if [ $TINY = 1 ]; then MODEL="$ST_WORK/model-tiny"; else MODEL="$ST_WORK/model"; fi
DATA="$ST_WORK/data"

need_generate() { [ ! -f "$MODEL/.complete" ] || [ ! -f "$DATA/image_0000.png" ]; }
if { [ $GENERATE_ONLY = 1 ] || [ -n "$RESOLUTIONS" ]; } && need_generate; then
  rm -rf "$MODEL"
  T0=$(date +%s)
  TINYFLAG=""; [ $TINY = 1 ] && TINYFLAG="--tiny"
  "$PY" "$HERE/make_random_model.py" --out "$MODEL" --dataset "$DATA" $TINYFLAG 2>&1 | tee "$OUT/generate.log" \
    | grep -E "make_random_model|Error|error" || true
  [ -f "$MODEL/.complete" ] || { echo "[run.sh] model generation failed; see $OUT/generate.log" >&2; tail -30 "$OUT/generate.log" >&2; exit 1; }
  echo "[run.sh] generated model in $(( $(date +%s) - T0 ))s: $(du -sh "$MODEL" | cut -f1)"
fi
[ $GENERATE_ONLY = 1 ] && exit 0

train_one() {  # $1 resolution, $2 precision -> rc
  local RES="$1" PREC="$2"
  local RUN="$ST_WORK/run_$RES"
  rm -rf "$RUN"; mkdir -p "$RUN"
  cat > "$RUN/backend.json" <<EOF
[
  {"id": "bench-$RES", "type": "local", "instance_data_dir": "$DATA", "caption_strategy": "textfile",
   "resolution": $RES, "resolution_type": "pixel", "minimum_image_size": $RES, "maximum_image_size": $RES,
   "target_downsample_size": $RES, "crop": false, "repeats": 100, "metadata_backend": "discovery",
   "cache_dir_vae": "$RUN/cache/vae", "disable_validation": true},
  {"id": "text-embeds", "dataset_type": "text_embeds", "default": true, "type": "local",
   "cache_dir": "$RUN/cache/text"}
]
EOF
  local ARGS=(
    --model_family=flux --model_flavour=dev --model_type=lora --lora_type=standard
    --pretrained_model_name_or_path="$MODEL"
    --lora_rank=16 --lora_alpha=16 --lora_dropout=0.0 --flux_lora_target=all
    --train_batch_size=1 --gradient_accumulation_steps=1 --max_train_steps="$STEPS" --num_train_epochs=0
    --learning_rate=1e-4 --lr_scheduler=constant --lr_warmup_steps=0 --optimizer=torch-adamw
    --gradient_checkpointing=true --mixed_precision="$MIXED" --base_model_precision="$PREC" --quantize_via=accelerator
    --flux_guidance_mode=constant --flux_guidance_value=1.0
    --resolution="$RES" --resolution_type=pixel --data_backend_config="$RUN/backend.json"
    --caption_dropout_probability=0.0
    --validation_disable=true --disable_benchmark=true --eval_loss_disable=true --validation_steps=100000
    --checkpoint_step_interval=100000 --checkpoints_total_limit=1
    --report_to=none --seed=42 --attention_mechanism=diffusers
    --output_dir="$RUN/output" --logging_dir="$RUN/logs" --cache_dir="$RUN/cache"
    --vae_batch_size=1 --text_encoder_batch_size=1 --aspect_bucket_worker_count=1
    --i_know_what_i_am_doing=true --webhook_config=""
    ${ST_EXTRA_ARGS:-}
  )
  "$PY" - "$OUT/settings_$RES.json" "$PREC" "$STEPS" "$RES" "$MIXED" "$TINY" <<'EOF'
import json, sys
path, prec, steps, res, mixed, tiny = sys.argv[1:]
json.dump({
    "model": "Flux.1-dev random weights" + (" (TINY rehearsal config)" if tiny == "1" else
             " full size: 19 double + 38 single blocks, hidden 3072, 24 heads, T5-XXL (4096), CLIP-L (768), guidance_embeds"),
    "lora": "PEFT standard LoRA rank 16 alpha 16 dropout 0.0, transformer only, flux_lora_target=all "
            "(to_q,to_k,to_v,to_qkv,add_q_proj,add_k_proj,add_v_proj,add_qkv_proj,to_out.0,to_add_out)",
    "batch_size": 1, "resolution": int(res), "dataset": "1 random 1024x1024 PNG + caption txt, resolution_type=pixel, no crop",
    "optimizer": "torch-adamw (torch.optim.AdamW, betas 0.9/0.999, wd 1e-2, eps 1e-8)", "learning_rate": 1e-4,
    "lr_scheduler": "constant", "gradient_checkpointing": True, "mixed_precision": mixed,
    "base_model_precision": prec, "quantize_via": "accelerator",
    "flux_guidance": "constant 1.0", "attention": "diffusers (PyTorch SDPA)",
    "cache": "VAE latents + text embeds precomputed before training; text encoders/VAE unloaded",
    "validation": "disabled", "checkpoints": "none during the timed steps (interval 100000)", "report_to": "none",
    "max_grad_norm": "2.0 (SimpleTuner default, grad_clip_method=value)", "noise_offset": "0.1 p=0.25 (SimpleTuner default)",
    "optimizer_steps": int(steps), "timed": "step gaps after the 3 warm-up steps (sitecustomize.py)",
    "entry": "simpletuner.train as __main__ in one process (st_launch.py, no accelerate launch)",
}, open(path, "w"), indent=1)
EOF
  rm -f "$OUT/steps_$RES.jsonl"
  echo "[run.sh] training res=$RES precision=$PREC steps=$STEPS (log $OUT/train_$RES.log)" >&2
  local T0=$(date +%s)
  # run inside $RUN: SimpleTuner writes debug.log (and looks for config/) in the working directory
  ( cd "$RUN" && PEER_STEP_LOG="$OUT/steps_$RES.jsonl" PEER_WARMUP=3 "$PY" "$HERE/st_launch.py" "${ARGS[@]}" ) \
    > "$OUT/train_$RES.log" 2>&1
  local rc=$?
  cp "$OUT/train_$RES.log" "$OUT/train_${RES}_${PREC}.log"
  echo "[run.sh] res=$RES precision=$PREC rc=$rc wall=$(( $(date +%s) - T0 ))s" >&2
  return $rc
}

if [ $TINY = 1 ] || ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # CPU rehearsal: no fp8 (needs CUDA), no fallback chain, pin_memory made a no-op (see st_launch.py)
  MIXED="${ST_MIXED:-bf16}"; [ "$PRECISION" = "fp8-torchao" ] && [ -z "${ST_PRECISION:-}" ] && PRECISION=no_change
  export ST_REHEARSAL_CPU=1; NO_FALLBACK=1
else
  MIXED="${ST_MIXED:-bf16}"
fi

if [ -n "$RESOLUTIONS" ]; then
  "$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for n in ["torch", "triton", "transformers", "diffusers", "accelerate", "peft", "torchao", "huggingface_hub", "tokenizers",
          "safetensors", "simpletuner", "pydantic", "fastapi", "typing_extensions"]:
    try:
        m = importlib.import_module(n)
        print(n, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:
        print(n, "MISSING", type(e).__name__, e)
import torch
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), torch.version.cuda)
EOF
  grep -E "^(torch|peft|torchao|diffusers|simpletuner|gpu) " "$OUT/env.txt" | cut -c1-120 >&2
fi

FALLBACKS=("$PRECISION")
if [ -z "${NO_FALLBACK:-}" ] && [ -z "${ST_NO_FALLBACK:-}" ]; then
  for p in fp8-native no_change; do [ "$p" != "$PRECISION" ] && FALLBACKS+=("$p"); done
fi

for RES in $RESOLUTIONS; do
  STATUS=failed
  for PREC in "${FALLBACKS[@]}"; do
    if train_one "$RES" "$PREC"; then STATUS=ok; fi
    if [ -s "$OUT/steps_$RES.jsonl" ] || [ "$STATUS" = ok ]; then break; fi
    echo "[run.sh] res=$RES precision=$PREC died before logging a step; tail of its log:" >&2
    grep -v -E "Warning|warn\(" "$OUT/train_$RES.log" | tail -25 >&2
    if [ $(( $(date +%s) - T_START )) -gt "$DEADLINE" ]; then echo "[run.sh] past deadline, no fallback" >&2; break; fi
    [ ${#FALLBACKS[@]} -gt 1 ] && FALLBACKS=("${FALLBACKS[@]:1}")   # the next resolution starts from the next precision
  done
  "$PY" "$HERE/../summarize.py" "$OUT/steps_$RES.jsonl" --trainer "SimpleTuner 4.10.1" --resolution "$RES" \
    --settings "$OUT/settings_$RES.json" --extra "{\"status\": \"$STATUS\"}" | tee "$OUT/result_$RES.json"
done
echo "[run.sh] total wall $(( $(date +%s) - T_START ))s" >&2
