"""``sdetr ablate``."""

from __future__ import annotations

from pathlib import Path

import typer

from sparse_detr.cli import _launcher as launching
from sparse_detr.cli._app import app, command, console, log_line, parse_list, plain, print_frame
from sparse_detr.config import TOKEN_RANKINGS
from sparse_detr.errors import ConfigError

# short headers of the tables below for narrow terminals: column -> (header, what it means)
STATUS_HEADERS = {"iteration": ("iter", "iteration")}
RESULT_HEADERS = {
    "dam_coverage": ("DAM", "DAM coverage"),
    "gflops_encoder": ("enc", "encoder GFLOPs"),
    "eval_rho": ("ρ", "inference-time keep ratio"),
}
COMPARISON_HEADERS = {"difference": ("diff", "difference"), "excludes_zero": ("≠ 0", "the interval excludes zero")}


@command(app, short_help="Train and compare token-sparsity variants.")
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
    data: Path | None = typer.Option(
        None, help="Dataset folder: COCO 2017 (train2017/, val2017/, annotations/) or sdetr data synth's."
    ),
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
    launcher: str | None = launching.LAUNCHER_OPTION,
    gpus_per_run: int | None = typer.Option(
        None, min=0, help="With --launcher slurm: GPUs that train each run (one process each)."
    ),
    nodes_per_run: int | None = typer.Option(None, min=1, help="With --launcher slurm: nodes of each run."),
    processes_per_run: int | None = typer.Option(
        None, min=1, help="With --launcher slurm on CPU nodes: processes that train each run (gloo)."
    ),
    partition: str | None = launching.PARTITION_OPTION,
    account: str | None = launching.ACCOUNT_OPTION,
    qos: str | None = launching.QOS_OPTION,
    time: str | None = launching.TIME_OPTION,
    cpus_per_task: int | None = launching.CPUS_OPTION,
    mem: str | None = launching.MEM_OPTION,
    max_parallel: int | None = typer.Option(
        None, min=0, help="With --launcher slurm: the most runs training at once (0: no limit)."
    ),
    slurm: list[str] | None = launching.SLURM_OPTION,
    wait: bool = launching.WAIT_OPTION,
) -> None:
    """Train and compare token-sparsity variants: keep ratios, token rankings (DAM, OAM, foreground, salience,
    random), the encoder aux loss.

    One variant per (criterion, ρ), plus the baseline and the inference-time sweep, each trained once per
    seed; each run is measured (COCO AP, GFLOPs by part, FPS, DAM coverage) into its result.json, and the
    report (ablation.csv/.md with 95 % intervals over seeds, comparisons.csv/.md with paired differences,
    plots) is rebuilt from the finished runs. The plan (runs, epochs, which variants come from the file or the
    default and how to drop them) is printed first, and the time left once the first epoch is measured.
    Re-running skips finished runs and resumes interrupted ones. With no file: the default ablation
    (sparse_detr/ablation/default.toml), or with --preset that preset's own recipe at ρ 0.1...0.5; options
    change either. A sweep whose report folder holds another sweep's report goes to a new numbered name
    (default-2, ...) unless --name or --output chooses the folder.

    With --launcher slurm (or a [launcher] table in the file) every unfinished run becomes one task of a
    Slurm job array, trained by --gpus-per-run GPUs (or --processes-per-run CPU processes) on
    --nodes-per-run nodes with the run's batch shared among them, and a job after it rebuilds the report;
    the command prints the job ids and returns (--wait blocks). Jobs requeue themselves at their time limit
    and on preemption and resume from their checkpoint. Submitting again skips finished, queued and running
    runs and retries failed ones; --status shows each run's state and job.
    """
    changes = dict(locals())  # the options named after sweep fields, taken before anything else
    resources = ("gpus_per_run", "nodes_per_run", "processes_per_run", "max_parallel")
    for option in ("experiment", "shard", "report_only", "status", "force", *resources, *launching.LAUNCHER_PARAMETERS):
        del changes[option]
    import dataclasses

    from sparse_detr.ablation import SweepError, parse_shard, resolve_sweep, run_ablation, write_sweep_report
    from sparse_detr.ablation.runner import claim_report_folder, place_sweep
    from sparse_detr.config.launcher import with_launcher_changes

    for key, kind, option in (("rankings", str, "--criterion"), ("keep_ratios", float, "--rho"),
                              ("eval_keep_ratios", float, "--eval-rho")):  # fmt: skip
        if changes[key] is not None and changes[key].strip().lower() == "none":
            changes[key] = ()
        elif changes[key] is not None:
            changes[key] = tuple(parse_list(changes[key], kind, option) or ()) or None
    asked = {key for key, value in changes.items() if value is not None}
    sweep = resolve_sweep(experiment, **plain(changes))
    resources = _per_node(sweep.launcher.nodes, nodes_per_run, gpus_per_run, processes_per_run)
    launch = launching.launcher_changes(launcher, partition, account, qos, time, cpus_per_task, mem, slurm,
                                        max_parallel=max_parallel, **resources)  # fmt: skip
    try:
        sweep = dataclasses.replace(sweep, launcher=with_launcher_changes(sweep.launcher, **launch))
    except ConfigError as error:
        raise SweepError(str(error)) from None
    launching.refuse_without_slurm(sweep.launcher.launcher, {**launch, **({"wait": True} if wait else {})})
    chosen = name is not None or output is not None
    if status:
        from sparse_detr.ablation.status import sweep_status
        from sparse_detr.cluster.status import cluster_sweep_status
        from sparse_detr.cluster.submit import read_jobs

        sweep = place_sweep(sweep, chosen=chosen, force=force)
        print_status(sweep, cluster_sweep_status(sweep) if read_jobs(sweep)["runs"] else sweep_status(sweep))
        return
    if report_only:
        report = write_sweep_report(sweep)
        if report is None:
            raise SweepError(f"no finished runs of {sweep.name} in {sweep.run_root}: run the sweep first")
    elif sweep.launcher.launcher == "slurm":
        from sparse_detr.cluster.scheduler import check_cluster

        if shard:
            raise SweepError("--shard splits a sweep among local processes; with --launcher slurm every run is a task")
        check_cluster(sweep.launcher)  # before anything is written
        sweep = claim_report_folder(sweep, chosen=chosen, force=force)
        if not _submit(sweep, experiment, wait):
            return
        report = write_sweep_report(sweep)
    else:
        sweep = claim_report_folder(sweep, chosen=chosen, force=force)
        source = str(experiment) if experiment else "the default (sparse_detr/ablation/default.toml)"
        report = run_ablation(sweep, parse_shard(shard) if shard else (0, 1), source=source, asked=asked)
    if report is not None:
        print_report(sweep, report)


def print_status(sweep, table) -> None:
    """Where each run of ``sweep`` stands (the table of ``sweep_status`` or ``cluster_sweep_status``)."""
    if not table["job"].any():
        table = table.drop(columns="job")
    for column in ("epoch", "iteration", "step"):  # whole numbers, "-" where the run has none yet
        table[column] = [str(int(value)) if value == value else "-" for value in table[column]]
    done = (table["state"] == "done").sum()
    title = f"ablation {sweep.name}: {done} of {len(table)} runs done"
    print_frame(table.drop(columns="folder"), title, STATUS_HEADERS, wrap=["detail"])
    console.print(f"run folders: {sweep.run_root}/<run>/seed<N>", highlight=False, soft_wrap=True)


def print_report(sweep, report) -> None:
    """The columns of ``report``'s tables that a terminal shows (the report files have them all)."""
    from sparse_detr.ablation.tables import readable, readable_comparisons

    columns = ["AP", "AP50", "AP75", "dam_coverage", "gflops", "gflops_encoder", "fps"]
    table = readable(report.table)[["run", "seeds", *columns]]
    print_frame(table, f"ablation {sweep.name} (AP and DAM coverage in %, ± 95 % interval over seeds)", RESULT_HEADERS)
    compared = report.comparisons[report.comparisons["metric"] == "AP"]
    if len(compared):
        shown = readable_comparisons(compared)[
            ["comparison", "seeds", "difference", "ci_low", "ci_high", "excludes_zero"]
        ]
        print_frame(shown, f"ablation {sweep.name}: AP differences paired by seed", COMPARISON_HEADERS,
                    wrap=["comparison"])  # fmt: skip
    if len(report.inference):
        inference = readable(report.inference)[["run", "eval_rho", "seeds", *columns]]
        print_frame(inference, f"ablation {sweep.name}: inference-time ρ", RESULT_HEADERS)
    console.print(f"report: {sweep.report_dir}", highlight=False, soft_wrap=True)


def _per_node(nodes: int, nodes_per_run: int | None, gpus: int | None, processes: int | None) -> dict[str, int]:
    """--gpus-per-run / --processes-per-run over --nodes-per-run as the settings per node."""
    from sparse_detr.ablation import SweepError

    nodes = nodes_per_run or nodes
    resources = {"nodes": nodes_per_run}
    for option, total, key in (("--gpus-per-run", gpus, "gpus_per_node"),
                               ("--processes-per-run", processes, "processes_per_node")):  # fmt: skip
        if total is not None and total % nodes:
            raise SweepError(f"{option} {total} does not split evenly over {nodes} nodes (--nodes-per-run)")
        resources[key] = None if total is None else total // nodes
    return {key: value for key, value in resources.items() if value is not None}


def _submit(sweep, experiment: Path | None, wait: bool) -> bool:
    """Submit ``sweep`` to Slurm and say what was submitted and how to watch it; with ``wait``, block until its
    jobs end. Returns whether it waited (the report is then printed)."""
    from sparse_detr.ablation.status import sweep_status
    from sparse_detr.cluster import submit_sweep
    from sparse_detr.cluster.submit import submitit_folder
    from sparse_detr.cluster.submit import wait as wait_for

    submission = submit_sweep(sweep)
    for why, folders in submission.skipped.items():
        log_line(f"{len(folders)} run(s) {why}, not submitted: {', '.join(folders)}")
    if submission.job_id is None:
        log_line(f"nothing to submit for sweep {sweep.name}")
    else:
        processes = sweep.launcher.processes_per_run
        log_line(f"submitted job array {submission.job_id}: {len(submission.submitted)} run(s) of sweep {sweep.name}, "
                 f"{processes} process(es) each; report job {submission.report_job_id} after it")  # fmt: skip
        status = f"sdetr ablate {experiment} --status" if experiment else "sdetr ablate --status (same options)"
        log_line(f"watch: {status}, or squeue --me")
        log_line(f"logs: {sweep.run_root}/<run>/seed<N>/job.log; Slurm's in {submitit_folder(sweep)}/")
    if not wait:
        return False
    if submission.jobs:
        log_line("waiting for the jobs to end (Ctrl-C stops waiting; the jobs go on)")
        wait_for(submission.jobs)
    states = sweep_status(sweep)["state"]
    log_line(f"sweep {sweep.name}: {(states == 'done').sum()} of {len(states)} runs done")
    return True
