#!/usr/bin/env bash
# Shared by the PanoLLaVA stage scripts (train_stage*.sh, train_all_stages.sh, train_custom.sh): runs
# `-m recipes.panollava` through launch/train_ddp.sh and writes the console to logs/<name>_<time>.log,
# as the seed's scripts do. Environment (all optional):
#   RUN_NAME     run folder under OUT_DIR, shared by the stages so each finds the previous one (default vlm)
#   OUT_DIR      parent of run folders (default runs): the stages are OUT_DIR/RUN_NAME/<stage>/
#   DATA_DIR     QuIC-360 folder with train.csv/valid.csv/test.csv (default: the synthetic demo)
#   VISION_MODEL SigLIP Hugging Face folder (model.vision_pretrained)
#   LM_MODEL     Qwen2/Qwen2.5 Hugging Face folder (model.lm_pretrained)
#   NPROC        processes (train_ddp.sh -d; default: one per visible GPU, 1 without one)
#   LOG_DIR      where the logs go (default logs)
set -euo pipefail

PANO_HERE="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"

# pano_args: the overrides every stage script passes (run folder, data, pretrained folders)
pano_args() {
    printf '%s\n' "trainer.out_dir=${OUT_DIR:-runs}" "trainer.run_name=${RUN_NAME:-vlm}"
    [[ -z "${DATA_DIR:-}" ]] || printf '%s\n' "data.root=${DATA_DIR}"
    [[ -z "${VISION_MODEL:-}" ]] || printf '%s\n' "model.vision_pretrained=${VISION_MODEL}"
    [[ -z "${LM_MODEL:-}" ]] || printf '%s\n' "model.lm_pretrained=${LM_MODEL}"
}

# pano_run LOG_NAME ARGS...: train_ddp.sh -r panollava ARGS, console to the terminal and the log file
pano_run() {
    local name="$1" log status
    shift
    mkdir -p "${LOG_DIR:-logs}"
    log="${LOG_DIR:-logs}/${name}_$(date +%Y%m%d_%H%M%S).log"
    local -a base=()
    mapfile -t base < <(pano_args)
    echo "[panollava] log: ${log}"
    set +e
    bash "${PANO_HERE}/train_ddp.sh" -r panollava ${NPROC:+-d "${NPROC}"} "${base[@]}" "$@" 2>&1 | tee "${log}"
    status=${PIPESTATUS[0]}
    set -e
    return "${status}"
}

# pano_start_from CKPT: the override that makes a stage start from CKPT (a model_final.safetensors or a
# .ckpt of the previous stage); nothing when CKPT is empty (the stage then starts from
# OUT_DIR/RUN_NAME/<previous stage>/model_final.safetensors)
pano_start_from() {
    [[ -z "${1:-}" ]] && return 0
    if [[ ! -f "$1" ]]; then
        echo "panollava: checkpoint $1 not found (expected the previous stage's model_final.safetensors or a .ckpt)" >&2
        return 2
    fi
    printf '%s\n' "trainer.ckpt_path=$1"
}

# pano_is_checkpoint ARG: whether a stage script's first argument names a checkpoint (an existing file, or
# a .ckpt / .safetensors path: trainlib's own names hold '=', e.g. checkpoints/step=00000500.ckpt)
pano_is_checkpoint() {
    [[ -f "$1" || "$1" == *.ckpt || "$1" == *.safetensors ]]
}

# pano_merge [ARGS...]: model_merged.safetensors (LoRA folded into the LM) beside the finetune stage's final
# weights, in the run folder the ARGS name (trainer.out_dir= / trainer.run_name=) or the environment's
pano_merge() {
    local out="${OUT_DIR:-runs}" run="${RUN_NAME:-vlm}" a
    for a in "$@"; do
        case "${a}" in trainer.out_dir=*) out="${a#*=}" ;; trainer.run_name=*) run="${a#*=}" ;; esac
    done
    local final="${out}/${run}/finetune/model_final.safetensors"
    [[ -f "${final}" ]] || return 0
    "$(command -v python || command -v python3)" -m recipes.panollava.export "${final}"
}
