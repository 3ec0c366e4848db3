#!/usr/bin/env bash
# PanoLLaVA with the seed's train_custom.sh options. `bash launch/train_custom.sh --help`.
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/panollava_common.sh"

usage() {
    cat <<'USAGE'
Usage: bash launch/train_custom.sh [options] [key=value ...]

Options (each is a recipes.panollava config key; key=value arguments are passed on after them):
  --stage S          vision | resampler | finetune | all (default all)          stage=S
  --epochs N         epochs of each stage run                                    trainer.max_epochs=N
  --batch-size N     batch size per process                                      data.batch_size=N
  --lr X             peak learning rate                                          optim.lr=X
  --num-workers N    DataLoader workers per process                              data.num_workers=N
  --data-dir DIR     QuIC-360 folder (train.csv, valid.csv, test.csv)            data.root=DIR
  --run-name NAME    run folder under runs/ (default vlm; the stages share it)   trainer.run_name=NAME
  --resume CKPT      a checkpoint of the stage being run (<out>/<run>/<stage>/checkpoints/*.ckpt): continue
                     that run in its own folder (trainer.resume=CKPT; with --stage all, trainer.resume=auto
                     in that run: finished stages are skipped); any other file (the previous stage's
                     checkpoint or model_final.safetensors): start the stage from its weights
                     (trainer.ckpt_path=CKPT), as the seed's --resume does
  --nproc N          processes (torchrun --nproc_per_node; default one per visible GPU, 1 without)
  -h, --help         this text
Logs: logs/<stage>_<time>.log (logs/full_pipeline_<time>.log for all). Environment: launch/panollava_common.sh.
USAGE
}

stage=all
ckpt=""
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --stage) stage="${2:?--stage needs a value}"; shift 2 ;;
        --epochs) args+=("trainer.max_epochs=${2:?--epochs needs a value}"); shift 2 ;;
        --batch-size) args+=("data.batch_size=${2:?--batch-size needs a value}"); shift 2 ;;
        --lr) args+=("optim.lr=${2:?--lr needs a value}"); shift 2 ;;
        --num-workers) args+=("data.num_workers=${2:?--num-workers needs a value}"); shift 2 ;;
        --data-dir) DATA_DIR="${2:?--data-dir needs a value}"; shift 2 ;;
        --run-name) RUN_NAME="${2:?--run-name needs a value}"; shift 2 ;;
        --nproc) NPROC="${2:?--nproc needs a value}"; shift 2 ;;
        --resume) ckpt="${2:?--resume needs a checkpoint}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --*) echo "train_custom.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
case "${stage}" in
    vision) name=stage1_vision ;; resampler) name=stage2_resampler ;; finetune) name=stage3_finetune ;;
    all) name=full_pipeline ;;
    *) echo "train_custom.sh: --stage ${stage}: expected vision, resampler, finetune or all" >&2; exit 2 ;;
esac
# --resume: a checkpoint inside a stage run (<out>/<run>/<stage>/checkpoints/<file>.ckpt) continues that
# run (its out/run folder, trainer.resume; with --stage all: trainer.resume=auto, finished stages are
# skipped); any other file starts the stage from its weights (trainer.ckpt_path)
if [[ -n "${ckpt}" ]]; then
    [[ -f "${ckpt}" ]] || { echo "train_custom.sh: --resume ${ckpt}: no such file" >&2; exit 2; }
    if [[ "${ckpt}" == */checkpoints/*.ckpt ]]; then
        stage_dir="$(dirname -- "$(dirname -- "${ckpt}")")"
        ckpt_stage="$(basename -- "${stage_dir}")"
        case "${ckpt_stage}" in vision|resampler|finetune) ;; *)
            echo "train_custom.sh: --resume ${ckpt}: not inside a stage folder (<run>/vision|resampler|finetune/checkpoints/)" >&2
            exit 2 ;; esac
        if [[ "${stage}" != all && "${stage}" != "${ckpt_stage}" ]]; then
            args+=("trainer.ckpt_path=${ckpt}")          # another stage's checkpoint: a start, as the seed's --resume
        else
            RUN_NAME="$(basename -- "$(dirname -- "${stage_dir}")")"
            OUT_DIR="$(dirname -- "$(dirname -- "${stage_dir}")")"
            if [[ "${stage}" == all ]]; then args+=("trainer.resume=auto"); else args+=("trainer.resume=${ckpt}"); fi
        fi
    else
        args+=("trainer.ckpt_path=${ckpt}")
    fi
fi
export DATA_DIR RUN_NAME NPROC OUT_DIR
pano_run "${name}" "stage=${stage}" "${args[@]}"
[[ "${stage}" != finetune && "${stage}" != all ]] || pano_merge "${args[@]}"
