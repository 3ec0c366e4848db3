#!/usr/bin/env bash
# PanoLLaVA stage 1: VICReg between adjacent views (trains the resampler and the VICReg projector).
#   bash launch/train_stage1_vision.sh [key=value ...]
# Writes OUT_DIR/RUN_NAME/vision/model_final.safetensors (default runs/vlm/vision/) and
# logs/stage1_vision_<time>.log. Environment: launch/panollava_common.sh.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/panollava_common.sh"
pano_run stage1_vision stage=vision "$@"
