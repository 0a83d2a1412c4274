#!/bin/bash
# Full reproducible pipeline: new checkpoints (upstream classes) -> oracle folders (upstream code). Run from /tmp/upstream_golden.
set -e
cd /tmp/upstream_golden
PY=/tmp/upstream-venv/bin/python
OUT=${1:-out}
KEEP=global_ctx,image_features_full,vision_pos,instruct_pos,instruct_embeddings,instruct_features,vision_embeddings,vision_features
IMG=/work/shared/oracle/fusion-x-llama-tiny/image.png
rm -rf ckpt_$OUT work_$OUT $OUT; mkdir -p ckpt_$OUT work_$OUT
$PY make_checkpoint.py --variant x-phi --seed 1001 --out ckpt_$OUT/x-phi --workdir work_$OUT/make_x-phi
$PY make_checkpoint.py --variant llama-so400m --seed 1001 --out ckpt_$OUT/llama-so400m --workdir work_$OUT/make_llama-so400m
chmod -R u+w ckpt_$OUT
$PY run_upstream.py --ckpt ckpt_$OUT/x-phi --image $IMG --question "Which objects are on the table, and where is the cup?" \
  --query-len 16 --extra-query-lens 36,4 --max-new-tokens 6 --out $OUT/fusion-x-phi-tiny --workdir work_$OUT/run_x-phi \
  --seed 1001 --intermediates $KEEP
$PY run_upstream.py --ckpt ckpt_$OUT/llama-so400m --image $IMG --question "Describe the cup and the drink inside it in one short sentence." \
  --query-len 4 --extra-query-lens 16,36 --max-new-tokens 6 --out $OUT/fusion-llama-so400m-tiny --workdir work_$OUT/run_llama-so400m \
  --seed 1001 --intermediates $KEEP
