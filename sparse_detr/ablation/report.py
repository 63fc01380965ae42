"""The ablation report, rebuilt from whatever ``result.json`` files the runs have written.

``ablation.csv``/``.md`` (one row per trained model), ``ap_vs_rho.png`` (AP against the keep ratio, one
line per token ranking), ``ap_vs_gflops.png`` (AP against cost, the baseline as reference) and, when a model
was evaluated at other keep ratios, ``inference_rho.csv``/``.md``/``.png``. Every file is written
atomically.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from sparse_detr.ablation.sweep import Run
from sparse_detr.utils.report import save_figure, write_table

RESULT_NAME = "result.json"
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
COLUMNS = ["ranking", "rho", "enc_aux_loss", *AP_KEYS, "gflops", "fps", "dam_coverage", "run"]
INFERENCE_COLUMNS = ["ranking", "train_rho", "eval_rho", "enc_aux_loss", *AP_KEYS, "gflops", "fps", "dam_coverage",
                     "run"]  # fmt: skip
_RANKING_ORDER = {"baseline": 0, "dam": 1, "oam": 2, "random": 3}
BASELINE_RHO = 1.0  # the baseline encodes every token


@dataclass
class AblationReport:
    """The tables written (AP and DAM coverage in %) and the paths of every file."""

    table: pd.DataFrame
    inference: pd.DataFrame
    files: list[Path] = field(default_factory=list)


def read_results(run_root: str | Path, runs: list[Run] | None = None) -> list[dict[str, Any]]:
    """The ``<run_root>/<run>/result.json`` of ``runs`` that exist (of every run when None), by run name.
    With ``runs``, each result keeps only the inference-time evaluations its run asks for."""
    paths = sorted(Path(run_root).glob(f"*/{RESULT_NAME}"))
    if runs is None:
        return [json.loads(path.read_text()) for path in paths]
    wanted = {run.name: set(run.eval_keep_ratios) for run in runs}
    results = []
    for path in paths:
        if path.parent.name in wanted:
            result = json.loads(path.read_text())
            wanted_here = wanted[result["run"]]
            result["evaluations"] = [e for e in result.get("evaluations", []) if e["keep_ratio"] in wanted_here]
            results.append(result)
    return results


def percent(value: float | None) -> float:
    return float("nan") if value is None else 100.0 * value


def _measurements(entry: dict[str, Any]) -> dict[str, float]:
    """AP columns and cost columns of one evaluation (a result, or one of its ``evaluations``)."""
    row = {key: percent(entry["metrics"].get(key)) for key in AP_KEYS}
    for key in ("gflops", "fps"):
        row[key] = float("nan") if entry.get(key) is None else float(entry[key])
    row["dam_coverage"] = percent(entry.get("dam_coverage"))
    return row


def _sorted(frame: pd.DataFrame, rho_column: str) -> pd.DataFrame:
    order = frame["ranking"].map(lambda ranking: _RANKING_ORDER.get(ranking, len(_RANKING_ORDER)))
    keys = frame.assign(_order=order, _aux=~frame["enc_aux_loss"])
    return keys.sort_values(["_order", "ranking", "_aux", rho_column]).drop(columns=["_order", "_aux"])


def ablation_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trained model, columns :data:`COLUMNS`."""
    rows = [
        {
            "ranking": result["ranking"],
            "rho": BASELINE_RHO if result["ranking"] == "baseline" else result["keep_ratio"],
            "enc_aux_loss": bool(result["enc_aux_loss"]),
            **_measurements(result),
            "run": result["run"],
        }
        for result in results
    ]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return _sorted(frame, "rho").reset_index(drop=True)


def inference_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, inference-time keep ratio), columns :data:`INFERENCE_COLUMNS`."""
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
    frame = pd.DataFrame(rows, columns=INFERENCE_COLUMNS)
    return _sorted(frame, "eval_rho").sort_values(["run", "eval_rho"], kind="stable").reset_index(drop=True)


def _series_label(ranking: str, enc_aux_loss: bool) -> str:
    return ranking.upper() + ("" if enc_aux_loss else ", no encoder aux loss")


def _sparse_series(table: pd.DataFrame):
    """(label, rows sorted by ρ) per (ranking, enc_aux_loss) of the sparse runs."""
    sparse = table[table["ranking"] != "baseline"]
    for (ranking, aux), rows in sparse.groupby(["ranking", "enc_aux_loss"], sort=False):
        yield _series_label(ranking, aux), rows.sort_values("rho")


def _baseline_line(axes, table: pd.DataFrame) -> None:
    baseline = table[table["ranking"] == "baseline"]
    if len(baseline):
        axes.axhline(baseline["AP"].iloc[0], color="gray", linestyle="--", label="baseline (every token encoded)")


def plot_ap_vs_rho(table: pd.DataFrame) -> Figure:
    """AP against the keep ratio ρ, one line per token ranking, the baseline as a horizontal line."""
    figure = Figure(figsize=(5.5, 4))
    axes = figure.subplots()
    for label, rows in _sparse_series(table):
        axes.plot(rows["rho"], rows["AP"], marker="o", label=label)
    _baseline_line(axes, table)
    axes.set(xlabel="keep ratio ρ (share of encoder tokens encoded)", ylabel="AP (%)", title="AP vs keep ratio")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def plot_ap_vs_gflops(table: pd.DataFrame) -> Figure:
    """AP against GFLOPs per image, each point labelled with its ρ; the baseline as point and line."""
    figure = Figure(figsize=(5.5, 4))
    axes = figure.subplots()
    for label, rows in _sparse_series(table):
        rows = rows.sort_values("gflops")
        axes.plot(rows["gflops"], rows["AP"], marker="o", label=label)
        for row in rows.itertuples():
            axes.annotate(f"ρ={row.rho:g}", (row.gflops, row.AP), textcoords="offset points", xytext=(4, 4),
                          fontsize="x-small")  # fmt: skip
    baseline = table[table["ranking"] == "baseline"]
    if len(baseline):
        axes.plot(baseline["gflops"], baseline["AP"], marker="s", color="gray", linestyle="none")
    _baseline_line(axes, table)
    axes.set(xlabel="GFLOPs per image", ylabel="AP (%)", title="AP vs computation")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def plot_inference_rho(inference: pd.DataFrame, table: pd.DataFrame) -> Figure:
    """AP of a model trained at one ρ and evaluated at others, next to models trained at each ρ."""
    figure = Figure(figsize=(5.5, 4))
    axes = figure.subplots()
    for _, rows in inference.groupby("run", sort=False):
        first = rows.iloc[0]
        series = _series_label(first["ranking"], first["enc_aux_loss"])
        line = axes.plot(
            rows["eval_rho"], rows["AP"], marker="o", label=f"{series} trained at ρ={first['train_rho']:g}"
        )
        axes.axvline(first["train_rho"], color=line[0].get_color(), linestyle=":", alpha=0.6)
        same = (table["ranking"] == first["ranking"]) & (table["enc_aux_loss"] == first["enc_aux_loss"])
        if same.sum() > 1:
            trained = table[same].sort_values("rho")
            style = {"marker": "x", "linestyle": "--", "color": line[0].get_color(), "alpha": 0.6}
            axes.plot(trained["rho"], trained["AP"], label=f"{series} trained at each ρ", **style)
    _baseline_line(axes, table)
    axes.set(xlabel="keep ratio ρ at inference", ylabel="AP (%)", title="Inference-time keep ratio")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def _notes(results: list[dict[str, Any]], run_root: Path) -> list[str]:
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
    measured = sorted({(r["measured_on"]["device"], r["measured_on"]["benchmark"]["batch_size"],
                        len(r["measured_on"]["image_sizes"])) for r in results})  # fmt: skip
    notes += [
        "AP: COCO box AP (pycocotools) in % on the validation split; APs/APm/APl by object area, nan where "
        "the split has no object of that size.",
        "baseline: the preset with every encoder token encoded (shown as ρ = 1), no scoring network and no "
        "encoder aux loss; the other runs encode the top ρ share of the tokens by their ranking "
        "(DAM: scoring network trained on the decoder attention map; OAM: objectness of a detection head; "
        "random: a random choice).",
        "gflops: fvcore count (one multiply-add = one FLOP) per image on the first validation images at the "
        "evaluation size; fps: images per second in eval mode "
        + "; ".join(f"on {device}, batch {batch}, {images} images" for device, batch, images in measured)
        + ".",
        "dam_coverage: share (%) of the decoder attention map (all decoder layers, heads, queries and points) "
        "that falls on the encoded tokens, mean over the validation images; nan when every token is encoded.",
        f"Built from the {len(results)} finished runs in {run_root} (their {RESULT_NAME}); "
        "`sdetr ablate` with the same experiment and options plus `--report-only` rebuilds it.",
    ]
    return notes


Log = Callable[[str], None]


def write_report(
    run_root: str | Path,
    report_dir: str | Path,
    runs: list[Run] | None = None,
    title: str = "Ablation",
    log: Log | None = None,
) -> AblationReport | None:
    """Rebuild the report in ``report_dir`` from the results of ``runs`` (every run when None) under
    ``run_root``; None when none has finished yet (nothing is written then)."""
    run_root, report_dir = Path(run_root), Path(report_dir)
    results = read_results(run_root, runs)
    if not results:
        if log is not None:
            log(f"no finished runs in {run_root} yet: no report written")
        return None
    table, inference = ablation_table(results), inference_table(results)
    notes = _notes(results, run_root)
    files = [*write_table(table, report_dir, "ablation", title=title, notes=notes, float_format=".2f")]
    files.append(save_figure(plot_ap_vs_rho(table), report_dir / "ap_vs_rho.png"))
    files.append(save_figure(plot_ap_vs_gflops(table), report_dir / "ap_vs_gflops.png"))
    if len(inference):
        inference_title = f"{title}: inference-time keep ratio"
        files += write_table(inference, report_dir, "inference_rho", title=inference_title, notes=notes,
                             float_format=".2f")  # fmt: skip
        files.append(save_figure(plot_inference_rho(inference, table), report_dir / "inference_rho.png"))
    if log is not None:
        log(f"report: {report_dir} ({len(results)} finished runs)")
    return AblationReport(table, inference, files)
