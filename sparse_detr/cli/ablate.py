"""``sdetr ablate``."""

from __future__ import annotations

from pathlib import Path

import typer

from sparse_detr.cli._app import app, command, console, parse_list, plain, print_frame
from sparse_detr.config import TOKEN_RANKINGS


@command(app)
def ablate(
    experiment: Path | None = typer.Argument(None, help="Sweep file (experiments/*.toml); default: the built-in one."),
    rankings: str | None = typer.Option(
        None,
        "--criterion",
        "--ranking",
        help=f"Comma-separated criteria the scoring network learns to rank tokens by: {', '.join(TOKEN_RANKINGS)}.",
    ),
    keep_ratios: str | None = typer.Option(None, "--rho", help="Comma-separated keep ratios to train at."),
    preset: str | None = typer.Option(None, help="Model preset (without a file: tiny, the default ablation)."),
    backbone: str | None = typer.Option(None, help="Backbone instead of the preset's (r50, swin-t, resnet18...)."),
    data: Path | None = typer.Option(None, help="Dataset folder: COCO 2017 (train2017/, val2017/, annotations/)."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs of every run."),
    iters_per_epoch: int | None = typer.Option(None, min=1, help="Cap on batches per epoch (quick runs)."),
    baseline: bool | None = typer.Option(None, "--baseline/--no-baseline", help="Train the unsparsified baseline."),
    random: bool | None = typer.Option(None, "--random/--no-random", help="Also random tokens at each ρ."),
    no_enc_aux: bool | None = typer.Option(None, "--no-enc-aux", help="Also each run without the encoder aux loss."),
    eval_keep_ratios: str | None = typer.Option(
        None, "--eval-rho", help="Comma-separated keep ratios for the inference-time sweep (none: no sweep)."
    ),
    eval_train_keep_ratio: float | None = typer.Option(
        None, "--eval-train-rho", help="Keep ratio of the inference-time sweep's model."
    ),
    seed_count: int | None = typer.Option(
        None, "--seeds", min=1, help="Train every variant with N seeds (for confidence intervals)."
    ),
    name: str | None = typer.Option(None, help="Sweep name: reports/<name>, runs/ablate/<name>."),
    output: Path | None = typer.Option(None, help="Report folder (default reports/<name>)."),
    runs_dir: Path | None = typer.Option(None, help="Folder of the run folders (default runs/ablate/<name>)."),
    shard: str | None = typer.Option(None, help="I/N: run only the runs at positions p with p % N == I."),
    report_only: bool = typer.Option(False, "--report-only", help="Only rebuild the report from finished runs."),
    status: bool = typer.Option(
        False, "--status", help="Only say where each run stands (done, running, interrupted, not started)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Write into --name's report folder even though it holds another sweep's report."
    ),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:I (default: cuda when available)."),
    workers: int | None = typer.Option(None, min=0, help="Data loading processes."),
) -> None:
    """Train and compare token-sparsity variants: keep ratios, DAM/OAM/random token selection criteria, the
    encoder aux loss.

    One variant per (criterion, ρ), plus the baseline and the inference-time sweep, each trained once per
    seed; each run is measured (COCO AP, GFLOPs by part, FPS, DAM coverage) into its result.json, and the
    report (ablation.csv/.md with 95 % intervals over seeds, comparisons.csv/.md with paired differences,
    plots) is rebuilt from the finished runs. The plan (runs, epochs, which variants come from the file or the
    default and how to drop them) is printed first, and the time left once the first epoch is measured.
    Re-running skips finished runs and resumes interrupted ones. With no file: the default ablation
    (sparse_detr/ablation/default.toml), or with --preset that preset's own recipe at ρ 0.1...0.5; options
    change either. A sweep whose report folder holds another sweep's report goes to a new numbered name
    (default-2, ...) unless --name or --output chooses the folder.
    """
    changes = dict(locals())  # the options named after sweep fields, taken before anything else
    for option in ("experiment", "shard", "report_only", "status", "force"):
        del changes[option]
    from sparse_detr.ablation import SweepError, parse_shard, resolve_sweep, run_ablation, write_sweep_report
    from sparse_detr.ablation.runner import claim_report_folder, place_sweep

    for key, kind, option in (("rankings", str, "--criterion"), ("keep_ratios", float, "--rho"),
                              ("eval_keep_ratios", float, "--eval-rho")):  # fmt: skip
        if changes[key] is not None and changes[key].strip().lower() == "none":
            changes[key] = ()
        elif changes[key] is not None:
            changes[key] = tuple(parse_list(changes[key], kind, option) or ()) or None
    asked = {key for key, value in changes.items() if value is not None}
    sweep = resolve_sweep(experiment, **plain(changes))
    chosen = name is not None or output is not None
    if status:
        from sparse_detr.ablation.status import sweep_status

        sweep = place_sweep(sweep, chosen=chosen, force=force)
        table = sweep_status(sweep)
        for column in ("epoch", "iteration", "step"):  # whole numbers, "-" where the run has none yet
            table[column] = [str(int(value)) if value == value else "-" for value in table[column]]
        done = (table["state"] == "done").sum()
        print_frame(table.drop(columns="folder"), f"ablation {sweep.name}: {done} of {len(table)} runs done")
        console.print(f"run folders: {sweep.run_root}/<run>/seed<N>", highlight=False, soft_wrap=True)
        return
    if report_only:
        report = write_sweep_report(sweep)
        if report is None:
            raise SweepError(f"no finished runs of {sweep.name} in {sweep.run_root}: run the sweep first")
    else:
        sweep = claim_report_folder(sweep, chosen=chosen, force=force)
        source = str(experiment) if experiment else "the default (sparse_detr/ablation/default.toml)"
        report = run_ablation(sweep, parse_shard(shard) if shard else (0, 1), source=source, asked=asked)
    if report is not None:  # the columns that fit a terminal; the report files have them all
        from sparse_detr.ablation.tables import readable, readable_comparisons

        columns = ["AP", "AP50", "AP75", "dam_coverage", "gflops", "gflops_encoder", "fps"]
        table = readable(report.table)[["run", "seeds", *columns]]
        print_frame(table, f"ablation {sweep.name} (AP and DAM coverage in %, ± 95 % interval over seeds)")
        compared = report.comparisons[report.comparisons["metric"] == "AP"]
        if len(compared):
            shown = readable_comparisons(compared)[
                ["comparison", "seeds", "difference", "ci_low", "ci_high", "excludes_zero"]
            ]
            print_frame(shown, f"ablation {sweep.name}: AP differences paired by seed")
        if len(report.inference):
            inference = readable(report.inference)[["run", "eval_rho", "seeds", *columns]]
            print_frame(inference, f"ablation {sweep.name}: inference-time ρ")
        console.print(f"report: {sweep.report_dir}")
