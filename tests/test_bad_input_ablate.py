from __future__ import annotations

import pytest
import tomli_w
from typer.testing import CliRunner

from sparse_detr import engine
from sparse_detr.ablation import SweepError, default_sweep, resolve_sweep
from sparse_detr.ablation.runner import SWEEP_FILE, claim_report_folder
from sparse_detr.ablation.sweep import sweep_to_dict
from sparse_detr.cli import app
from sparse_detr.data import make_synthetic_dataset, synthetic_splits

runner = CliRunner()


def one_line(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)
    return errors[0]


# -- ablations --------------------------------------------------------------------------------------------------


def test_empty_seed_list_is_refused(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('preset = "tiny"\nseeds = []\n')
    result = runner.invoke(app, ["ablate", str(path), "--report-only"])
    one_line(result, 2, "sweep.toml", "seeds = [] lists no seed")


def test_unknown_criterion_names_the_known_ones():
    result = runner.invoke(app, ["ablate", "--criterion", "dam,saliency"])
    one_line(result, 2, "unknown ranking 'saliency'", "dam, oam, random")


def test_another_sweep_never_writes_over_a_report(tmp_path, monkeypatch):
    """The shipped reports/default has no record of its sweep: a changed sweep gets a numbered folder, a
    chosen folder is refused unless --force, and the same sweep finds its folder again."""
    monkeypatch.chdir(tmp_path)
    shipped = tmp_path / "reports" / "default"
    shipped.mkdir(parents=True)
    (shipped / "ablation.md").write_text("the shipped report")
    changed = resolve_sweep(None, rankings=("dam",), keep_ratios=(0.1, 0.2, 0.3))
    logs = []
    placed = claim_report_folder(changed, log=logs.append)
    assert placed.name == "default-2" and placed.report_dir.as_posix() == "reports/default-2"
    assert placed.run_root.as_posix().endswith("runs/ablate/default-2")
    assert "reports/default holds another sweep's report" in logs[0]
    assert sorted(path.name for path in shipped.iterdir()) == ["ablation.md"]
    assert claim_report_folder(changed, log=logs.append).name == "default-2"  # the same sweep, the same folder
    other = resolve_sweep(None, rankings=("oam",))
    assert claim_report_folder(other, log=logs.append).name == "default-3"
    with pytest.raises(SweepError, match=r"reports/default holds the report of another sweep .* --force"):
        claim_report_folder(changed, chosen=True)
    assert claim_report_folder(changed, chosen=True, force=True).report_dir.resolve() == shipped
    # a record of the same sweep lets it write there; one that differs names the difference
    default = default_sweep()
    (shipped / SWEEP_FILE).write_text(tomli_w.dumps(sweep_to_dict(default)))
    assert claim_report_folder(default).name == "default"
    with pytest.raises(SweepError, match=r"keep_ratios \(stored \[0\.1\], now \[0\.1, 0\.2, 0\.3\]\)"):
        claim_report_folder(changed, chosen=True)


def test_ctrl_c_in_a_sweep_says_where_it_stopped(tmp_path, monkeypatch):
    splits = synthetic_splits(make_synthetic_dataset(tmp_path / "synth", num_train=2, num_val=1, image_size=64))
    paths = dict(zip(("train_images", "train_ann", "val_images", "val_ann"), (str(p) for p in splits)))
    path = tmp_path / "mini.toml"
    path.write_text(
        'preset = "tiny"\nrankings = ["dam"]\nkeep_ratios = [0.3]\nseeds = [0, 1]\n'
        + "".join(f'{key} = "{value}"\n' for key, value in paths.items())
        + f'output = "{tmp_path / "report"}"\nruns_dir = "{tmp_path / "runs"}"\n[train]\nepochs = 1\n'
    )

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupted)
    result = runner.invoke(app, ["ablate", str(path)])
    one_line(result, 130, "ablation mini stopped during run 1/4 (baseline (seed 0))", "run the same command again")
