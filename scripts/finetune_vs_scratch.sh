#!/usr/bin/env bash
# Fine-tuning against training from scratch, at CPU scale (docs/PERFORMANCE.md, "Fine-tuning").
#
# The checkpoint of the default `sdetr train` (runs/tiny: six shape classes) is fine-tuned with --init on a
# second built-in dataset with other classes (three shared with it: triangle, star, ring; three new: hexagon,
# diamond, arrow; another seed, 200 training images), against the same budget from scratch. Both runs use the
# tiny preset's recipe; each evaluates after every epoch. The AP curves go to reports/finetune/.
#
#   sdetr train && scripts/finetune_vs_scratch.sh          # about 8 minutes on 2 CPU cores after training
#
# Paths are relative to the current folder, as for sdetr itself.
set -euo pipefail
HERE=$(dirname "$0")
SDETR=${SDETR:-sdetr}
PYTHON=${PYTHON:-python}
CHECKPOINT=${CHECKPOINT:-runs/tiny}
DATA=${DATA:-data/synth-other}
EPOCHS=${EPOCHS:-10}
RUNS=${RUNS:-runs/finetune}

"$SDETR" data synth --out "$DATA" --classes triangle,star,ring,hexagon,diamond,arrow --seed 1 \
    --num-train 200 --num-val 100
"$SDETR" train --init "$CHECKPOINT" --data "$DATA" --epochs "$EPOCHS" --output-dir "$RUNS/fine-tuned"
"$SDETR" train --preset tiny --data "$DATA" --epochs "$EPOCHS" --output-dir "$RUNS/scratch"
"$PYTHON" "$HERE/ap_curves.py" "$RUNS/scratch" "$RUNS/fine-tuned" --out reports/finetune \
    --title "Fine-tuning the default tiny checkpoint on other classes, against training from scratch"
