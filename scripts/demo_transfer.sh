#!/usr/bin/env bash
# Does pretraining help? Fine-tune the model pretrained on the built-in corpus (Python's
# documentation) on a small text of a different kind, and train the same architecture
# from scratch on the same text for the same number of steps; print both validation losses.
#
# The target text defaults to Python's licence (LICENSE.txt, beside the standard library:
# about 14,000 characters of legal English, on every Python install). TARGET=path/to/text.txt
# picks another; STEPS sets the steps; PRETRAINED a checkpoint (trained first if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PRETRAINED=${PRETRAINED:-out/ckpt.npz}
TARGET=${TARGET:-$(python -c 'import os; print(os.path.join(os.path.dirname(os.__file__), "LICENSE.txt"))')}
STEPS=${STEPS:-500}
OUT=${OUT:-out-transfer}

[ -f "$PRETRAINED" ] || python train.py --out-dir "$(dirname "$PRETRAINED")"
same=(--data "$TARGET" --max-iters "$STEPS" --lr-decay-iters "$STEPS" --eval-interval 25 --dropout 0.1)
mkdir -p "$OUT"
python train.py "${same[@]}" --init-from "$PRETRAINED" --out-dir "$OUT/pretrained" > "$OUT/pretrained.log"
python train.py "${same[@]}" --out-dir "$OUT/scratch" > "$OUT/scratch.log"
python - "$OUT" <<'PY'
import sys
from minillm import checkpoint
for run in ("pretrained", "scratch"):
    meta = checkpoint.read_meta(f"{sys.argv[1]}/{run}/ckpt.npz")
    print(f"{run:>10}: best val loss {meta['val_loss']:.4f} at step {meta['step']}")
PY
