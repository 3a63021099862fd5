#!/usr/bin/env bash
# The paper's scale on one GPU (docs/results.md, "The paper's scale on a GPU"):
# CIFAR-10, ResNet-18 at width 1.0, the whole data, one seed, the runs of
# `reproduce.py --scale gpu`, about 8 minutes of an H200 with compilation.
#
#   mkdir -p data && cp -r ../shared/data/cifar10 data/    # data/ is git-ignored
#   bash experiments/gpu_evidence.sh OUT [DATA_DIR]         # DATA_DIR default: data/cifar10
#
# On the device tool: run(command="bash experiments/gpu_evidence.sh $OUT", carry=["data"]).
# Writes OUT/results.md, results.json, results.csv, two plots and the log (the
# run directories stay in runs/gpu_evidence: $OUT returns files two folders deep at most).
set -euo pipefail
out=${1:?usage: gpu_evidence.sh OUT [DATA_DIR]}
data=${2:-data/cifar10}
mkdir -p "$out"
export HSEE_CACHE_DIR=${HSEE_CACHE_DIR:-$PWD/.cache/hsee_jax}
python3 -c 'import jax; print("devices:", jax.devices())' 2>&1 | tee "$out/gpu_evidence.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$out/gpu_evidence.log" || true
start=$(date +%s)
python3 experiments/reproduce.py --scale gpu --seeds 0 --datasets cifar10 \
    --data-dir "cifar10=$data" --out runs/gpu_evidence 2>&1 | tee -a "$out/gpu_evidence.log"
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$out/gpu_evidence.log"
cp runs/gpu_evidence/results.md runs/gpu_evidence/results.json runs/gpu_evidence/results.csv \
   runs/gpu_evidence/cifar10_convergence.png runs/gpu_evidence/cifar10_claim2_exits_vs_alone.png "$out/"
