"""Ablations: a sweep of token-sparsity variants (:mod:`~sparse_detr.ablation.sweep`), trained and measured
run by run (:mod:`~sparse_detr.ablation.runner`), and one report rebuilt from the finished runs
(:mod:`~sparse_detr.ablation.report`)."""

from sparse_detr.ablation.report import AblationReport, write_report
from sparse_detr.ablation.runner import run_ablation, write_sweep_report
from sparse_detr.ablation.sweep import (
    DEFAULT_SWEEP_FILE,
    Run,
    Sweep,
    SweepError,
    default_sweep,
    load_sweep,
    parse_shard,
    resolve_sweep,
)

__all__ = [
    "DEFAULT_SWEEP_FILE",
    "AblationReport",
    "Run",
    "Sweep",
    "SweepError",
    "default_sweep",
    "load_sweep",
    "parse_shard",
    "resolve_sweep",
    "run_ablation",
    "write_report",
    "write_sweep_report",
]
