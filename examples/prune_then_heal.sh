#!/usr/bin/env bash
# Prune SmolLM2-135M-Instruct (embedded, offline) by 6 of 30 blocks, then heal it by distillation from the unpruned
# model on Jane Austen's Persuasion (built offline by examples/offline_eval_data.py).
set -euo pipefail
python examples/offline_eval_data.py --output eval_data
hf-blockcbo prune --remove 6 --num-samples 64 --seq-len 128 --save-hessian smollm2.hessian.safetensors \
  --output smollm2-pruned
hf-blockcbo heal --student smollm2-pruned --teacher embedded:smollm2 --data eval_data/austen_persuasion.txt \
  --max-steps 300 --learning-rate 1e-4 --heal-batch-size 2 --max-length 128 --save-steps 100 --output smollm2-healed
# measured on a 2-core CPU: validation perplexity 212.4 -> 63.3 (unpruned 57.8), ~5 s/step
# with --teacher-top-k 64 --teacher-cache teacher64.safetensors the teacher runs once and is freed before training
# the same in one command:  hf-blockcbo prune --remove 6 --heal --heal-data eval_data/austen_persuasion.txt ...
python - <<'PY'
import json
print(json.dumps(json.load(open("smollm2-healed/block_removal.json"))["healing"], indent=2))
PY
