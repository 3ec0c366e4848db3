#!/usr/bin/env bash
# PanoLLaVA stage 2: captions with the LM frozen (trains the resampler and the projection).
#   bash launch/train_stage2_resampler.sh [CKPT] [key=value ...]
# CKPT: stage 1's weights (runs/vlm/vision/model_final.safetensors or a .ckpt); without it, the
# vision stage of the same RUN_NAME. Log: logs/stage2_resampler_<time>.log.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/panollava_common.sh"
start=()
if [[ $# -gt 0 ]] && pano_is_checkpoint "$1"; then start=("$(pano_start_from "$1")"); shift; fi
pano_run stage2_resampler stage=resampler "${start[@]}" "$@"
