"""The benchmark's figures: GFLOPs and images per second against the keep ratio ρ, a line per preset (and
per batch size)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sparse_detr.utils.report import save_figure


def fps_columns_of(frame: pd.DataFrame) -> list[str]:
    """``fps_bs{b}`` columns by batch size."""
    columns = [c for c in frame.columns if c.startswith("fps_bs") and c[6:].isdigit()]
    return sorted(columns, key=lambda column: int(column[6:]))


def _draw(axis, frame: pd.DataFrame, columns: list[str], batch_labels: bool) -> None:
    """Sparse models as lines over ρ, the others as horizontal lines; one colour per column when there
    are several (batch sizes), else one per model."""
    sparse, dense = frame[frame["rho"].notna()], frame[frame["rho"].isna()]
    model_keys = ["backbone", "checkpoint"] if "checkpoint" in frame else ["backbone"]
    groups = list(sparse.groupby(model_keys))
    for column_index, column in enumerate(columns):
        suffix = f", batch {column.removeprefix('fps_bs')}" if batch_labels else ""
        for line, (key, group) in enumerate(groups):
            group = group.sort_values("rho")
            color = f"C{column_index if len(columns) > 1 else line}"
            axis.plot(group["rho"], group[column], marker="o", color=color, label=f"sparse {' '.join(key)}{suffix}")
            if column == "gflops" and group["gflops_reference"].notna().any():
                label = "reference code (without aux heads)" if line == 0 else None
                axis.plot(group["rho"], group["gflops_reference"], "x", color="black", label=label)
        for index, row in enumerate(dense.itertuples()):
            color = f"C{column_index if len(columns) > 1 else len(groups) + index}"
            axis.axhline(getattr(row, column), linestyle=("--", ":", "-.")[index % 3], color=color,
                         label=f"{row.preset} {row.backbone}{suffix}")  # fmt: skip


def plot_benchmark(frame: pd.DataFrame, directory: str | Path) -> list[Path]:
    """``gflops_vs_rho.png`` and ``fps_vs_rho.png`` (for the measurements the frame holds): sparse models
    against ρ, models without sparsity (the Deformable DETR baselines) as horizontal reference lines, and the
    reference code's GFLOPs as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    plots = [(["gflops"] if "gflops" in frame else [], "GFLOPs", "gflops_vs_rho.png")]
    plots.append((fps_columns_of(frame), "images / s", "fps_vs_rho.png"))
    for columns, label, filename in plots:
        if not columns:
            continue
        figure, axis = plt.subplots(figsize=(6.4, 4.2))
        _draw(axis, frame, columns, batch_labels=filename.startswith("fps"))
        keep_ratios = frame["rho"].dropna()
        axis.set_xlim(0, max(0.55, keep_ratios.max() + 0.05) if len(keep_ratios) else 1)
        axis.set_ylim(bottom=0)
        axis.set_xlabel("keep ratio ρ")
        axis.set_ylabel(label)
        axis.set_title(f"{label} against the keep ratio")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        paths.append(save_figure(figure, Path(directory) / filename))
        plt.close(figure)
    return paths
