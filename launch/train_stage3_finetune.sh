#!/usr/bin/env bash
# PanoLLaVA stage 3: captions with LoRA on the LM (trains the resampler, the projection and the adapters).
#   bash launch/train_stage3_finetune.sh [CKPT] [key=value ...]
# CKPT: stage 2's weights (runs/vlm/resampler/model_final.safetensors or a .ckpt); without it, the
# resampler stage of the same RUN_NAME. Log: logs/stage3_finetune_<time>.log.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/panollava_common.sh"
start=()
if [[ $# -gt 0 ]] && pano_is_checkpoint "$1"; then start=("$(pano_start_from "$1")"); shift; fi
pano_run stage3_finetune stage=finetune "${start[@]}" "$@"
# the LoRA adapters folded into the LM: <run>/finetune/model_merged.safetensors
pano_merge "$@"
