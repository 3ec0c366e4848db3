#!/usr/bin/env bash
# Launch any trainlib recipe with torchrun (one node or several), in the foreground or in the
# background. Run `bash launch/train_ddp.sh -h` for the options; docs/launching.md has more.
#
# What it runs (one line; this is also exactly what --dry-run prints):
#   [CUDA_VISIBLE_DEVICES=<ids>] <torchrun> <launcher flags> -m recipes.<recipe> \
#       [--config FILE] [trainer.precision=P] [trainer.strategy=S ...] [overrides ...]
# <torchrun> is $TRAINLIB_TORCHRUN when set (split on spaces), else `torchrun` when it is on
# PATH, else `python -m torch.distributed.run` (python3 when there is no python).
set -euo pipefail

readonly PROG="launch/train_ddp.sh"

# The recipes this script can start (\`-m recipes.<name>\`): the installed packages' trainlib.recipes
# entry points (what trainlib.available_recipes() reads) that live under recipes/, else the
# packages in the recipes/ folder next to this script.
list_recipes() {
    local py names="" d dir
    py=$(command -v python || command -v python3 || true)
    if [[ -n "${py}" ]]; then
        names=$("${py}" -c 'from importlib.metadata import entry_points
print(", ".join(sorted({e.name for e in entry_points(group="trainlib.recipes") if e.value.startswith("recipes.")})))' \
            2>/dev/null || true)
    fi
    if [[ -z "${names}" ]]; then
        dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
        for d in "${dir%/*}"/recipes/*/__init__.py; do
            [[ -e "${d}" ]] || continue
            d=${d%/__init__.py}
            [[ "${d##*/}" != _* ]] || continue
            names+="${names:+, }${d##*/}"
        done
    fi
    printf '%s' "${names:-none found}"
}

usage() {
    cat <<EOF
Usage: bash ${PROG} [options] [section.key=value ...] [-- args ...]

Launches \`-m recipes.<recipe>\` under torchrun. Every argument that is not an option below is
passed on verbatim, in order, as a config override (e.g. trainer.max_epochs=5); everything
after \`--\` is passed on verbatim too.

Options:
  -c, --config FILE     YAML config, passed on as \`--config FILE\`.
                        Default: none.
  -r, --recipe NAME     recipe package under recipes/; registered here: $(list_recipes).
                        Default: the config's top-level \`recipe:\` key; one of the two is required.
  -g, --gpus IDS        GPU ids, e.g. "1,2,3": sets CUDA_VISIBLE_DEVICES=1,2,3 and starts one
                        process per id. Refuses to start when no GPU is visible or an id is not
                        below the count \`nvidia-smi -L\` lists (not checked with -n).
                        Default: all visible GPUs (see -d).
  -d, --devices N       processes per node; -1 = one per visible GPU (CUDA_VISIBLE_DEVICES when
                        set, else \`nvidia-smi -L\`), 1 when there is no GPU. With -g it must be
                        -1 or the number of ids. Default: the config's trainer.devices (the
                        Lightning-style key), else -1.
  -s, --strategy S      ddp | none | fsdp, passed on as trainer.strategy=S. Also accepted:
                          ddp_find_unused_parameters_true -> trainer.strategy=ddp
                                                             trainer.find_unused_parameters=true
                          ddp_spawn -> trainer.strategy=ddp (torchrun starts the processes)
                        Default: not passed (the recipe's default).
  -p, --precision P     32-true | 16-mixed | bf16-mixed | bf16-true (also 32 = 32-true,
                        16 = 16-mixed, bf16 = bf16-mixed), passed on as trainer.precision=P.
                        Default: not passed (the recipe's default).
  -b, --background      run under nohup, output to logs/<recipe>_<YYYYmmdd_HHMMSS>.log; prints
                        the PID and the \`tail -f\` command. Default: off.
  -n, --dry-run         print the exact command line (env assignments included), exit 0.
  -h, --help            show this help and exit.

Multi-node (passed to torchrun; same values on every node except --node-rank):
  --nnodes N|MIN:MAX    number of nodes. Default: 1.
  --node-rank R         this node's rank (--node_rank works too). Default: not passed.
  --rdzv-endpoint H:P   rendezvous host:port, e.g. node0:29500. Default: none (single node:
                        \`torchrun --standalone --nproc_per_node=N\`).
  --rdzv-id ID          job id, the same on all nodes. Default: not passed.
  --rdzv-backend B      rendezvous backend. Default: c10d (when --rdzv-endpoint is given).
  --max-restarts K      torchrun elastic restarts; use with trainer.resume=auto.
                        Default: not passed (torchrun's 0).
  These also accept --opt=value and underscore spellings (--rdzv_endpoint=node0:29500).

Environment:
  TRAINLIB_TORCHRUN     launcher command instead of torchrun, e.g. "python -m torch.distributed.run".
                        Default: torchrun when on PATH, else python -m torch.distributed.run.

Examples:
  bash ${PROG} -c configs/pdan.yaml -g "1,2,3,4"
  bash ${PROG} -c configs/pdan.yaml -g "1,2,3,4" -b
  tail -f logs/pdan_20250101_120000.log
  bash ${PROG} -r pdan -d 2 -p bf16-mixed trainer.max_epochs=50
  bash ${PROG} -c configs/pdan.yaml -s ddp_find_unused_parameters_true
  bash ${PROG} -c configs/pdan.yaml trainer.resume=auto
  bash ${PROG} -r pdan -n -g "0,1" trainer.max_epochs=3     # print the command only
  # two nodes, 8 GPUs each; run on node 0 and on node 1 (--node-rank 1):
  bash ${PROG} -c configs/pdan.yaml --nnodes 2 --node-rank 0 \\
      --rdzv-endpoint node0:29500 --rdzv-id job42 -d 8
EOF
}

die() {
    printf '%s: error: %s\n' "${PROG}" "$1" >&2
    exit 2
}

die_usage() {
    printf '%s: error: %s\n\n' "${PROG}" "$1" >&2
    usage >&2
    exit 2
}

note() {
    printf '%s: %s\n' "${PROG}" "$1" >&2
}

# Quote one word for a shell command line: as is when it has only safe characters, else in
# single quotes. Keeps the dry-run output readable and copy-pasteable.
shell_quote() {
    local w=$1
    if [[ -n "${w}" && "${w}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
        printf '%s' "${w}"
    else
        printf "'%s'" "${w//\'/\'\\\'\'}"
    fi
}

# Top-level `recipe:` value of a YAML file ("" when absent). Plain text scan: the key must start
# at column 0; quotes and a trailing `# comment` are removed.
recipe_from_yaml() {
    local line value re='^recipe:[[:space:]]*(.*)$'
    while IFS= read -r line || [[ -n "${line}" ]]; do
        line=${line%$'\r'}
        if [[ "${line}" =~ ${re} ]]; then
            value=${BASH_REMATCH[1]}
            value=${value%%[[:space:]]#*}
            value=${value%"${value##*[![:space:]]}"}
            if [[ "${value}" =~ ^\"(.*)\"$ || "${value}" =~ ^\'(.*)\'$ ]]; then
                value=${BASH_REMATCH[1]}
            fi
            printf '%s' "${value}"
            return 0
        fi
    done <"$1"
}

# `devices:` of the top-level `trainer:` section of a YAML file ("" when absent). Plain text scan:
# the section starts at column 0 (block form, or a one-line `trainer: {devices: 2, ...}`); only keys
# at the indentation of its first key count (not a `devices:` nested deeper, e.g. in a logger's
# init_args); quotes and a trailing `# comment` are removed.
devices_from_yaml() {
    local line in_trainer=0 indent="" value key_re flow_re='^trainer:[[:space:]]*\{(.*[{,[:space:]])?devices:[[:space:]]*([^,}]*)'
    while IFS= read -r line || [[ -n "${line}" ]]; do
        line=${line%$'\r'}
        [[ "${line}" =~ ^[[:space:]]*(#.*)?$ ]] && continue
        if [[ "${line}" =~ ^[^[:space:]] ]]; then
            in_trainer=0 indent=""
            if [[ "${line}" =~ ${flow_re} ]]; then
                value=${BASH_REMATCH[2]}
                break
            fi
            [[ "${line}" =~ ^trainer:[[:space:]]*(#.*)?$ ]] && in_trainer=1
            continue
        fi
        ((in_trainer)) || continue
        if [[ -z "${indent}" ]]; then
            indent=${line%%[![:space:]]*}
        fi
        key_re="^${indent}devices:[[:space:]]*(.*)$"
        if [[ "${line}" =~ ${key_re} ]]; then
            value=${BASH_REMATCH[1]}
            break
        fi
    done <"$1"
    [[ -n "${value:-}" ]] || return 0
    value=${value%%[[:space:]]#*}
    value=${value%"${value##*[![:space:]]}"}
    if [[ "${value}" =~ ^\"(.*)\"$ || "${value}" =~ ^\'(.*)\'$ ]]; then
        value=${BASH_REMATCH[1]}
    fi
    printf '%s' "${value}"
}

# Number of GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`.
count_visible_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        if [[ -z "${CUDA_VISIBLE_DEVICES}" || "${CUDA_VISIBLE_DEVICES}" == -* ]]; then
            echo 0
            return 0
        fi
        local -a ids
        IFS=',' read -r -a ids <<<"${CUDA_VISIBLE_DEVICES}"
        echo "${#ids[@]}"
        return 0
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

# -g ids must name GPUs of this machine: CUDA ignores ids it cannot find, so without this check
# `-g 9` on a machine with fewer GPUs (or none) would train on the CPU without a word. Exits 2
# with one line naming the ids asked for and what is visible. Numeric ids are checked against
# the count `nvidia-smi -L` lists; UUID / MIG ids only need some GPU to be visible.
check_gpu_ids() {
    local asked=$1 listing count id
    shift
    local hint="-g needs GPUs; use -d N to start N CPU processes instead"
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" && (-z "${CUDA_VISIBLE_DEVICES}" || "${CUDA_VISIBLE_DEVICES}" == -*) ]]; then
        die "-g ${asked}: no GPU is visible (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' hides them all); ${hint}"
    fi
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        die "-g ${asked}: no GPU is visible (nvidia-smi not found); ${hint}"
    fi
    listing=$(nvidia-smi -L 2>/dev/null || true)
    count=$(grep -c '^GPU ' <<<"${listing}" || true)
    if ((count < 1)); then
        die "-g ${asked}: no GPU is visible (nvidia-smi -L lists none); ${hint}"
    fi
    for id in "$@"; do
        if [[ "${id}" =~ ^[0-9]+$ ]] && ((10#${id} >= count)); then
            die "-g ${asked}: there is no GPU ${id}: nvidia-smi -L lists ${count} GPU(s), ids 0-$((count - 1))"
        fi
    done
}

# ---------------------------------------------------------------------------------------------
# Parse arguments.
config="" recipe="" gpus="" devices="" strategy="" precision=""
background=0 dry_run=0
nnodes="" node_rank="" rdzv_endpoint="" rdzv_id="" rdzv_backend="" max_restarts=""
overrides=()

while (($# > 0)); do
    arg=$1
    opt=${arg} inline="" has_inline=0
    if [[ "${arg}" == --*=* ]]; then
        opt=${arg%%=*}
        inline=${arg#*=}
        has_inline=1
    fi
    # Options that take a value: the variable it goes to.
    var=""
    case "${opt}" in
        -c | --config) var=config ;;
        -r | --recipe) var=recipe ;;
        -g | --gpus) var=gpus ;;
        -d | --devices) var=devices ;;
        -s | --strategy) var=strategy ;;
        -p | --precision) var=precision ;;
        --nnodes) var=nnodes ;;
        --node-rank | --node_rank) var=node_rank ;;
        --rdzv-endpoint | --rdzv_endpoint) var=rdzv_endpoint ;;
        --rdzv-id | --rdzv_id) var=rdzv_id ;;
        --rdzv-backend | --rdzv_backend) var=rdzv_backend ;;
        --max-restarts | --max_restarts) var=max_restarts ;;
        *) ;;
    esac
    if [[ -n "${var}" ]]; then
        if ((has_inline)); then
            value=${inline}
            shift
        elif (($# >= 2)); then
            value=$2
            shift 2
        else
            die_usage "option ${opt} needs a value"
        fi
        [[ -n "${value}" ]] || die_usage "option ${opt} needs a non-empty value"
        printf -v "${var}" '%s' "${value}"
        continue
    fi
    case "${opt}" in
        -b | --background | -n | --dry-run | -h | --help)
            ((has_inline == 0)) || die_usage "option ${opt} takes no value" ;;
        *) ;;
    esac
    case "${opt}" in
        -b | --background) background=1 ;;
        -n | --dry-run) dry_run=1 ;;
        -h | --help)
            usage
            exit 0 ;;
        --)
            shift
            overrides+=("$@")
            break ;;
        -*) die_usage "unknown option: ${arg} (overrides are section.key=value; put other recipe arguments after --)" ;;
        *) overrides+=("${arg}") ;;
    esac
    shift
done

# ---------------------------------------------------------------------------------------------
# Validate and resolve.
if [[ -n "${config}" ]]; then
    [[ -f "${config}" ]] || die "config file not found: ${config}"
    [[ -r "${config}" ]] || die "config file not readable: ${config}"
    config_recipe=$(recipe_from_yaml "${config}")
    if [[ -z "${recipe}" ]]; then
        recipe=${config_recipe}
    elif [[ -n "${config_recipe}" && "${config_recipe}" != "${recipe}" ]]; then
        note "note: -r ${recipe} overrides 'recipe: ${config_recipe}' in ${config}"
    fi
fi
if [[ -z "${recipe}" ]]; then
    if [[ -n "${config}" ]]; then
        die "no recipe: ${config} has no top-level 'recipe:' key; pass -r/--recipe NAME or add 'recipe: NAME' to the config"
    fi
    die "no recipe: pass -r/--recipe NAME, or -c/--config FILE whose YAML has a top-level 'recipe: NAME' key"
fi
[[ "${recipe}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] ||
    die "recipe name '${recipe}' is not a Python package name (expected e.g. pdan, xca)"

# When this script sits in a trainlib checkout, check the recipe exists there.
script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
recipes_dir="${script_dir%/*}/recipes"
if [[ -d "${recipes_dir}" && ! -d "${recipes_dir}/${recipe}" ]]; then
    available=""
    for d in "${recipes_dir}"/*/; do
        d=${d%/}
        [[ "${d##*/}" != _* ]] || continue
        available+="${available:+, }${d##*/}"
    done
    die "unknown recipe '${recipe}': no ${recipes_dir}/${recipe}/ (available: ${available:-none})"
fi

# Processes per node.
if [[ -z "${devices}" && -z "${gpus}" && -n "${config}" ]]; then
    devices=$(devices_from_yaml "${config}")
    if [[ -n "${devices}" ]]; then
        [[ "${devices}" =~ ^(-1|[1-9][0-9]*)$ ]] ||
            die "${config}: trainer.devices must be -1 or a positive integer, got '${devices}'"
        note "processes per node: ${devices} (trainer.devices in ${config}; -d overrides)"
    fi
fi
devices=${devices:--1}
[[ "${devices}" =~ ^(-1|[1-9][0-9]*)$ ]] || die "-d/--devices must be -1 or a positive integer, got '${devices}'"
gpu_list=""
if [[ -n "${gpus}" ]]; then
    gpu_list=${gpus//[[:space:]]/}
    [[ "${gpu_list}" =~ ^[A-Za-z0-9:/_-]+(,[A-Za-z0-9:/_-]+)*$ ]] ||
        die "-g/--gpus must be comma-separated GPU ids like \"0,1,2\", got '${gpus}'"
    gpu_ids=()
    IFS=',' read -r -a gpu_ids <<<"${gpu_list}"
    seen=","
    for id in "${gpu_ids[@]}"; do
        [[ "${seen}" != *",${id},"* ]] || die "-g/--gpus lists GPU ${id} twice: '${gpus}'"
        seen+="${id},"
    done
    nproc=${#gpu_ids[@]}
    if [[ "${devices}" != "-1" && "${devices}" != "${nproc}" ]]; then
        die "-d ${devices} does not match -g \"${gpus}\" (${nproc} ids); with -g the process count is the number of ids"
    fi
elif [[ "${devices}" == "-1" ]]; then
    nproc=$(count_visible_gpus)
    if ((nproc < 1)); then
        nproc=1
    fi
else
    nproc=${devices}
fi

# Strategy and precision -> overrides (placed before the user's, so the user's win).
mapped=()
if [[ -n "${precision}" ]]; then
    case "${precision}" in
        32 | 32-true) mapped+=("trainer.precision=32-true") ;;
        16 | 16-mixed) mapped+=("trainer.precision=16-mixed") ;;
        bf16 | bf16-mixed) mapped+=("trainer.precision=bf16-mixed") ;;
        bf16-true) mapped+=("trainer.precision=bf16-true") ;;
        *) die "-p/--precision must be one of 32-true, 16-mixed, bf16-mixed, bf16-true (or 32, 16, bf16), got '${precision}'" ;;
    esac
fi
if [[ -n "${strategy}" ]]; then
    case "${strategy}" in
        ddp | none | fsdp) mapped+=("trainer.strategy=${strategy}") ;;
        ddp_find_unused_parameters_true)
            mapped+=("trainer.strategy=ddp" "trainer.find_unused_parameters=true") ;;
        ddp_spawn)
            note "note: ddp_spawn runs as ddp: torchrun starts one process per device, so spawn is not needed"
            mapped+=("trainer.strategy=ddp") ;;
        *) die "-s/--strategy must be one of ddp, none, fsdp, ddp_find_unused_parameters_true, ddp_spawn, got '${strategy}'" ;;
    esac
fi

# torchrun flags.
if [[ -n "${nnodes}" ]]; then
    [[ "${nnodes}" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "--nnodes must be N or MIN:MAX, got '${nnodes}'"
fi
if [[ -n "${node_rank}" ]]; then
    [[ "${node_rank}" =~ ^[0-9]+$ ]] || die "--node-rank must be a non-negative integer, got '${node_rank}'"
fi
if [[ -n "${max_restarts}" ]]; then
    [[ "${max_restarts}" =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer, got '${max_restarts}'"
fi
launcher_flags=()
if [[ -n "${rdzv_endpoint}" ]]; then
    [[ -n "${nnodes}" ]] && launcher_flags+=("--nnodes=${nnodes}")
    [[ -n "${node_rank}" ]] && launcher_flags+=("--node_rank=${node_rank}")
    [[ -n "${rdzv_id}" ]] && launcher_flags+=("--rdzv_id=${rdzv_id}")
    launcher_flags+=("--rdzv_backend=${rdzv_backend:-c10d}" "--rdzv_endpoint=${rdzv_endpoint}")
else
    if [[ -n "${nnodes}" && "${nnodes}" != "1" ]]; then
        die "--nnodes ${nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)"
    fi
    for pair in "node-rank:${node_rank}" "rdzv-id:${rdzv_id}" "rdzv-backend:${rdzv_backend}"; do
        [[ -z "${pair#*:}" ]] || die "--${pair%%:*} needs --rdzv-endpoint HOST:PORT (multi-node run)"
    done
    launcher_flags+=("--standalone")
fi
[[ -n "${max_restarts}" ]] && launcher_flags+=("--max_restarts=${max_restarts}")
launcher_flags+=("--nproc_per_node=${nproc}")

# The launcher command.
launcher=()
if [[ -n "${TRAINLIB_TORCHRUN:-}" ]]; then
    read -r -a launcher <<<"${TRAINLIB_TORCHRUN}"
elif command -v torchrun >/dev/null 2>&1; then
    launcher=(torchrun)
elif command -v python >/dev/null 2>&1; then
    launcher=(python -m torch.distributed.run)
else
    launcher=(python3 -m torch.distributed.run)
fi

cmd=("${launcher[@]}" "${launcher_flags[@]}" -m "recipes.${recipe}")
[[ -n "${config}" ]] && cmd+=(--config "${config}")
cmd+=("${mapped[@]}" "${overrides[@]}")

env_assign=()
[[ -n "${gpu_list}" ]] && env_assign+=("CUDA_VISIBLE_DEVICES=${gpu_list}")

cmdline=""
for w in "${env_assign[@]}" "${cmd[@]}"; do
    cmdline+="${cmdline:+ }$(shell_quote "${w}")"
done

# ---------------------------------------------------------------------------------------------
# Run.
if ((dry_run)); then
    if ((background)); then
        note "note: with -b this runs under nohup, output to logs/${recipe}_<YYYYmmdd_HHMMSS>.log"
    fi
    printf '%s\n' "${cmdline}"
    exit 0
fi

if [[ -n "${gpu_list}" ]]; then
    check_gpu_ids "${gpu_list}" "${gpu_ids[@]}"
    export CUDA_VISIBLE_DEVICES="${gpu_list}"
fi

if ((background)); then
    mkdir -p logs
    log="logs/${recipe}_$(date +%Y%m%d_%H%M%S).log"
    if [[ -e "${log}" ]]; then
        log="${log%.log}_$$.log"
    fi
    started=$(date '+%Y-%m-%d %H:%M:%S')
    printf '# %s\n# started %s on %s\n' "${cmdline}" "${started}" "${HOSTNAME:-?}" >"${log}"
    # Job control on, for this one job: it gets its own process group and keeps the default
    # SIGINT disposition (a non-interactive shell starts background jobs with SIGINT ignored).
    set -m
    nohup "${cmd[@]}" >>"${log}" 2>&1 </dev/null &
    pid=$!
    set +m
    printf 'started in the background: PID %s\n' "${pid}"
    printf 'command:  %s\n' "${cmdline}"
    printf 'log:      tail -f %s\n' "${log}"
    printf 'stop:     kill %s   (SIGTERM: the run stops at a step boundary and saves last.ckpt)\n' "${pid}"
    exit 0
fi

printf '%s\n' "${cmdline}" >&2
exec "${cmd[@]}"
