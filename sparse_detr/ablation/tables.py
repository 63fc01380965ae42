"""The ablation's tables, from the runs' ``result.json`` files: one row per run (:func:`runs_table`), one per
variant with means and 95 % intervals over seeds (:func:`ablation_table`), the paper's comparisons as paired
differences (:func:`comparisons_table`), the inference-time keep ratio sweep (:func:`inference_table`), and
their readable forms (``mean ± half-width``)."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd

from sparse_detr.ablation.stats import mean_interval, paired_difference
from sparse_detr.ablation.sweep import Run

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
_RANKING_ORDER = {"baseline": 0, "dam": 1, "oam": 2, "foreground": 3, "salience": 4, "random": 5}
BASELINE_RHO = 1.0  # the baseline encodes every token


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


def learning_curve(results: list[dict[str, Any]], run: str = "baseline") -> dict[int, float]:
    """AP (%) by evaluated epoch of ``run``, mean over its seeds: does it plateau within its schedule?"""
    # JSON keys are strings
    curves = [{int(epoch): ap for epoch, ap in r.get("ap_by_epoch", {}).items()} for r in results if r["run"] == run]
    epochs = sorted({epoch for curve in curves for epoch in curve})
    return {epoch: mean_interval([percent(curve.get(epoch)) for curve in curves]).mean for epoch in epochs}
