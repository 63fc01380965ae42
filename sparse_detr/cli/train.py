"""``sdetr train``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from sparse_detr.cli import _launcher as launching
from sparse_detr.cli._app import CONFIG_OPTION, SET_OPTION, app, command, console, log_line
from sparse_detr.cli.evaluate import print_metrics


@command(app, short_help="Train a model (no data: tiny on the synthetic dataset).")
def train(
    preset: str | None = typer.Option(
        None, help="Model preset (sdetr presets); default: tiny on the built-in dataset, or --init's."
    ),
    config_file: Path | None = CONFIG_OPTION,
    settings: list[str] | None = SET_OPTION,
    print_config: bool = typer.Option(
        False, "--print-config", help="Print what the run will use (its folder, the data's classes) and exit."
    ),
    backbone: str | None = typer.Option(None, help="Backbone instead of the preset's (r50, swin-t, resnet18...)."),
    pretrained_backbone: str | None = typer.Option(
        None, help="Backbone start: imagenet (the reference's), timm, a weights file, or none (random)."
    ),
    init: str | None = typer.Option(
        None, help="Fine-tune: start a new run from this checkpoint (file, run folder or zoo name)."
    ),
    keep_ratio: float | None = typer.Option(None, "--rho", help="Keep ratio ρ instead of the preset's."),
    root: Path | None = typer.Option(
        None, "--data", help="Dataset folder: COCO 2017 (train2017/, val2017/, annotations/) or sdetr data synth's."
    ),
    train_images: Path | None = typer.Option(None, help="Training images folder (custom dataset)."),
    train_ann: Path | None = typer.Option(None, help="Training instances JSON (custom dataset)."),
    val_images: Path | None = typer.Option(None, help="Validation images folder (custom dataset)."),
    val_ann: Path | None = typer.Option(None, help="Validation instances JSON (custom dataset)."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs (default: the preset's recipe)."),
    lr_drop: int | None = typer.Option(None, min=1, help="Epoch after which lr drops x0.1."),
    batch_size: int | None = typer.Option(None, min=1, help="Images per step and process."),
    lr: float | None = typer.Option(None, help="Learning rate for a total batch of 16 (scaled by sqrt(batch/16))."),
    lr_backbone: float | None = typer.Option(None, help="Backbone learning rate for a total batch of 16."),
    clip_max_norm: float | None = typer.Option(None, help="Gradient clipping norm (0: off)."),
    image_size: int | None = typer.Option(None, min=32, help="Evaluation shorter side; training scales follow it."),
    amp: str | None = typer.Option(None, help="Mixed precision: bf16 or fp16."),
    grad_accum: int | None = typer.Option(None, min=1, help="Batches per optimizer step."),
    seed: int | None = typer.Option(None, help="Seed of weights, data order and augmentation."),
    workers: int | None = typer.Option(None, min=0, help="Data loading processes."),
    iters_per_epoch: int | None = typer.Option(None, min=1, help="Cap on batches per epoch (quick runs)."),
    checkpoint_every_iters: int | None = typer.Option(None, min=0, help="Also checkpoint every N steps."),
    output_dir: Path | None = typer.Option(
        None, help="Run folder (default runs/<preset>, runs/<preset>-finetune with --init; numbered when taken)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Start a new run in the run folder even if it holds one (its files are deleted)."
    ),
    resume: Path | None = typer.Option(None, help="Checkpoint (or run folder) to resume from."),
    tensorboard: bool | None = typer.Option(
        None, "--tensorboard/--no-tensorboard", help="Also write TensorBoard event files (the tensorboard extra)."
    ),
    allow_other_categories: bool | None = typer.Option(
        None, "--allow-other-categories", help="Resume although the data names other categories."
    ),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    launcher: str | None = launching.LAUNCHER_OPTION,
    nodes: int | None = typer.Option(None, min=1, help="With --launcher slurm: nodes of the training."),
    gpus_per_node: int | None = typer.Option(
        None, min=0, help="With --launcher slurm: GPUs per node (one process each; --batch-size is per process)."
    ),
    processes_per_node: int | None = typer.Option(
        None, min=1, help="With --launcher slurm on CPU nodes: processes per node (gloo)."
    ),
    partition: str | None = launching.PARTITION_OPTION,
    account: str | None = launching.ACCOUNT_OPTION,
    qos: str | None = launching.QOS_OPTION,
    time: str | None = launching.TIME_OPTION,
    cpus_per_task: int | None = launching.CPUS_OPTION,
    mem: str | None = launching.MEM_OPTION,
    slurm: list[str] | None = launching.SLURM_OPTION,
    wait: bool = launching.WAIT_OPTION,
) -> None:
    """Train a model; with no data, the tiny preset on the built-in synthetic dataset.

    The configuration is resolved in layers: the preset (and its training recipe: SPEC §6 for the paper's
    presets, a CPU recipe for tiny) < --config FILE < --set key=value < the options below. The paper
    presets start from the reference's ImageNet backbone (--pretrained-backbone); --init CHECKPOINT
    fine-tunes a released or own checkpoint on this data instead. Works under torchrun (several GPUs, or CPU
    processes with gloo). The run folder gets config.toml, the checkpoint, metrics.jsonl, per-epoch
    evaluations and metrics_final.json. The same command again resumes its interrupted run (or says it has
    finished); other settings never write into an existing run: they go to a new numbered folder
    (runs/tiny-2), or, with --output-dir, stop unless --force. --init always starts a new run.

    With --launcher slurm the training is one Slurm job of --nodes nodes with --gpus-per-node GPUs (or
    --processes-per-node CPU processes) each, submitted through submitit; the command prints the job id and
    returns (--wait blocks). At its time limit or when preempted the job saves its checkpoint, requeues itself
    and resumes.
    """
    fields = dict(locals())  # the options named after configuration fields, taken before anything else
    launch = launching.launcher_changes(launcher, partition, account, qos, time, cpus_per_task, mem, slurm,
                                        nodes=nodes, gpus_per_node=gpus_per_node,
                                        processes_per_node=processes_per_node)  # fmt: skip
    resources = ("nodes", "gpus_per_node", "processes_per_node")
    for name in ("config_file", "settings", "print_config", "force", *resources, *launching.LAUNCHER_PARAMETERS):
        del fields[name]
    launching.refuse_without_slurm(launch.get("launcher", "local"), {**launch, **({"wait": True} if wait else {})})
    from sparse_detr.engine import distributed, train_run
    from sparse_detr.engine.initialization import init_model_config
    from sparse_detr.engine.run_config import merged_settings, option_settings, resolve_run_config
    from sparse_detr.engine.run_folder import choose_run_folder, with_data_classes

    resolved = merged_settings(config_file, settings or (), option_settings(fields))
    base = init_model_config(resolved["train.init"]) if "train.init" in resolved and "preset" not in resolved else None
    run_config = resolve_run_config(resolved, base)
    folder = choose_run_folder(run_config, explicit="train.output_dir" in resolved, force=force)
    train_config = dataclasses.replace(run_config.train, output_dir=str(folder.path))
    run_config = dataclasses.replace(run_config, train=train_config)
    if print_config:  # what the run will use: its folder, and the classes its data has
        log_line(with_data_classes(run_config).to_toml())
        return
    if folder.notice:
        log_line(folder.notice)
    if run_config.data.is_builtin:
        console.print("no data given: using the built-in synthetic dataset")
    if launch.get("launcher") == "slurm":
        _submit(run_config, launch, force, wait)
        return
    metrics = train_run(run_config, replace=force)
    if distributed.get_rank() == 0:  # under torchrun every process has the metrics; the table prints once
        print_metrics(metrics)
    console.print(f"run folder: {run_config.train.output_dir}")


def _submit(run_config, launch: dict, force: bool, wait: bool) -> None:
    """Submit the training as one Slurm job; say where it writes and how to watch it (with ``wait``, block)."""
    from sparse_detr.cluster import submit_training
    from sparse_detr.cluster.submit import SUBMITIT_FOLDER
    from sparse_detr.cluster.submit import wait as wait_for
    from sparse_detr.config.launcher import LauncherSettings
    from sparse_detr.engine.evaluate import read_metrics
    from sparse_detr.engine.trainer import FINAL_METRICS_FILE

    settings = LauncherSettings(**launch)
    job = submit_training(run_config, settings, replace=force)
    folder = run_config.train.output_dir
    log_line(f"submitted job {job.job_id}: {settings.processes_per_run} process(es) on {settings.nodes} node(s), "
             f"run folder {folder}")  # fmt: skip
    log_line(f"watch: squeue --me; log: {folder}/job.log (Slurm's in {folder}/{SUBMITIT_FOLDER}/{job.job_id}/)")
    if wait:
        log_line("waiting for the job to end (Ctrl-C stops waiting; the job goes on)")
        wait_for([job])
        final = Path(folder) / FINAL_METRICS_FILE
        if final.is_file():
            print_metrics(read_metrics(final))
        log_line(f"job {job.job_id} ended" + ("" if final.is_file() else " before the training finished: see job.log"))
