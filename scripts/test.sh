#!/usr/bin/env bash
# The test command: the whole suite against real ComfyUI on the CPU (4-5 minutes a ComfyUI version on two cores).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PACK_DIR"
# Inductor's compiled kernels, kept outside the checkout: the compiled-path tests spend about 150 s compiling C++ on a
# cold cache (test_compiled_fp8_matmul_trains_like_eager_fp8 alone 95 s), a few seconds on a warm one.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/dev2pro-lora/inductor}"
exec "$PY" -m pytest -q -p no:cacheprovider --durations=12 tests "$@"
