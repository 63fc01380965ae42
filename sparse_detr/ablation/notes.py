"""The prose notes under the ablation's tables: how the numbers were measured, and how to read the
intervals and the paired differences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from sparse_detr.ablation.stats import CONFIDENCE
from sparse_detr.ablation.tables import RESULT_NAME, learning_curve


def interval_note(table: pd.DataFrame) -> str:
    seeds = sorted(set(table["seeds"]))
    if seeds == [1]:
        return "One seed per variant: no interval can be given; train with --seeds 2 or more for intervals."
    return f"Error bars and bands: {CONFIDENCE:.0%} confidence intervals of the mean over seeds."


def report_notes(results: list[dict[str, Any]], table: pd.DataFrame, run_root: Path) -> list[str]:
    """What the numbers are and how the runs were made (from the results' stored settings)."""
    setups = sorted(
        {
            (
                r["settings"]["preset"],
                r["settings"]["model"]["backbone"],
                ", ".join(f"{k} {v}" for k, v in r["settings"]["data"].items()),
                r["settings"]["train"]["epochs"],
                r["settings"]["train"]["iters_per_epoch"],
                r["settings"]["train"]["image_size"],
            )
            for r in results
        },
        key=str,
    )
    notes = [
        f"preset {preset} ({backbone}); {data}; {epochs} epoch{'s' if epochs != 1 else ''}"
        + (f" of at most {iters} batches" if iters else "")
        + f"; evaluation size {size}"
        for preset, backbone, data, epochs, iters, size in setups
    ]
    seeds = sorted({r.get("seed") for r in results}, key=str)
    notes.append(
        f"seeds: {', '.join(map(str, seeds))}; each metric is the mean over the seeds a variant was trained "
        f"with, ± the half-width of its {CONFIDENCE:.0%} confidence interval (Student t with seeds − 1 degrees "
        "of freedom; ablation.csv has sd, ci_low, ci_high). "
        + ("With one seed no interval can be given. " if (table["seeds"] < 2).any() else "")
        + "comparisons.md gives the differences between variants paired by seed, with their intervals."
    )
    measured = sorted({
        (r["measured_on"]["device"], r["measured_on"]["benchmark"]["batch_size"], len(r["measured_on"]["image_sizes"]),
         r["measured_on"]["benchmark"]["iters"], r["measured_on"]["benchmark"]["warmup"])
        for r in results
    })  # fmt: skip
    notes += [
        "AP: COCO box AP (pycocotools) in % on the validation split; APs/APm/APl by object area, nan where "
        "the split has no object of that size.",
        "baseline: the preset with every encoder token encoded (shown as ρ = 1), no scoring network and no "
        "encoder aux loss; the other runs encode the top ρ share of the tokens by their ranking "
        "(DAM: scoring network trained on the decoder attention map; OAM: objectness of a detection head; "
        "foreground: the scoring network trained on Focus-DETR's scale-aware foreground targets; salience: on "
        "Salience-DETR's scale-independent salience targets; random: a random choice).",
        "gflops: fvcore count (one multiply-add = one FLOP) per image on the first validation images at the "
        "evaluation size, split into gflops_backbone, gflops_encoder (with the scoring network) and "
        "gflops_rest (input projections, two-stage proposals, decoder, heads).",
        "fps: images per second in eval mode, "
        + "; ".join(
            f"on {device}, batch {batch}, {images} images: the median of {iters} timed passes after {warmup} "
            "warm-up passes, each model loaded from its checkpoint and timed first after a garbage collection"
            for device, batch, images, iters, warmup in measured
        )
        + "; fps_q1/fps_q3: the quartiles of those passes (median over seeds).",
        "dam_coverage: share (%) of the decoder attention map (all decoder layers, heads, queries and points) "
        "that falls on the encoded tokens, mean over the validation images; nan when every token is encoded.",
    ]
    curve = learning_curve(results)
    if len(curve) > 1:
        points = ", ".join(f"{epoch}: {ap:.1f}" for epoch, ap in curve.items())
        notes.append(f"baseline AP by epoch (mean over seeds): {points}.")
    notes.append(
        f"Built from the {len(results)} finished runs in {run_root} (their {RESULT_NAME}); "
        "`sdetr ablate` with the same experiment and options plus `--report-only` rebuilds it."
    )
    return notes


def comparison_notes(comparisons: pd.DataFrame) -> list[str]:
    notes = [
        "difference: variant a − variant b (the comparison's first and second run), in points of AP or DAM "
        "coverage, mean over the seeds both were trained with; sd, ci_low, ci_high: the standard deviation and "
        f"{CONFIDENCE:.0%} confidence interval of the per-seed differences (Student t).",
        "excludes_zero: yes when the interval lies on one side of zero (the difference is unlikely to be seed "
        "noise), no when it contains zero (this ablation cannot tell the two apart), no interval with one seed.",
    ]
    if len(comparisons) == 0:
        notes.append("No pair of variants to compare: train a baseline or several variants at one ρ.")
    return notes
