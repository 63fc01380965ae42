"""The ablation report, rebuilt from whatever ``result.json`` files the runs have written.

- ``runs.csv``/``.md``: one row per trained model (a variant and a seed), as measured.
- ``ablation.csv``/``.md``: one row per variant: per measurement the mean over seeds, its standard deviation
  and 95 % confidence interval (:mod:`~sparse_detr.ablation.stats`); GFLOPs by backbone, encoder and rest;
  FPS as the median over seeds of each run's median pass, with the quartiles of the passes.
- ``comparisons.csv``/``.md``: the paper's comparisons as paired-by-seed differences with their intervals:
  each variant against the dense baseline, the token rankings against each other at the same ρ, and with
  against without the encoder aux loss.
- ``ap_vs_rho.png``, ``ap_vs_gflops.png`` (error bars: the 95 % intervals) and, when a model was evaluated
  at other keep ratios, ``inference_rho.csv``/``.md``/``.png``.

Every file is written atomically.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from sparse_detr.ablation.stats import CONFIDENCE, mean_interval, paired_difference
from sparse_detr.ablation.sweep import Run
from sparse_detr.utils.report import save_figure, write_table

logger = logging.getLogger(__name__)

RESULT_NAME = "result.json"
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# measured per run and summarized over seeds with an interval
METRICS = (*AP_KEYS, "dam_coverage")
GFLOP_KEYS = ("gflops", "gflops_backbone", "gflops_encoder", "gflops_rest")
FPS_KEYS = ("fps", "fps_q1", "fps_q3")
VARIANT_KEYS = ["ranking", "rho", "enc_aux_loss"]
RUN_COLUMNS = [*VARIANT_KEYS, "seed", *METRICS, *GFLOP_KEYS, *FPS_KEYS, "run"]
SUMMARY_SUFFIXES = ("", "_sd", "_ci_low", "_ci_high")
COLUMNS = [
    *VARIANT_KEYS,
    "seeds",
    *(f"{metric}{suffix}" for metric in METRICS for suffix in SUMMARY_SUFFIXES),
    *GFLOP_KEYS,
    *FPS_KEYS,
    "run",
]
COMPARISON_COLUMNS = ["comparison", "kind", "metric", "seeds", "difference", "sd", "ci_low", "ci_high",
                      "excludes_zero"]  # fmt: skip
INFERENCE_COLUMNS = [
    "ranking",
    "train_rho",
    "eval_rho",
    "enc_aux_loss",
    "seeds",
    *(f"{metric}{suffix}" for metric in METRICS for suffix in SUMMARY_SUFFIXES),
    *GFLOP_KEYS,
    *FPS_KEYS,
    "run",
]
_RANKING_ORDER = {"baseline": 0, "dam": 1, "oam": 2, "random": 3}
BASELINE_RHO = 1.0  # the baseline encodes every token


@dataclass
class AblationReport:
    """The tables written (AP and DAM coverage in %) and the paths of every file."""

    table: pd.DataFrame
    comparisons: pd.DataFrame
    inference: pd.DataFrame
    runs: pd.DataFrame
    files: list[Path] = field(default_factory=list)


def read_results(run_root: str | Path, runs: list[Run] | None = None) -> list[dict[str, Any]]:
    """The ``<run_root>/<variant>/seed<N>/result.json`` of ``runs`` that exist (of every run when None).
    With ``runs``, each result keeps only the inference-time evaluations its run asks for."""
    paths = sorted(Path(run_root).glob(f"*/seed*/{RESULT_NAME}"))
    if runs is None:
        return [json.loads(path.read_text()) for path in paths]
    wanted = {run.folder: set(run.eval_keep_ratios) for run in runs}
    results = []
    for path in paths:
        folder = f"{path.parent.parent.name}/{path.parent.name}"
        if folder in wanted:
            result = json.loads(path.read_text())
            result["evaluations"] = [e for e in result.get("evaluations", []) if e["keep_ratio"] in wanted[folder]]
            results.append(result)
    return results


def percent(value: float | None) -> float:
    return float("nan") if value is None else 100.0 * value


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _measurements(entry: dict[str, Any]) -> dict[str, float]:
    """AP, DAM coverage (%) and cost columns of one evaluation (a result, or one of its ``evaluations``)."""
    row = {key: percent(entry["metrics"].get(key)) for key in AP_KEYS}
    row["dam_coverage"] = percent(entry.get("dam_coverage"))
    row.update({key: _number(entry.get(key)) for key in (*GFLOP_KEYS, *FPS_KEYS)})
    return row


def _variant(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "ranking": result["ranking"],
        "rho": BASELINE_RHO if result["ranking"] == "baseline" else result["keep_ratio"],
        "enc_aux_loss": bool(result["enc_aux_loss"]),
    }


def _sorted(frame: pd.DataFrame, rho_column: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    order = frame["ranking"].map(lambda ranking: _RANKING_ORDER.get(ranking, len(_RANKING_ORDER)))
    keys = frame.assign(_order=order, _aux=~frame["enc_aux_loss"].astype(bool))
    columns = ["_order", "ranking", "_aux", rho_column, *extra]
    return keys.sort_values(columns).drop(columns=["_order", "_aux"]).reset_index(drop=True)


def runs_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trained model (variant and seed), columns :data:`RUN_COLUMNS`."""
    rows = [
        {**_variant(result), "seed": result.get("seed"), **_measurements(result), "run": result["run"]}
        for result in results
    ]
    return _sorted(pd.DataFrame(rows, columns=RUN_COLUMNS), "rho", ("seed",))


def _summary(rows: pd.DataFrame) -> dict[str, Any]:
    """Mean, sd and interval over seeds of each metric, mean GFLOPs and median FPS of a variant's rows."""
    summary: dict[str, Any] = {"seeds": len(rows)}
    for metric in METRICS:
        interval = mean_interval(rows[metric].tolist())
        values = (interval.mean, interval.sd, interval.low, interval.high)
        summary.update({f"{metric}{suffix}": value for suffix, value in zip(SUMMARY_SUFFIXES, values)})
    summary.update({key: rows[key].mean() for key in GFLOP_KEYS})
    summary.update({key: rows[key].median() for key in FPS_KEYS})
    return summary


def ablation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (from :func:`runs_table`), columns :data:`COLUMNS`."""
    rows = [
        {**dict(zip(VARIANT_KEYS, key)), **_summary(group), "run": group["run"].iloc[0]}
        for key, group in runs.groupby(VARIANT_KEYS, sort=False)
    ]
    return _sorted(pd.DataFrame(rows, columns=COLUMNS), "rho")


def _comparison_pairs(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(kind, variant a, variant b) for each comparison the paper makes that the variants allow."""
    names = set(table["run"])
    pairs = [("against the baseline", run, "baseline") for run in table["run"] if run != "baseline"]
    pairs = pairs if "baseline" in names else []
    sparse = table[table["ranking"] != "baseline"]
    for _, group in sparse.groupby(["rho", "enc_aux_loss"], sort=False):  # same ρ and aux loss
        ordered = _sorted(group, "rho")["run"].tolist()
        pairs += [("token ranking", a, b) for a, b in combinations(ordered, 2)]
    for row in sparse[~sparse["enc_aux_loss"].astype(bool)].itertuples():
        with_aux = row.run.removesuffix("-noaux")
        if with_aux in names:
            pairs.append(("encoder aux loss", with_aux, row.run))
    return pairs


def comparisons_table(runs: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Paired-by-seed differences (a − b, in AP points or coverage points) of the variant pairs of
    :func:`_comparison_pairs` for every metric both have, columns :data:`COMPARISON_COLUMNS`."""
    by_seed = {run: group.set_index("seed") for run, group in runs.groupby("run")}
    rows = []
    for kind, a, b in _comparison_pairs(table):
        for metric in METRICS:
            interval = paired_difference(by_seed[a][metric].to_dict(), by_seed[b][metric].to_dict())
            if interval.n == 0:  # e.g. the DAM coverage of the baseline, which encodes every token
                continue
            rows.append({
                "comparison": f"{a} − {b}", "kind": kind, "metric": metric, "seeds": interval.n,
                "difference": interval.mean, "sd": interval.sd, "ci_low": interval.low, "ci_high": interval.high,
                "excludes_zero": interval.excludes_zero,
            })  # fmt: skip
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def inference_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, inference-time keep ratio), summarized over seeds, columns :data:`INFERENCE_COLUMNS`."""
    rows = [
        {
            "ranking": result["ranking"],
            "train_rho": result["keep_ratio"],
            "eval_rho": entry["keep_ratio"],
            "enc_aux_loss": bool(result["enc_aux_loss"]),
            **_measurements(entry),
            "run": result["run"],
        }
        for result in results
        for entry in result.get("evaluations", [])
    ]
    if not rows:
        return pd.DataFrame(columns=INFERENCE_COLUMNS)
    keys = ["run", "ranking", "train_rho", "eval_rho", "enc_aux_loss"]
    summary = [{**dict(zip(keys, key)), **_summary(group)} for key, group in pd.DataFrame(rows).groupby(keys)]
    frame = pd.DataFrame(summary, columns=INFERENCE_COLUMNS)
    return _sorted(frame, "eval_rho").sort_values(["run", "eval_rho"], kind="stable").reset_index(drop=True)


def _with_interval(mean: float, low: float, high: float) -> str:
    """``35.21 ± 1.30`` (the interval's half-width), ``35.21`` without an interval, ``nan`` without a value."""
    if math.isnan(mean):
        return "nan"
    return f"{mean:.2f}" if math.isnan(low) else f"{mean:.2f} ± {(high - low) / 2:.2f}"


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """A summary table for reading: each metric as ``mean ± half-width of its interval``."""
    frame = table.copy()
    for metric in METRICS:
        frame[metric] = [
            _with_interval(*values)
            for values in zip(frame[metric], frame[f"{metric}_ci_low"], frame[f"{metric}_ci_high"])
        ]
        frame = frame.drop(columns=[f"{metric}{suffix}" for suffix in SUMMARY_SUFFIXES[1:]])
    return frame


def readable_comparisons(comparisons: pd.DataFrame) -> pd.DataFrame:
    frame = comparisons.copy()
    frame["excludes_zero"] = frame["excludes_zero"].map({True: "yes", False: "no"}).fillna("no interval")
    return frame


def _error(rows: pd.DataFrame, metric: str = "AP") -> list[float]:
    """The half-widths of ``metric``'s intervals (0 where there is none), for error bars."""
    half = (rows[f"{metric}_ci_high"] - rows[f"{metric}_ci_low"]) / 2
    return half.fillna(0.0).tolist()


def _series_label(ranking: str, enc_aux_loss: bool) -> str:
    return ranking.upper() + ("" if enc_aux_loss else ", no encoder aux loss")


def _sparse_series(table: pd.DataFrame):
    """(label, rows sorted by ρ) per (ranking, enc_aux_loss) of the sparse variants."""
    sparse = table[table["ranking"] != "baseline"]
    for (ranking, aux), rows in sparse.groupby(["ranking", "enc_aux_loss"], sort=False):
        yield _series_label(ranking, aux), rows.sort_values("rho")


def _baseline_band(axes, table: pd.DataFrame) -> None:
    """The baseline's AP as a dashed line, its interval as a band."""
    baseline = table[table["ranking"] == "baseline"]
    if len(baseline):
        row = baseline.iloc[0]
        axes.axhline(row["AP"], color="gray", linestyle="--", label="baseline (every token encoded)")
        if not math.isnan(row["AP_ci_low"]):
            axes.axhspan(row["AP_ci_low"], row["AP_ci_high"], color="gray", alpha=0.15)


def _seed_points(axes, runs: pd.DataFrame | None, x: str) -> None:
    """Every run's AP as a small dot at its variant's ``x``: what the means and intervals summarize."""
    if runs is not None and len(runs):
        axes.plot(runs[x], runs["AP"], ".", color="black", alpha=0.35, markersize=4, label="one seed")


def _interval_note(table: pd.DataFrame) -> str:
    seeds = sorted(set(table["seeds"]))
    if seeds == [1]:
        return "One seed per variant: no interval can be given; train with --seeds 2 or more for intervals."
    return f"Error bars and bands: {CONFIDENCE:.0%} confidence intervals of the mean over seeds."


def plot_ap_vs_rho(table: pd.DataFrame, runs: pd.DataFrame | None = None) -> Figure:
    """AP against the keep ratio ρ, one line per token ranking, the baseline as a horizontal line; ``runs``
    (:func:`runs_table`) adds each seed's AP."""
    figure = Figure(figsize=(5.5, 4))
    axes = figure.subplots()
    for label, rows in _sparse_series(table):
        axes.errorbar(rows["rho"], rows["AP"], yerr=_error(rows), marker="o", capsize=3, label=label)
    _seed_points(axes, None if runs is None else runs[runs["ranking"] != "baseline"], "rho")
    _baseline_band(axes, table)
    axes.set(xlabel="keep ratio ρ (share of encoder tokens encoded)", ylabel="AP (%)", title="AP vs keep ratio")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", title=_interval_note(table), title_fontsize="xx-small")
    return figure


def plot_ap_vs_gflops(table: pd.DataFrame, runs: pd.DataFrame | None = None) -> Figure:
    """AP against GFLOPs per image, each point labelled with its ρ; the baseline as point and line; ``runs``
    (:func:`runs_table`) adds each seed's AP."""
    figure = Figure(figsize=(5.5, 4))
    axes = figure.subplots()
    for label, rows in _sparse_series(table):
        rows = rows.sort_values("gflops")
        axes.errorbar(rows["gflops"], rows["AP"], yerr=_error(rows), marker="o", capsize=3, label=label)
        for row in rows.itertuples():
            axes.annotate(f"ρ={row.rho:g}", (row.gflops, row.AP), textcoords="offset points", xytext=(4, 4),
                          fontsize="x-small")  # fmt: skip
    baseline = table[table["ranking"] == "baseline"]
    if len(baseline):
        axes.errorbar(baseline["gflops"], baseline["AP"], yerr=_error(baseline), marker="s", color="gray",
                      linestyle="none", capsize=3)  # fmt: skip
    _seed_points(axes, runs, "gflops")
    _baseline_band(axes, table)
    axes.set(xlabel="GFLOPs per image", ylabel="AP (%)", title="AP vs computation")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", title=_interval_note(table), title_fontsize="xx-small")
    return figure


def plot_inference_rho(inference: pd.DataFrame, table: pd.DataFrame) -> Figure:
    """AP of a model trained at one ρ and evaluated at others, next to models trained at each ρ."""
    figure = Figure(figsize=(5.5, 4))
    axes = figure.subplots()
    for _, rows in inference.groupby("run", sort=False):
        first = rows.iloc[0]
        series = _series_label(first["ranking"], first["enc_aux_loss"])
        line = axes.errorbar(rows["eval_rho"], rows["AP"], yerr=_error(rows), marker="o", capsize=3,
                             label=f"{series} trained at ρ={first['train_rho']:g}")  # fmt: skip
        color = line[0].get_color()
        axes.axvline(first["train_rho"], color=color, linestyle=":", alpha=0.6)
        same = (table["ranking"] == first["ranking"]) & (table["enc_aux_loss"] == first["enc_aux_loss"])
        if same.sum() > 1:
            trained = table[same].sort_values("rho")
            style = {"marker": "x", "linestyle": "--", "color": color, "alpha": 0.6}
            axes.plot(trained["rho"], trained["AP"], label=f"{series} trained at each ρ", **style)
    _baseline_band(axes, table)
    axes.set(xlabel="keep ratio ρ at inference", ylabel="AP (%)", title="Inference-time keep ratio")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", title=_interval_note(table), title_fontsize="xx-small")
    return figure


def learning_curve(results: list[dict[str, Any]], run: str = "baseline") -> dict[int, float]:
    """AP (%) by evaluated epoch of ``run``, mean over its seeds: does it plateau within its schedule?"""
    # JSON keys are strings
    curves = [{int(epoch): ap for epoch, ap in r.get("ap_by_epoch", {}).items()} for r in results if r["run"] == run]
    epochs = sorted({epoch for curve in curves for epoch in curve})
    return {epoch: mean_interval([percent(curve.get(epoch)) for curve in curves]).mean for epoch in epochs}


def _notes(results: list[dict[str, Any]], table: pd.DataFrame, run_root: Path) -> list[str]:
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
        "random: a random choice).",
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


def write_report(
    run_root: str | Path,
    report_dir: str | Path,
    runs: list[Run] | None = None,
    title: str = "Ablation",
) -> AblationReport | None:
    """Rebuild the report in ``report_dir`` from the results of ``runs`` (every run when None) under
    ``run_root``; None when none has finished yet (nothing is written then)."""
    run_root, report_dir = Path(run_root), Path(report_dir)
    results = read_results(run_root, runs)
    if not results:
        logger.info(f"no finished runs in {run_root} yet: no report written")
        return None
    per_run = runs_table(results)
    table = ablation_table(per_run)
    comparisons = comparisons_table(per_run, table)
    inference = inference_table(results)
    notes = _notes(results, table, run_root)
    files = [
        *write_table(table, report_dir, "ablation", title=title, notes=notes, float_format=".2f",
                     markdown=readable(table)),
        *write_table(comparisons, report_dir, "comparisons", title=f"{title}: paired differences",
                     notes=_comparison_notes(comparisons), float_format=".2f",
                     markdown=readable_comparisons(comparisons)),
        *write_table(per_run, report_dir, "runs", title=f"{title}: every run", float_format=".2f"),
        save_figure(plot_ap_vs_rho(table, per_run), report_dir / "ap_vs_rho.png"),
        save_figure(plot_ap_vs_gflops(table, per_run), report_dir / "ap_vs_gflops.png"),
    ]  # fmt: skip
    if len(inference):
        files += write_table(inference, report_dir, "inference_rho", title=f"{title}: inference-time keep ratio",
                             notes=notes, float_format=".2f", markdown=readable(inference))  # fmt: skip
        files.append(save_figure(plot_inference_rho(inference, table), report_dir / "inference_rho.png"))
    single = " (one seed: no intervals)" if (table["seeds"] < 2).all() else ""
    logger.info(f"report: {report_dir} ({len(results)} finished runs){single}")
    return AblationReport(table, comparisons, inference, per_run, files)


def _comparison_notes(comparisons: pd.DataFrame) -> list[str]:
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
