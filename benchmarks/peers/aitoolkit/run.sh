#!/usr/bin/env bash
# ai-toolkit (ostris) Flux.1-dev LoRA step time on random weights, offline. Run from the repo root of the checkout.
#
#   benchmarks/peers/aitoolkit/run.sh --stage [PART_DIR ...]
#       install carried wheels (default: every .device/peers/aitoolkit/wheels/part*/ present) into $PEER_SITE and
#       unpack the ai-toolkit tarball found there into $PEER_WORK/aitk.
#   benchmarks/peers/aitoolkit/run.sh --resolutions "512 1024" [--steps 13] [--tiny] [--no-quantize] [--device cuda:0]
#       stage first if not yet staged (so one call can carry part1 and do everything), generate the random model
#       (reused when $PEER_WORK/model[-tiny]/DONE exists, i.e. on a still-warm machine), then one ai-toolkit process
#       (`python run.py config.yaml`) per resolution; prints one JSON line per resolution (../summarize.py).
#
# Env: OUT (results; default $PEER_WORK/out), PEER_CARRY (folder of part*/, default .device/peers/aitoolkit/wheels), PEER_SITE (default /tmp/peer-site), PEER_WORK (default /tmp/peer-aitk),
#      PEER_PYTHON (default python3), PEER_TIME_BUDGET (seconds for the whole call, default 570: a resolution is
#      skipped, with a JSON line saying so, when too little is left to finish it).
set -uo pipefail
T_START=$(date +%s)
REPO=$(pwd)
HERE="$REPO/benchmarks/peers/aitoolkit"
CARRY=${PEER_CARRY:-$REPO/.device/peers/aitoolkit/wheels}
SITE=${PEER_SITE:-/tmp/peer-site}
WORK=${PEER_WORK:-/tmp/peer-aitk}
PY=${PEER_PYTHON:-python3}
OUT=${OUT:-$WORK/out}
BUDGET=${PEER_TIME_BUDGET:-570}
COMMIT=27a03a91f23eb1b757d5ec2e80ee3e129cfcc350
mkdir -p "$WORK" "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIFFUSERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export DISABLE_TELEMETRY=YES WANDB_MODE=disabled NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log() { echo "[aitk-run +$(( $(date +%s) - T_START ))s] $*" >&2; }

stage() {
  local parts=("$@")
  if [ ${#parts[@]} -eq 0 ]; then parts=("$CARRY"/part*); fi
  for p in "${parts[@]}"; do
    [ -d "$p" ] || { log "no carried part at $p"; continue; }
    if ls "$p"/*.whl >/dev/null 2>&1; then
      log "installing $(ls "$p"/*.whl | wc -l) wheels from $p into $SITE"
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$p"/*.whl \
        || { log "pip install of $p failed"; return 1; }
    fi
    for t in "$p"/ai-toolkit-*.tar.gz; do
      [ -f "$t" ] || continue
      rm -rf "$WORK/aitk" && tar -xzf "$t" -C "$WORK" && log "unpacked $(basename "$t") into $WORK/aitk"
    done
  done
  preflight "${parts[@]}" || return 1
  touch "$SITE/.aitk-staged"
}

# Import the carried stack once (seconds, not minutes): a missing or clashing package fails here, not after model
# generation. part*/fallback/*.whl (typing-extensions 4.16.0, which pydantic 2.11 needs >= 4.12.2) is installed
# only if the image's own versions fail.
PREFLIGHT='import diffusers, transformers, optimum.quanto, torchao, lycoris, albumentations, open_clip, lpips, oyaml, dotenv, pydantic, av
print("preflight ok: diffusers", diffusers.__version__, "transformers", transformers.__version__, "torch", __import__("torch").__version__)'
preflight() {
  if PYTHONPATH="$SITE:$HERE/stubs" $PY -c "$PREFLIGHT" >&2; then return 0; fi
  for p in "$@"; do
    if ls "$p"/fallback/*.whl >/dev/null 2>&1; then
      log "preflight failed; installing fallback wheels from $p/fallback"
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$p"/fallback/*.whl
    fi
  done
  PYTHONPATH="$SITE:$HERE/stubs" $PY -c "$PREFLIGHT" >&2 || { log "preflight import of the carried stack failed"; return 1; }
}

MODE=""; RESOLUTIONS="512 1024"; STEPS=13; TINY=""; NOQ=""; DEVICE="cuda:0"; STAGE_PARTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) MODE=stage; shift; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do STAGE_PARTS+=("$1"); shift; done ;;
    --resolutions) MODE=run; RESOLUTIONS="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --no-quantize) NOQ=1; shift ;;
    --device) DEVICE="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ "$MODE" = stage ]; then stage "${STAGE_PARTS[@]}"; exit $?; fi
[ "$MODE" = run ] || { echo "usage: $0 --stage [PART...] | --resolutions \"512 1024\" [...]" >&2; exit 2; }

if [ ! -f "$SITE/.aitk-staged" ] || [ ! -f "$WORK/aitk/run.py" ]; then stage || exit 1; fi
[ -f "$WORK/aitk/run.py" ] || { log "ai-toolkit code missing at $WORK/aitk (carry .device/peers/aitoolkit/wheels/part1)"; exit 1; }

# PYTHONPATH: carried packages, the av stub, and benchmarks/peers (its sitecustomize.py is the step clock).
# PEER_PYTHONPATH_PREFIX (rehearsal only): a CPU stand-in for the step clock, which records CUDA events only.
export PYTHONPATH="${PEER_PYTHONPATH_PREFIX:+$PEER_PYTHONPATH_PREFIX:}$SITE:$HERE/stubs:$REPO/benchmarks/peers${PYTHONPATH:+:$PYTHONPATH}"
export PEER_WARMUP=3

MODEL="$WORK/model${TINY:+-tiny}"
GEN_ARGS=(); [ -n "$TINY" ] && GEN_ARGS+=(--tiny)
[[ "$DEVICE" == cpu ]] && GEN_ARGS+=(--device cpu)
log "generating random Flux-dev into $MODEL"
T0=$(date +%s)
$PY "$HERE/make_random_model.py" "$MODEL" "${GEN_ARGS[@]}" 2>&1 | grep -v "Writing model shards" | tee "$OUT/make_model.log" >&2
[ -f "$MODEL/DONE" ] || { log "model generation failed"; exit 1; }
GEN_S=$(( $(date +%s) - T0 ))
log "model ready in ${GEN_S}s ($(du -sh "$MODEL" | cut -f1))"
df -h "$WORK" >&2 || true

RC=0; PREV_RUN_S=0; TINYJ=false; [ -n "$TINY" ] && TINYJ=true
for RES in $RESOLUTIONS; do
  ELAPSED=$(( $(date +%s) - T_START ))
  LEFT=$(( BUDGET - ELAPSED ))
  NEED=$(( PREV_RUN_S > 0 ? PREV_RUN_S + 30 : 120 ))
  if [ $LEFT -lt $NEED ]; then
    log "skipping $RES: ${LEFT}s left of the ${BUDGET}s budget, need ~${NEED}s"
    echo "{\"trainer\":\"ai-toolkit $COMMIT\",\"resolution\":$RES,\"skipped\":\"time budget: ${LEFT}s left\"}"
    RC=1; continue
  fi
  rm -rf "$WORK/runs/res$RES"
  PREP=(--model "$MODEL" --work "$WORK/runs" --resolution "$RES" --steps "$STEPS" --device "$DEVICE")
  [ -n "$NOQ" ] && PREP+=(--no-quantize)
  CFG=$($PY "$HERE/prepare_run.py" "${PREP[@]}") || { log "prepare_run failed"; RC=1; continue; }
  cp "$CFG" "$OUT/config_res$RES.yaml"
  STEPLOG="$OUT/steps_res$RES.jsonl"; rm -f "$STEPLOG"
  log "training res $RES ($STEPS steps), log $OUT/train_res$RES.log, at most $(( LEFT - 10 ))s"
  T0=$(date +%s)
  ( cd "$WORK/aitk" && PEER_STEP_LOG="$STEPLOG" timeout --kill-after=10 $(( LEFT - 10 )) $PY run.py "$CFG" ) \
    > "$OUT/train_res$RES.log" 2>&1
  TRC=$?
  PREV_RUN_S=$(( $(date +%s) - T0 ))
  log "res $RES: ai-toolkit exit $TRC after ${PREV_RUN_S}s"
  [ $TRC -ne 0 ] && { grep -v "it/s\]" "$OUT/train_res$RES.log" | tail -25 >&2; RC=1; }
  QUANT=$(grep -c "Quantizing transformer" "$OUT/train_res$RES.log")
  NANS=$(grep -c "loss is nan" "$OUT/train_res$RES.log")  # ai-toolkit zeroes a non-finite loss: no real backward
  LOSS=$(grep -o "loss: [0-9.e+-]*" "$OUT/train_res$RES.log" | tail -1 | cut -d' ' -f2)
  EXTRA="{\"exit_code\":$TRC,\"nan_loss_lines\":$NANS,\"last_loss\":\"${LOSS:-none}\",\"run_wall_s\":$PREV_RUN_S,\"model_gen_s\":$GEN_S,\"transformer_quantized_log\":$QUANT,\"device\":\"$DEVICE\",\"tiny\":$TINYJ}"
  $PY "$REPO/benchmarks/peers/summarize.py" "$STEPLOG" --trainer "ai-toolkit $COMMIT" --resolution "$RES" \
    --settings "$WORK/runs/res$RES/settings.json" --extra "$EXTRA" | tee "$OUT/result_res$RES.json" || RC=1
done
log "done, total $(( $(date +%s) - T_START ))s"
exit $RC
