"""Sweeps and trainings on a cluster: the launcher settings, a run's batch shared among processes, the jobs
run by submitit's local executor (regular suite) and by a real Slurm (``slurm`` marker: the one-node cluster
of ``scripts/local_slurm.sh start``; skipped with one line when no cluster answers)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from conftest import one_line
from typer.testing import CliRunner

from sparse_detr.ablation import load_sweep, run_ablation
from sparse_detr.ablation.runner import FAILED_NAME, mark_failed, read_result
from sparse_detr.ablation.status import sweep_status
from sparse_detr.ablation.sweep import placement_free, sweep_to_dict
from sparse_detr.cli import app
from sparse_detr.cluster import cluster_sweep_status, submit_sweep, wait
from sparse_detr.config import TrainConfig
from sparse_detr.config.launcher import LauncherSettings, parse_slurm_options, time_limit_minutes
from sparse_detr.engine.distributed import share_batch
from sparse_detr.engine.sampling import EpochBatchSampler
from sparse_detr.errors import ConfigError

runner = CliRunner()
SDETR = Path(sys.executable).with_name("sdetr")


# --- settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("4:00:00", 240), ("2-00:00:00", 2880),
                                           ("1-12", 2160), ("0:20", 1)])  # fmt: skip
def test_time_limits_are_read_in_slurms_forms(text, minutes):
    assert time_limit_minutes(text) == minutes


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"time": "two hours"}, "time must be Slurm's time limit"),
        ({"mem": "lots"}, "mem must be Slurm's memory per node"),
        ({"launcher": "ssh"}, "launcher must be one of ('local', 'slurm')"),
        ({"nodes": 0}, "nodes must be at least 1"),
        ({"slurm": {"partition": "gpu"}}, "set it with --partition instead"),
        ({"slurm": {"ntasks-per-node": 4}}, "set it with --gpus-per-node instead"),
        ({"slurm": {"Bad Key": "1"}}, "is not an sbatch option name"),
    ],
)
def test_launcher_settings_refuse_what_slurm_would_not_take(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        LauncherSettings(**changes)


def test_slurm_options_are_key_value_pairs_or_flags():
    assert parse_slurm_options(["constraint=a100", "requeue", " comment = a b "]) == {
        "constraint": "a100", "requeue": True, "comment": "a b"}  # fmt: skip
    assert LauncherSettings(slurm={"exclusive": True, "hold": False, "nice": 10}).slurm == {"exclusive": True,
                                                                                           "nice": "10"}  # fmt: skip
    with pytest.raises(ConfigError, match="--slurm takes key=value"):
        parse_slurm_options(["=a100"])


def test_sweep_files_take_a_launcher_table_that_does_not_change_results(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('preset = "tiny"\nkeep_ratios = [0.3]\n[launcher]\nlauncher = "slurm"\ngpus_per_node = 8\n'
                    'time = "2-00:00:00"\nmax_parallel = 4\n[launcher.slurm]\nconstraint = "a100"\n')  # fmt: skip
    sweep = load_sweep(path)
    assert sweep.launcher == LauncherSettings(launcher="slurm", gpus_per_node=8, time="2-00:00:00", max_parallel=4,
                                              slurm={"constraint": "a100"})  # fmt: skip
    assert sweep.launcher.processes_per_run == 8
    document = sweep_to_dict(sweep)
    assert document["launcher"]["slurm"] == {"constraint": "a100"}
    local = dataclasses.replace(sweep, launcher=LauncherSettings())
    assert "launcher" not in sweep_to_dict(local)
    assert placement_free(document) == placement_free(sweep_to_dict(local))  # where it runs is no other sweep

    path.write_text('preset = "tiny"\n[launcher]\ngpus = 8\n')
    with pytest.raises(ConfigError, match=r"sweep.toml: unknown key \[launcher\] 'gpus'; known: launcher"):
        load_sweep(path)


# --- one run, several processes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_size, grad_accum, iters, processes, expected",
    [
        (2, 8, None, 8, (2, 1, None)),  # 8 GPUs do in one pass what one does in 8 accumulated batches
        (2, 8, 16, 2, (2, 4, 8)),
        (4, 1, 6, 2, (2, 1, 6)),  # then the batch itself is split
        (1, 2, 8, 2, (1, 1, 4)),
        (6, 2, None, 4, (3, 1, None)),
    ],
)
def test_a_step_keeps_its_images_however_many_processes_share_it(batch_size, grad_accum, iters, processes, expected):
    config = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, iters_per_epoch=iters)
    shared = share_batch(config, processes)
    assert (shared.batch_size, shared.grad_accum, shared.iters_per_epoch) == expected
    assert shared.batch_size * shared.grad_accum * processes == batch_size * grad_accum


def test_a_step_that_cannot_be_shared_is_refused():
    with pytest.raises(ConfigError, match="batch_size 3 x grad_accum 1 images cannot be shared by 2 processes"):
        share_batch(TrainConfig(batch_size=3), 2)


def test_processes_see_the_images_of_one_process_step():
    """One process with grad_accum 2 and two processes with one batch each see the same images per step."""
    dataset = list(range(11))
    one = list(EpochBatchSampler(dataset, 1, seed=5, max_batches=8, multiple_of=2))
    ranks = [list(EpochBatchSampler(dataset, 1, seed=5, rank=r, world_size=2, max_batches=4)) for r in range(2)]
    for step in range(4):
        alone = sorted(sample for batch in one[2 * step : 2 * step + 2] for sample in batch)
        shared = sorted(sample for rank in ranks for sample in rank[step])
        assert alone == shared


# --- status and bad input without a cluster --------------------------------------------------------------------


def test_a_failed_run_says_why_and_where_its_log_is(tmp_path):
    sweep = load_sweep_text(tmp_path, "")
    folder = sweep.run_root / sweep.runs()[0].folder
    folder.mkdir(parents=True)
    mark_failed(folder, "ConfigError: bad data", str(folder / "job.log"), "12_0")
    table = sweep_status(sweep)
    assert table["state"].tolist() == ["failed"] + ["not started"] * 3
    assert table["detail"][0] == f"ConfigError: bad data (log: {folder / 'job.log'})"
    assert json.loads((folder / FAILED_NAME).read_text())["job"] == "12_0"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--partition", "debug"], "--partition is a Slurm job setting: add --launcher slurm"),
        (["--wait"], "--wait is a Slurm job setting"),
        (["--launcher", "slurm", "--gpus-per-run", "3", "--nodes-per-run", "2"],
         "--gpus-per-run 3 does not split evenly over 2 nodes"),
        (["--launcher", "slurm", "--slurm", "time=10"], "--slurm time: set it with --time instead"),
        (["--launcher", "slurm", "--time", "soon"], "time must be Slurm's time limit"),
        (["--launcher", "slurm", "--shard", "0/2"], "--shard splits a sweep among local processes"),
        (["--launcher", "slurm"], "needs Slurm's sbatch, and there is none on this machine"),
    ],
)  # fmt: skip
def test_ablate_launcher_mistakes_get_one_line(tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm here
    one_line(runner.invoke(app, ["ablate", "--no-baseline", "--rho", "0.3", *arguments]), 2, message)
    assert not (tmp_path / "runs").exists()


def test_train_without_slurm_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    result = runner.invoke(app, ["train", "--launcher", "slurm", "--nodes", "2", "--output-dir", "run"])
    one_line(result, 2, "needs Slurm's sbatch", "scripts/local_slurm.sh start")
    one_line(runner.invoke(app, ["train", "--nodes", "2"]), 2, "--nodes is a Slurm job setting")


# --- jobs: submitit's local executor, then a real Slurm ------------------------------------------------------------

# two variants x two seeds; a step of 2 images: one process with grad_accum 2, or 2 processes of 1 image each.
# The backbone's BatchNorm is frozen (a weights file the fixture writes), so that a batch of one image
# normalizes the same however the step is split.
_SWEEP = """preset = "tiny"
rankings = ["dam", "oam"]
keep_ratios = [0.3]
baseline = false
seeds = [1, 2]
device = "cpu"
{extra}
[train]
epochs = 1
iters_per_epoch = 24
batch_size = 1
grad_accum = 2
image_size = 96
workers = 0
checkpoint_every_iters = 1
log_every = 1
[model]
backbone_norm = "frozen_bn"
pretrained_backbone = "{weights}"
[benchmark]
images = 1
warmup = 0
iters = 2
coverage_images = 2
"""


def load_sweep_text(folder: Path, extra: str, weights: str | None = None):
    """The test sweep (:data:`_SWEEP`) written to ``folder/cluster.toml``, with its folders in ``folder``, its
    backbone from ``weights`` (default: a random ResNet-10-T written there)."""
    if weights is None:
        weights = folder / "resnet10t.pth"
        torch.manual_seed(0)
        torch.save(timm.create_model("resnet10t").state_dict(), weights)
    placed = f'output = "{folder / "reports" / "cluster"}"\nruns_dir = "{folder / "runs" / "cluster"}"\n{extra}'
    path = folder / "cluster.toml"
    path.write_text(_SWEEP.format(extra=placed, weights=weights))
    return load_sweep(path)


def _same_backbone(sweep) -> str:
    return sweep.model["pretrained_backbone"]


def _ap(sweep) -> dict[str, float]:
    return {run.folder: read_result(sweep.run_root / run.folder / "result.json")["metrics"]["AP"]
            for run in sweep.runs()}  # fmt: skip


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The test sweep trained by the local launcher (one process per run): the results every launcher gives."""
    sweep = load_sweep_text(tmp_path_factory.mktemp("local"), "")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of a job with one CPU per task: the same sums, in the same order
    try:
        run_ablation(sweep)
    finally:
        torch.set_num_threads(threads)
    return sweep


def _same_weights(sweep, reference) -> None:
    """Every run of ``sweep`` ended with exactly the weights of the same run of ``reference``."""
    for run in sweep.runs():
        ours, theirs = (torch.load(s.run_root / run.folder / "checkpoint.pth", weights_only=True)["model"]
                        for s in (sweep, reference))  # fmt: skip
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), (run.folder, key)


@pytest.mark.slow
def test_submitit_local_executor_trains_each_run_on_two_processes_as_one(tmp_path, monkeypatch, local_reference):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job's processes: one thread each, as the reference
    sweep = load_sweep_text(tmp_path, '[launcher]\nlauncher = "slurm"\nprocesses_per_node = 2\n',
                            _same_backbone(local_reference))  # fmt: skip
    sweep = dataclasses.replace(sweep, seeds=(1,))  # the two variants of the first seed
    submission = submit_sweep(sweep, cluster="local")
    assert sorted(submission.submitted) == ["dam-rho0.3/seed1", "oam-rho0.3/seed1"]
    wait(submission.jobs)
    for run in sweep.runs():
        result = read_result(sweep.run_root / run.folder / "result.json")
        reference = read_result(local_reference.run_root / run.folder / "result.json")
        assert result["trained_by"] == {"processes": 2} and reference["trained_by"] == {"processes": 1}
        assert result["settings"] == reference["settings"]
        assert result["metrics"] == reference["metrics"] and result["gflops"] == reference["gflops"]
        assert (sweep.run_root / run.folder / "job.log").is_file()
    _same_weights(sweep, dataclasses.replace(local_reference, seeds=(1,)))
    assert cluster_sweep_status(sweep)["state"].tolist() == ["done", "done"]
    again = submit_sweep(sweep, cluster="local")
    assert again.job_id is None and sorted(again.skipped["done"]) == ["dam-rho0.3/seed1", "oam-rho0.3/seed1"]


@pytest.mark.parametrize("cluster", ["local", None])
def test_only_slurm_job_ids_are_asked_of_slurm(tmp_path, monkeypatch, cluster):
    """Local job ids are process ids: Slurm is not asked about them (and need not run); a record written
    before the cluster was recorded holds Slurm's ids."""
    from sparse_detr.cluster import status, submit

    asked: list[list[str]] = []
    monkeypatch.setattr(status, "job_states", lambda job_ids: asked.append(job_ids) or {})
    monkeypatch.setattr(submit, "job_states", lambda job_ids: asked.append(job_ids) or {})
    sweep = load_sweep_text(tmp_path, '[launcher]\nlauncher = "slurm"\n', weights="unused.pth")
    folder = sweep.runs()[0].folder
    record = {"runs": {folder: "4242_0"}, "reports": []} | ({"cluster": cluster} if cluster else {})
    submit._write_jobs(sweep, record)

    table = cluster_sweep_status(sweep)
    assert table["job"].tolist()[0] == "4242_0" and table["state"].tolist()[0] == "failed"  # ended unstarted
    assert submit.active_jobs(sweep) == {}
    assert asked == ([] if cluster == "local" else [["4242"], ["4242"]])


@pytest.mark.slow
def test_a_failing_run_is_marked_and_the_next_submission_retries_it(tmp_path):
    sweep = load_sweep_text(tmp_path, '[launcher]\nlauncher = "slurm"\n')
    sweep = dataclasses.replace(sweep, rankings=("dam",), seeds=(1,), train={**sweep.train, "image_size": 64})
    wait(submit_sweep(sweep, cluster="local").jobs)  # 64 pixels give fewer tokens than tiny's 50 queries
    status = cluster_sweep_status(sweep)
    assert status["state"].tolist() == ["failed"]
    assert "ConfigError: image size 64 gives as few as" in status["detail"][0]
    assert f"log: {sweep.run_root.absolute() / 'dam-rho0.3/seed1/job.log'}" in status["detail"][0]
    retry = submit_sweep(sweep, cluster="local")
    assert retry.submitted == ["dam-rho0.3/seed1"]
    wait(retry.jobs)


# --- a real Slurm ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    """Skip unless a Slurm cluster answers here (``scripts/local_slurm.sh start``)."""
    if shutil.which("sinfo") is None:
        pytest.skip("no Slurm here (sinfo not found): scripts/local_slurm.sh install && scripts/local_slurm.sh start")
    answer = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30)
    usable = {"idle", "mixed", "allocated", "completing"}
    if answer.returncode != 0 or not usable & {state.rstrip("*~#") for state in answer.stdout.split()}:
        pytest.skip(f"no Slurm cluster answers (sinfo: {answer.stderr.strip() or answer.stdout.strip()}): "
                    "scripts/local_slurm.sh start")  # fmt: skip


def _sdetr(*arguments: str, cwd: Path) -> str:
    done = subprocess.run([str(SDETR), *arguments], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _wait_for(condition, timeout: float = 600, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.5)


def _metrics_step(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return max((row["step"] for row in rows if "loss" in row), default=0)


def _squeue() -> str:
    return subprocess.run(["squeue", "--me", "--noheader", "--array", "--format=%i %T"], capture_output=True,
                          text=True).stdout  # fmt: skip


@pytest.mark.slow
@pytest.mark.slurm
def test_a_sweep_on_slurm_requeued_midway_ends_with_the_local_launchers_report(slurm, tmp_path, local_reference):
    sweep = load_sweep_text(tmp_path, "", _same_backbone(local_reference))
    path = tmp_path / "cluster.toml"
    output = _sdetr("ablate", str(path), "--launcher", "slurm", "--processes-per-run", "2", "--time", "30",
                    "--cpus-per-task", "1", cwd=tmp_path)  # fmt: skip
    assert "submitted job array" in output and "4 run(s) of sweep cluster, 2 process(es) each" in output
    assert f"watch: sdetr ablate {path} --status" in output
    jobs = json.loads((sweep.run_root / ".submitit" / "jobs.json").read_text())["runs"]
    assert sorted(jobs) == sorted(run.folder for run in sweep.runs())
    first = sweep.runs()[0]
    folder = sweep.run_root / first.folder

    # requeue the first run in the middle of its training: it saves, Slurm starts it again, it resumes
    _wait_for(lambda: _metrics_step(folder) >= 2, what="the first run's second step")
    subprocess.run(["scontrol", "requeue", jobs[first.folder]], check=True)
    status = _sdetr("ablate", str(path), "--status", cwd=tmp_path)
    assert jobs[first.folder] in status and "queued" in status
    again = _sdetr("ablate", str(path), "--launcher", "slurm", "--processes-per-run", "2", cwd=tmp_path)
    assert "nothing to submit" in again  # every run is queued or running: none is submitted twice
    _wait_for(lambda: not _squeue().strip(), timeout=900, what="the sweep's jobs")

    log = (folder / "job.log").read_text()
    assert "(resuming from its checkpoint)" in log and "resumed from" in log
    table = cluster_sweep_status(sweep)
    assert table["state"].tolist() == ["done"] * 4 and table["job"].tolist() == [jobs[r.folder] for r in sweep.runs()]
    assert _ap(sweep) == _ap(local_reference)  # the requeued run too
    _same_weights(sweep, local_reference)
    report, reference = (pd.read_csv(s.report_dir / "ablation.csv") for s in (sweep, local_reference))
    measured = [column for column in reference if not column.startswith("fps")]  # all but the timings
    pd.testing.assert_frame_equal(report[measured], reference[measured])
    final = _sdetr("ablate", str(path), "--launcher", "slurm", "--wait", cwd=tmp_path)
    assert "nothing to submit" in final and "sweep cluster: 4 of 4 runs done" in final
    assert "ablation cluster (AP and DAM coverage in %" in final  # --wait prints the report


@pytest.mark.slow
@pytest.mark.slurm
def test_a_training_warned_of_its_time_limit_requeues_itself_and_resumes(slurm, tmp_path):
    quick = ["train", "--launcher", "slurm", "--processes-per-node", "2", "--epochs", "1", "--iters-per-epoch", "8",
             "--batch-size", "1", "--image-size", "96", "--workers", "0", "--checkpoint-every-iters", "1",
             "--set", "train.log_every=1", "--device", "cpu"]  # fmt: skip
    warned, calm = tmp_path / "warned", tmp_path / "calm"
    output = _sdetr(*quick, "--output-dir", str(warned), cwd=tmp_path)
    job = output.split("submitted job ")[1].split(":")[0]
    second = subprocess.run([str(SDETR), *quick, "--output-dir", str(warned)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    refusal = second.stdout + second.stderr
    assert second.returncode == 2 and f"error: job {job} (" in refusal and f"already trains in {warned}" in refusal
    _wait_for(lambda: _metrics_step(warned) >= 2, what="the second step")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what --signal=USR2@120 sends before the limit
    _wait_for(lambda: not _squeue().strip(), timeout=600, what="the warned job")
    log = (warned / "job.log").read_text()
    assert "the time limit is near; the checkpoint is saved, requeuing" in log and "resumed from" in log
    assert "AP" in json.loads((warned / "metrics_final.json").read_text())

    _sdetr(*quick, "--output-dir", str(calm), "--wait", cwd=tmp_path)
    weights = [torch.load(folder / "checkpoint.pth", weights_only=True)["model"] for folder in (warned, calm)]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


@pytest.mark.slurm
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--partition", "nowhere"], "--partition nowhere: no such partition; partitions here: debug"),
        (["--gpus-per-run", "1"], "partition debug has none"),
        (["--slurm", "frobnicate=1"], "Slurm refused the job:"),
    ],
)
def test_what_slurm_cannot_run_gets_one_line(slurm, tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["ablate", "--no-baseline", "--rho", "0.3", "--launcher", "slurm", *arguments])
    line = one_line(result, 2, message)
    if "frobnicate" in arguments:
        assert "frobnicate" in line
    assert not _squeue().strip()


@pytest.mark.slurm
def test_every_scheduler_option_reaches_slurm(slurm, tmp_path, monkeypatch):
    """The options as Slurm records them (the jobs are submitted held, looked at, and cancelled)."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, [
        "ablate", "--criterion", "dam", "--rho", "0.2,0.3", "--seeds", "1", "--launcher", "slurm",
        "--partition", "debug", "--account", "vision", "--qos", "normal", "--time", "1:30:00", "--mem", "1G",
        "--cpus-per-task", "1", "--processes-per-run", "2", "--max-parallel", "1", "--slurm", "comment=sdetr-options",
        "--slurm", "hold",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "runs" / "ablate" / "default" / ".submitit" / "jobs.json").read_text())
    array, report = record["runs"]["dam-rho0.2/seed0"].partition("_")[0], record["reports"][0]
    try:
        shown = [line for job in (array, report) for line in subprocess.run(
            ["scontrol", "--oneliner", "show", "job", job], capture_output=True, text=True, check=True
        ).stdout.splitlines()]  # fmt: skip
        jobs = [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in shown]
        runs = next(job for job in jobs if job["JobId"] == array or job.get("ArrayJobId") == array)
        expected = {"Partition": "debug", "Account": "vision", "TimeLimit": "01:30:00",
                    "NumTasks": "2", "CPUs/Task": "1", "MinMemoryNode": "1G", "Comment": "sdetr-options",
                    "ArrayTaskThrottle": "1", "JobState": "PENDING", "Reason": "JobHeldUser"}  # fmt: skip
        assert {key: runs.get(key) for key in expected} == expected
        assert "#SBATCH --qos=normal" in Path(runs["Command"]).read_text()  # kept only where Slurm keeps accounts
        after = next(job for job in jobs if job["JobId"] == report)
        assert after["Dependency"].startswith(f"afterany:{array}") and after["NumTasks"] == "1"
        status = runner.invoke(app, ["ablate", "--criterion", "dam", "--rho", "0.2,0.3", "--seeds", "1", "--status"],
                               env={"COLUMNS": "200"})  # fmt: skip
        assert status.output.count("queued") == len(record["runs"])
        assert all(f" {task} " in status.output for task in record["runs"].values())
    finally:
        subprocess.run(["scancel", array, report], check=True)
