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

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sparse_detr.ablation.notes import comparison_notes, report_notes
from sparse_detr.ablation.plots import plot_ap_vs_gflops, plot_ap_vs_rho, plot_inference_rho
from sparse_detr.ablation.sweep import Run
from sparse_detr.ablation.tables import (
    ablation_table,
    comparisons_table,
    inference_table,
    read_results,
    readable,
    readable_comparisons,
    runs_table,
)
from sparse_detr.utils.report import save_figure, write_table

logger = logging.getLogger(__name__)


@dataclass
class AblationReport:
    """The tables written (AP and DAM coverage in %) and the paths of every file."""

    table: pd.DataFrame
    comparisons: pd.DataFrame
    inference: pd.DataFrame
    runs: pd.DataFrame
    files: list[Path] = field(default_factory=list)


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
    notes = report_notes(results, table, run_root)
    files = [
        *write_table(table, report_dir, "ablation", title=title, notes=notes, float_format=".2f",
                     markdown=readable(table)),
        *write_table(comparisons, report_dir, "comparisons", title=f"{title}: paired differences",
                     notes=comparison_notes(comparisons), float_format=".2f",
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
