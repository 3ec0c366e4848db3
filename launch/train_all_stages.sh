#!/usr/bin/env bash
# PanoLLaVA: the three stages in order (vision -> resampler -> finetune), each from the previous one's
# final weights, in OUT_DIR/RUN_NAME/<stage>/ (default runs/vlm/). Log: logs/full_pipeline_<time>.log.
#   bash launch/train_all_stages.sh [key=value ...]        # no DATA_DIR: the synthetic demo, CPU-sized
# Stopped in the middle? Run it again with trainer.resume=auto: finished stages are skipped.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/panollava_common.sh"
pano_run full_pipeline stage=all "$@"
# the LoRA adapters folded into the LM: <run>/finetune/model_merged.safetensors
pano_merge "$@"
