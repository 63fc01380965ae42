"""The mission's own commands, run exactly as the README writes them: a contract with the user.

Internal names may change; these command lines may not. Each runs as a real ``sdetr`` process in a fresh
folder, shortened only through the environment (every option reads ``SDETR_<COMMAND>_<OPTION>``, and the
cache folder holds the built-in dataset), so the command text stays as written; the test then checks what
the command wrote.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sparse_detr.data import make_synthetic_dataset
from sparse_detr.ops.loader import cache_root

README = Path(__file__).resolve().parents[1] / "README.md"
TRAIN = "sdetr train"
ABLATE = "sdetr ablate --criterion dam --rho 0.1,0.2,0.3"
VISUALIZE = "sdetr visualize image.jpg"
MISSION_COMMANDS = (TRAIN, ABLATE, VISUALIZE)

pytestmark = pytest.mark.slow


def test_readme_shows_the_mission_commands_verbatim():
    commands = [line.split("#")[0].strip() for line in README.read_text().splitlines()]
    for command in MISSION_COMMANDS:
        assert command in commands, f"README.md lost the command line {command!r}"


def test_criterion_and_ranking_name_one_option():
    from sparse_detr.cli import build_command

    ablate = build_command().commands["ablate"]
    option = next(parameter for parameter in ablate.params if "--criterion" in parameter.opts)
    assert "--ranking" in option.opts
    assert option.opts[0] == "--criterion"  # the name --help shows and the environment variable follows
    assert option.envvar == "SDETR_ABLATE_CRITERION"
    force = next(parameter for parameter in ablate.params if parameter.name == "force")
    assert force.envvar is None  # deleting work is only ever typed


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A fresh working folder and an environment whose cache is empty but for the compiled op."""
    root = tmp_path_factory.mktemp("mission")
    cache = root / "cache"
    (cache / "sparse_detr").mkdir(parents=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "COLUMNS": "80"}
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):  # share the kernels the other tests compiled
        ops = cache_root()
        ops.mkdir(parents=True, exist_ok=True)
        (cache / "sparse_detr" / "torch_extensions").symlink_to(ops, target_is_directory=True)
    env.pop("SDETR_DEBUG", None)
    work = root / "work"
    work.mkdir()
    return work, env


def sdetr(command: str, work: Path, env: dict[str, str], **variables: str) -> subprocess.CompletedProcess:
    """Run ``command`` as written, in ``work``, with ``variables`` added to the environment."""
    words = shlex.split(command)
    assert words[0] == "sdetr"
    executable = Path(sys.executable).with_name("sdetr")
    result = subprocess.run(
        [str(executable), *words[1:]], cwd=work, env={**env, **variables}, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def trained(workspace):
    """``sdetr train`` on the built-in dataset, one epoch of two steps."""
    work, env = workspace
    result = sdetr(TRAIN, work, env, SDETR_TRAIN_EPOCHS="1", SDETR_TRAIN_ITERS_PER_EPOCH="2")
    return work, env, result


def test_sdetr_train(trained):
    work, env, result = trained
    run = work / "runs" / "tiny"
    assert (run / "checkpoint.pth").is_file()
    assert (run / "config.toml").is_file()
    final = json.loads((run / "metrics_final.json").read_text())
    assert 0.0 <= final["AP"] <= 1.0
    assert (Path(env["XDG_CACHE_HOME"]) / "sparse_detr" / "synthetic-shapes" / "annotations").is_dir()
    assert "writing the synthetic dataset (500 + 100 images) to " in result.stderr  # the first run's long step
    # the COCO summary once, the project's table; not pycocotools' own print
    assert result.stdout.count("AP50") >= 1
    assert "Average Precision  (AP) @[" not in result.stdout
    assert "run folder: runs/tiny" in result.stdout
    assert "AP per class" in result.stdout and "circle" in result.stdout  # the categories' own APs
    assert (run / "checkpoint_best.pth").is_file()


def test_sdetr_visualize(trained):
    work, env, _ = trained
    val = Path(env["XDG_CACHE_HOME"]) / "sparse_detr" / "synthetic-shapes" / "val"
    Image.open(sorted(val.glob("*.png"))[0]).convert("RGB").save(work / "image.jpg")
    sdetr(VISUALIZE, work, env)
    figure = work / "visualizations" / "image_tokens.png"
    assert figure.is_file() and figure.stat().st_size > 10_000


def test_sdetr_ablate(workspace):
    work, env = workspace
    data = make_synthetic_dataset(work.parent / "tiny-data", num_train=8, num_val=4, image_size=64)
    result = sdetr(
        ABLATE, work, env, SDETR_ABLATE_DATA=str(data), SDETR_ABLATE_EPOCHS="1", SDETR_ABLATE_ITERS_PER_EPOCH="1"
    )
    # the plan comes first (status lines: on stderr): the runs, which variants were asked for and which the
    # default adds
    plan = result.stderr[: result.stderr.index("[1/14]")]
    assert "plan: 14 runs = 7 variants x 2 seeds" in plan
    assert "asked for: dam-rho0.1, dam-rho0.2, dam-rho0.3" in plan
    assert "--no-baseline" in plan and "--no-random" in plan and "--seeds 1" in plan
    assert re.search(r"estimate: first epoch \d+ s", result.stderr)
    report = work / "reports" / "default"
    with (report / "ablation.csv").open() as file:
        variants = {row["run"] for row in csv.DictReader(file)}
    assert variants == {"baseline", *(f"{kind}-rho{rho}" for kind in ("dam", "random") for rho in (0.1, 0.2, 0.3))}
    assert (report / "comparisons.csv").is_file() and (report / "sweep.toml").is_file()
    assert len(list((work / "runs" / "ablate" / "default").glob("*/seed*/result.json"))) == 14
