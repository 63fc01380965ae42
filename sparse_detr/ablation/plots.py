"""The ablation's figures: AP against ρ and against GFLOPs (the dense baseline as a band, every seed as a
point, error bars the 95 % intervals), and AP against the inference-time keep ratio."""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

from sparse_detr.ablation.notes import interval_note


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
    axes.legend(fontsize="small", title=interval_note(table), title_fontsize="xx-small")
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
    axes.legend(fontsize="small", title=interval_note(table), title_fontsize="xx-small")
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
    axes.legend(fontsize="small", title=interval_note(table), title_fontsize="xx-small")
    return figure
