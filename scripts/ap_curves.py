"""Per-epoch COCO AP of training runs, as one table (ap_curves.csv/.md) and one plot (ap_curves.png).

    python scripts/ap_curves.py runs/finetune/scratch runs/finetune/fine-tuned --out reports/finetune

Each run folder's ``eval_epoch{N}.json`` files (what ``sdetr train`` writes after every evaluated epoch) give
its curve; a run is named by its folder.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sparse_detr.utils.report import save_figure, write_table  # noqa: E402


def ap_curve(run: Path) -> pd.DataFrame:
    """One row per evaluated epoch of ``run``: epoch, AP, AP50, AP75 (in %)."""
    rows = []
    for path in run.glob("eval_epoch*.json"):
        result = json.loads(path.read_text())
        epoch = int(re.fullmatch(r"eval_epoch(\d+)\.json", path.name)[1])
        rows.append({"epoch": epoch, **{key: 100 * (result[key] or 0.0) for key in ("AP", "AP50", "AP75")}})
    if not rows:
        raise SystemExit(f"{run} holds no eval_epoch*.json: train it first")
    return pd.DataFrame(rows).sort_values("epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--out", type=Path, default=Path("reports/ap_curves"), help="report folder")
    parser.add_argument("--title", default="AP per epoch")
    args = parser.parse_args()

    curves = {run.name: ap_curve(run) for run in args.runs}
    table = pd.concat([curve.assign(run=name) for name, curve in curves.items()])
    table = table.pivot(index="epoch", columns="run", values=["AP", "AP50"])
    table.columns = [f"{metric} {run}" for metric, run in table.columns]
    table.index = table.index.map(str)  # an epoch is no float
    paths = write_table(table.reset_index(), args.out, "ap_curves", args.title, ["AP and AP50 in %, COCO box AP"],
                        float_format=".1f")  # fmt: skip

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        axis.plot(curve["epoch"], curve["AP"], marker="o", label=name)
    axis.set(xlabel="epoch", ylabel="AP (%)", title=args.title)
    axis.title.set_fontsize(9)
    axis.grid(alpha=0.3)
    axis.legend()
    paths += (save_figure(figure, args.out / "ap_curves.png"),)
    print("wrote " + ", ".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
