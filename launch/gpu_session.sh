#!/usr/bin/env bash
# The GPU checks of issue 5 in a few commands, each under the device tool's 10-minute limit.
# Run from the repository root on a GPU machine (a bare image with torch, torchvision, lightning
# and transformers is enough: the repo runs from its folder, nothing is installed):
#
#   bash launch/gpu_session.sh tests        # gpu-marked tests: graph replay vs eager, no-sync, compile under DDP
#   bash launch/gpu_session.sh pdan         # bench table, PDAN (the 6x-over-Lightning target)
#   bash launch/gpu_session.sh r2plus1d     # bench table, R(2+1)D-18 (the 1.3x target)
#   bash launch/gpu_session.sh segformer    # bench table, SegFormer-b0
#   bash launch/gpu_session.sh mvfoul       # bench table, the mvfoul recipe (R(2+1)D-18, 2 views, 16x112x112)
#   bash launch/gpu_session.sh xca          # bench tables, the xca flow UNet and CS-Net (320x320 crops)
#
# Output goes to stdout and to ${OUT:-gpu_out}/<part>.txt; paste the tables into docs/benchmarks.md
# with the date and the GPU name the header line prints.
set -euo pipefail
part="${1:?usage: bash launch/gpu_session.sh tests|pdan|r2plus1d|segformer|mvfoul|xca}"
case "$part" in tests|pdan|r2plus1d|segformer|mvfoul|xca) ;; *)
  echo "unknown part '$part': expected tests, pdan, r2plus1d, segformer, mvfoul or xca" >&2; exit 2 ;; esac
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/$part.txt"
python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])" | tee -a "$out/$part.txt"
case "$part" in
  tests)     python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_bench.py 2>&1 | tee -a "$out/$part.txt" ;;
  pdan)      python -m launch.bench --model pdan --device cuda --steps 200 --warmup 60 --repeats 3 2>&1 | tee -a "$out/$part.txt" ;;
  r2plus1d)  python -m launch.bench --model r2plus1d --device cuda --steps 100 --warmup 40 --repeats 3 2>&1 | tee -a "$out/$part.txt" ;;
  segformer) python -m launch.bench --model segformer --device cuda --steps 100 --warmup 40 --repeats 3 2>&1 | tee -a "$out/$part.txt" ;;
  mvfoul)    python -m launch.bench --model mvfoul --device cuda --steps 100 --warmup 40 --repeats 3 2>&1 | tee -a "$out/$part.txt" ;;
  xca)       for m in xca_flow xca_csnet; do
               python -m launch.bench --model $m --device cuda --steps 60 --warmup 20 --repeats 2 2>&1 | tee -a "$out/$part.txt"
             done ;;
esac
