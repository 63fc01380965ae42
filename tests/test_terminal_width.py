"""Every ``--help`` page and every table reads at 80 columns: no line wider, no header, option or value cut,
no bracketed text lost to markup (GitHub issue 22)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from sparse_detr.ablation.tables import ablation_table, comparisons_table, inference_table, runs_table
from sparse_detr.analysis import benchmark as bench
from sparse_detr.analysis.exported import EXPORTED_COLUMNS
from sparse_detr.analysis.train_step import TRAIN_STEP_COLUMNS
from sparse_detr.cli import _app, ablate, app, benchmark, build_command
from sparse_detr.ops import BackendStatus

WIDTH = 80
NARROW = {"COLUMNS": str(WIDTH)}
LONG_PATH = "/home/someone/.cache/sparse_detr/torch_extensions/cpu-torch2.14.1-bd4656db50ca6717/build.log"
runner = CliRunner()


def _commands(command, path: tuple[str, ...] = ()):
    """(path, click command) of ``command`` and of every command and group under it."""
    yield path, command
    for name, subcommand in getattr(command, "commands", {}).items():
        yield from _commands(subcommand, (*path, name))


COMMANDS = dict(_commands(build_command()))


def _help(path: tuple[str, ...]) -> str:
    """``sdetr PATH --help`` as the executable prints it (with each option's environment variable)."""
    command = build_command()
    context = command.make_context("sdetr", [], resilient_parsing=True)
    for name in path:
        command = command.commands[name]
        context = command.make_context(name, [], parent=context, resilient_parsing=True)
    return command.get_help(context)


def _plain(text: str) -> str:
    """``text`` without terminal colours (a console on a terminal, e.g. ``pytest -s``, adds them)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _words(text: str) -> str:
    return " ".join(text.split())


def _check_lines(text: str) -> None:
    """No line wider than the terminal, nothing cut with an ellipsis."""
    too_wide = [line for line in text.splitlines() if cell_len(line) > WIDTH]
    assert not too_wide, "\n".join(too_wide)
    assert "…" not in text, text


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda path: " ".join(path) or "sdetr")
def test_help_reads_at_80_columns(path, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    command, text = COMMANDS[path], _help(path)
    assert "SDETR_" in text or not command.params  # the executable's help (environment variables), not the bare app's
    _check_lines(text)
    for option in (name for parameter in command.params for name in (*parameter.opts, *parameter.secondary_opts)):
        if option.startswith("-"):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), option
    split = [line for line in text.splitlines() if re.search(r"(^|\s)--[\w-]*-$", line)]
    assert not split, f"an option name broken over two lines: {split}"
    sources = [command.help or "", *(parameter.help or "" for parameter in command.params)]
    assert not any("\b" in source for source in sources), "a block click does not rewrap"
    for bracketed in (found for source in sources for found in re.findall(r"\[[^\]\n]*\]", source)):
        assert _words(bracketed) in _words(text), bracketed
    listed = text.partition("\nCommands:\n")[2].splitlines()
    for name in getattr(command, "commands", {}):  # each command's summary whole, not cut with "..."
        row = next(line for line in listed if line.split()[:1] == [name])
        assert not row.endswith("..."), row


@pytest.fixture
def screen(monkeypatch):
    """Call a printing function and return what the app's console printed, at 80 columns."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))

    def capture(function, *args, **kwargs) -> str:
        with _app.console.capture() as captured:
            function(*args, **kwargs)
        return _plain(captured.get())

    return capture


def _check_table(text: str, headers: list[str], short: dict[str, tuple[str, str]] | None = None) -> None:
    """:func:`_check_lines`, and each header whole, or its short header with its legend entry."""
    _check_lines(text)
    for header in headers:
        shown, meaning = (short or {}).get(header, (header, ""))
        if not re.search(rf"(?<!\S){re.escape(header)}(?!\S)", text):
            assert re.search(rf"(?<!\S){re.escape(shown)}(?!\S)", text), (header, text)
            assert f"{shown}: {meaning}" in _words(text), (header, text)


def _column(text: str, index: int) -> str:
    """The cells of a boxed table's column ``index``, joined: a value folded over lines reads whole."""
    return "".join(line.split("│")[index + 1].strip() for line in text.splitlines() if line.startswith("│"))


def _squeezed(text: str) -> str:
    """``text`` without whitespace and table rules: a value folded over lines reads as one word."""
    return re.sub(r"[\s│┃]", "", text)


def _benchmark_frame() -> pd.DataFrame:
    """The table ``run_benchmark`` makes (with FLOPs and FPS at batch 1 and 4) for the paper's models."""
    rows = []
    for preset, rho, kept, gflops in [("deformable-topk-bbr", float("nan"), 18549, 177.094),
                                      *((f"sparse-rho{rho}", rho, int(18549 * rho), 100 + 80 * rho)
                                        for rho in (0.1, 0.2, 0.3, 0.4, 0.5))]:  # fmt: skip
        rows.append({"preset": preset, "backbone": "swin-t", "rho": rho, "tokens": 18549, "kept_tokens": kept,
                     "params": 41049689, "params_trainable": 40827289, "params_published": 40827289,
                     "params_published_reference": 40827289, "gflops": gflops, "gflops_with_aux": gflops + 1.4,
                     "gflops_as_reference": gflops, "gflops_reference": gflops + 0.2,
                     "gflops_reference_with_aux": gflops + 1.6, "gflops_diff_pct": -0.134, "fps_bs1": 12.324,
                     "fps_bs1_min": 11.9, "fps_bs1_max": 12.5, "peak_memory_mib_bs1": 1509.41, "fps_bs4": 20.55,
                     "fps_bs4_min": 20.1, "fps_bs4_max": 21.0, "peak_memory_mib_bs4": 4509.41,
                     "peak_memory_mib": 4509.41, "device": "cpu", "dtype": "float32", "threads": 16})  # fmt: skip
    return pd.DataFrame(rows)


def test_benchmark_table_reads_at_80_columns_and_keeps_its_look_when_wide(screen, monkeypatch):
    summary = bench.summary(_benchmark_frame())
    text = screen(
        _app.print_frame, summary, "benchmark on cpu: one synthetic 850x1040 image", benchmark.SUMMARY_HEADERS
    )
    _check_table(text, list(summary.columns), benchmark.SUMMARY_HEADERS)
    for value in ("deformable-topk-bbr", "40827289", "177.094", "4509.410", "-0.134"):
        assert value in text
    monkeypatch.setenv("COLUMNS", "200")
    wide = screen(_app.print_frame, summary, "benchmark", benchmark.SUMMARY_HEADERS)
    header = next(line for line in wide.splitlines() if "preset" in line)
    assert all(column in header.split() for column in summary.columns), header  # the full headers, one row


def test_benchmark_op_train_and_exported_tables_read_at_80_columns(screen):
    op = pd.DataFrame([{"shape": shape, "device": "cuda", "backend": backend, "dtype": "bfloat16",
                        "forward_ms": 1234.567, "forward_backward_ms": 4567.891, "forward_speedup": 12.345,
                        "forward_backward_speedup": 10.5}
                       for shape in ("encoder", "decoder") for backend in ("pytorch", "cuda")])  # fmt: skip
    text = screen(_app.print_frame, op.drop(columns="dtype"), "ms_deform_attn, bfloat16", benchmark.OP_HEADERS)
    _check_table(text, [column for column in op.columns if column != "dtype"], benchmark.OP_HEADERS)

    steps = pd.DataFrame([{"preset": preset, "backbone": "resnet10t", "rho": 0.3, "batch_size": 16,
                           "s_per_iter": 12.187, "images_per_s": 121.422, "speedup_vs_first": 1.0}
                          for preset in ("deformable-topk-bbr", "sparse-rho0.1")])  # fmt: skip
    text = screen(_app.print_frame, steps, "seconds per training iteration, 800x1066", benchmark.TRAIN_STEP_HEADERS)
    _check_table(text, list(TRAIN_STEP_COLUMNS), benchmark.TRAIN_STEP_HEADERS)

    exported = pd.DataFrame([{"file": f"exports/{LONG_PATH}/sparse-rho0.1.onnx", "runtime": runtime, "msda": "custom",
                              "batch": 4, "seconds": 0.512, "fps": 7.812} for runtime in ("onnxruntime", "openvino")],
                            columns=list(EXPORTED_COLUMNS))  # fmt: skip
    text = screen(_app.print_frame, exported, "exported files, 800x1066", wrap=["file"])
    _check_table(text, list(EXPORTED_COLUMNS))
    assert f"exports/{LONG_PATH}/sparse-rho0.1.onnx" in _column(text, 0)


def _ablation_result(ranking: str, rho: float, aux: bool, seed: int) -> dict:
    """A run's ``result.json`` as the ablation reads it, with inference-time evaluations for DAM runs."""
    measured = {"metrics": {key: 0.3 + 0.01 * seed + rho / 10 for key in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                "dam_coverage": None if ranking == "baseline" else 0.6 + 0.01 * seed,
                "gflops": 109.51 + 80 * rho, "gflops_backbone": 60.1, "gflops_encoder": 30.123 + 80 * rho,
                "gflops_rest": 19.3, "fps": 12.345 + seed, "fps_q1": 12.0, "fps_q3": 13.0}  # fmt: skip
    run = "baseline" if ranking == "baseline" else f"{ranking}-rho{rho:g}" + ("" if aux else "-noaux")
    evaluations = [{**measured, "keep_ratio": keep} for keep in (0.1, 0.3, 0.5)] if ranking == "dam" else []
    return {**measured, "ranking": ranking, "keep_ratio": rho, "enc_aux_loss": aux, "seed": seed, "run": run,
            "evaluations": evaluations}  # fmt: skip


def test_ablation_tables_read_at_80_columns(screen):
    variants = [("baseline", 1.0, True), ("dam", 0.1, True), ("dam", 0.1, False), ("oam", 0.1, True),
                ("random", 0.1, True), ("dam", 0.3, True)]  # fmt: skip
    results = [_ablation_result(*variant, seed) for variant in variants for seed in (0, 1)]
    runs = runs_table(results)
    table = ablation_table(runs)
    report = SimpleNamespace(
        table=table, comparisons=comparisons_table(runs, table), inference=inference_table(results)
    )
    sweep = SimpleNamespace(name="default", report_dir=Path("reports/default"))
    text = screen(ablate.print_report, sweep, report)
    headers = ["run", "seeds", "AP", "AP50", "AP75", "dam_coverage", "gflops", "gflops_encoder", "fps", "eval_rho",
               "comparison", "difference", "ci_low", "ci_high", "excludes_zero"]  # fmt: skip
    _check_table(text, headers, {**ablate.RESULT_HEADERS, **ablate.COMPARISON_HEADERS})
    for value in ("dam-rho0.1-noaux", "random-rho0.1", "± ", "report: reports/default"):
        assert value in text, value


def test_ablation_status_reads_at_80_columns(screen):
    detail = f"job 1234_5 ended before the run finished (log: {LONG_PATH})"
    table = pd.DataFrame([{"run": "dam-rho0.1-noaux", "seed": seed, "state": state, "job": f"1234_{seed}",
                           "epoch": 12.0, "iteration": 12345.0, "step": 123456.0, "AP": 35.2,
                           "folder": "runs/ablate/default/dam-rho0.1-noaux", "detail": detail if seed else ""}
                          for seed, state in enumerate(("done", "failed", "not submitted"))])  # fmt: skip
    sweep = SimpleNamespace(name="default", run_root=Path("runs/ablate/default"))
    text = screen(ablate.print_status, sweep, table)
    _check_table(text, ["run", "seed", "state", "job", "epoch", "iteration", "step", "AP", "detail"],
                 ablate.STATUS_HEADERS)  # fmt: skip
    assert "not submitted" in text and "1234_2" in text and detail.replace(" ", "") in _squeezed(text)


def test_cells_are_plain_text(screen):
    frame = pd.DataFrame({"setting": ["[model] keep_ratio"], "value": [0.1]})
    assert "[model] keep_ratio" in screen(_app.print_frame, frame, "settings [train]")


@pytest.mark.parametrize("command", ["presets", "zoo"])
def test_presets_and_zoo_read_at_80_columns(command):
    result = runner.invoke(app, [command], env=NARROW)
    assert result.exit_code == 0, result.output
    headers = {"presets": ["model", "ρ", "backbone", "recipe"], "zoo": ["name", "AP", "params", "GFLOPs", "FPS b4"]}
    _check_table(_plain("\n".join(line for line in result.output.splitlines() if not line.startswith("cache: "))),
                 headers[command])  # fmt: skip
    assert "sparse-rho0.1" in result.output or "sparse-detr-r50-rho0.1" in result.output


def test_doctor_shows_the_build_log_path_whole_at_80_columns(monkeypatch):
    from sparse_detr import doctor

    statuses = [BackendStatus("cuda", False, "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"),
                BackendStatus("cpu", True, build_log=Path(LONG_PATH)), BackendStatus("pytorch", True)]  # fmt: skip
    monkeypatch.setattr(doctor, "op_backends", lambda: statuses)
    monkeypatch.setattr(doctor, "environment", lambda: {"python": "3.11.7", "platform": "Linux-" + "x" * 90})
    result = runner.invoke(app, ["doctor"], env=NARROW)
    assert result.exit_code == 0, result.output
    text = _plain(result.output)
    # the paths are lines of their own, whole (the terminal wraps them; they copy in one piece)
    assert f"cpu build log: {LONG_PATH}" in text.splitlines()
    tables = "\n".join(line for line in text.splitlines() if " build log: " not in line)
    _check_table(tables, ["backend", "available", "detail"])
    assert "Linux-" + "x" * 90 in _squeezed(tables)


def test_predict_detections_table_reads_at_80_columns(tmp_path, monkeypatch):
    from sparse_detr import inference

    image = f"{'a_long_image_file_name_' * 3}.jpg"
    results = [{"file_name": f"/data/{image}", "category_name": "traffic light", "score": 0.987,
                "bbox": [1234.5, 567.8, 1024.0, 768.25]}]  # fmt: skip
    monkeypatch.setattr(inference, "expand_image_paths", lambda images: [Path(image)])
    finished = inference.Predictions(detections={Path(image): results})
    monkeypatch.setattr(inference, "predict_files", lambda *args, **kwargs: finished)
    result = runner.invoke(app, ["predict", image, "--out", str(tmp_path / "detections.json")], env=NARROW)
    assert result.exit_code == 0, result.output
    table = "\n".join(line for line in _plain(result.output).splitlines() if not line.startswith("wrote "))
    _check_table(table, ["image", "class", "score", "x", "y", "w", "h"])
    assert image in _column(table, 0) and "traffic light" in table and "1234.5" in table
