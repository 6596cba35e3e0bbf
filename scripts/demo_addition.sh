#!/usr/bin/env bash
# Teach the pretrained model addition: prompt "123+45=", completion "168", loss on the
# completion only. Full fine-tuning and LoRA, each scored by exact match on 1,000 held-out
# problems never seen in training. STEPS sets the steps; PRETRAINED a checkpoint (trained
# first if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PRETRAINED=${PRETRAINED:-out/ckpt.npz}
STEPS=${STEPS:-4000}
OUT=${OUT:-out-addition}

[ -f "$PRETRAINED" ] || python train.py --out-dir "$(dirname "$PRETRAINED")"
same=(--init-from "$PRETRAINED" --sft addition --block-size 16 --batch-size 64 --max-iters "$STEPS"
      --lr-decay-iters "$STEPS" --eval-interval 250 --sample-tokens 0)
mkdir -p "$OUT"
for run in full lora; do
    options=()
    [ "$run" = lora ] && options=(--lora-rank 8 --lora-alpha 16 --lora-targets attn,mlp --lr 3e-3 --merge-lora)
    python train.py "${same[@]}" "${options[@]}" --out-dir "$OUT/$run" > "$OUT/$run.log"
    echo "$run:"
    grep -E "^(model|final|trained):" "$OUT/$run.log"
    python -m minillm.evaluate --ckpt "$OUT/$run/ckpt.npz" --task addition
done
