"""What an ablation trains: a typed :class:`Sweep` (from an ``experiments/*.toml`` file or the built-in
default, changed by command-line options) and its expansion into named :class:`Run` s.

A sweep file holds the :class:`Sweep` fields at the top level and four tables: ``[train]`` (fields of
:class:`~sparse_detr.engine.TrainConfig`), ``[model]`` (fields of :class:`~sparse_detr.config.ModelConfig`
applied to every run), ``[benchmark]`` (:class:`BenchmarkSettings`) and ``[launcher]`` (where the runs train:
:class:`~sparse_detr.config.launcher.LauncherSettings`). Relative paths are relative to the current folder.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_detr.config import (
    DEFAULT_PRESET,
    TOKEN_RANKINGS,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    check_field,
    check_fields,
    check_preset,
    field_names,
    get_preset,
    keep_ratio_range,
    load_toml,
    train_recipe,
)
from sparse_detr.config.fields import at_least, declare_ranges
from sparse_detr.config.launcher import LauncherSettings, launcher_from_dict
from sparse_detr.data.source import DataSource
from sparse_detr.errors import ConfigError

# set by each run, so a sweep may not fix them for all runs
RUN_MODEL_FIELDS = ("keep_ratio", "token_ranking", "use_enc_aux_loss")
# where each run's files go, and its seed, are decided by the sweep
RUN_TRAIN_FIELDS = ("output_dir", "resume", "auto_resume", "seed")
DATA_FIELDS = ("data", "train_images", "train_ann", "val_images", "val_ann")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SweepError(ConfigError):
    """A sweep file or option is invalid; the message says which key and what to change."""


@dataclass(frozen=True)
class BenchmarkSettings:
    """How each trained model is measured besides its AP.

    GFLOPs and FPS use the first ``images`` validation images at the evaluation size, FPS in batches of
    ``batch_size`` after ``warmup`` untimed passes: the median of ``iters`` timed passes, with their
    quartiles. The DAM coverage uses the first ``coverage_images`` validation images (all when None).
    """

    images: int = 8
    batch_size: int = 1
    warmup: int = 4
    iters: int = 40
    coverage_images: int | None = None

    def __post_init__(self) -> None:
        try:
            check_fields(self)
        except ConfigError as error:
            raise SweepError(f"[benchmark] {error}") from None


declare_ranges(
    BenchmarkSettings,
    {"images": at_least(1), "batch_size": at_least(1), "warmup": at_least(0), "iters": at_least(1),
     "coverage_images": at_least(1)},
)  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One model to train: the variant ``name`` trained with ``seed``. ``ranking`` ranks the tokens
    (``baseline``: every token is encoded, no scoring network), ``keep_ratio`` is the keep ratio it trains
    at (0 for the baseline), ``enc_aux_loss`` whether the sparse encoder's auxiliary heads are trained, and
    ``eval_keep_ratios`` the keep ratios it is also evaluated at (the inference-time sweep)."""

    name: str
    ranking: str
    keep_ratio: float
    enc_aux_loss: bool
    eval_keep_ratios: tuple[float, ...] = ()
    seed: int = TrainConfig.seed

    @property
    def folder(self) -> str:
        """The run's folder under the sweep's ``runs_dir``: ``dam-rho0.1/seed42``."""
        return f"{self.name}/seed{self.seed}"

    @property
    def label(self) -> str:
        """``dam-rho0.1 (seed 42)``."""
        return f"{self.name} (seed {self.seed})"

    def model_overrides(self) -> dict[str, Any]:
        """Dotted :func:`~sparse_detr.config.apply_overrides` keys that make the preset this run's model."""
        sparse = self.ranking != "baseline"
        return {
            "model.keep_ratio": self.keep_ratio,
            "model.use_enc_aux_loss": self.enc_aux_loss,
            **({"model.token_ranking": self.ranking} if sparse else {}),
        }


def run_name(ranking: str, keep_ratio: float, enc_aux_loss: bool = True) -> str:
    """``dam-rho0.1``, ``oam-rho0.3-noaux``, ``random-rho0.1`` or ``baseline``."""
    if ranking == "baseline":
        return "baseline"
    return f"{ranking}-rho{keep_ratio:g}" + ("" if enc_aux_loss else "-noaux")


@dataclass(frozen=True)
class Sweep:
    """A set of runs sharing a preset, data, training recipe and measurement settings.

    Runs: ``baseline`` (the preset with every token encoded and no encoder aux loss: Deformable DETR
    with top-k queries and box refinement for the sparse presets); one run per token ranking in
    ``rankings`` and keep ratio in ``keep_ratios``; with ``random``, random token selection at each ρ; with
    ``no_enc_aux``, each (ranking, ρ) again without the encoder aux loss. ``eval_keep_ratios``
    evaluates the model trained at ``eval_train_keep_ratio`` with ``eval_ranking`` at each of those keep
    ratios (the inference-time sweep; that model is trained when no other run is it). They default to the
    first ρ and the first ranking. Every run is trained once per seed in ``seeds`` (empty: the recipe's
    seed), so that the report can give intervals over seeds.

    Data: a COCO root (``data``), the four explicit paths, or neither for the built-in synthetic set.
    ``train`` overrides fields of the preset's training recipe (``train_recipe``), ``model`` fields of the
    preset's model. Reports go to ``output`` (default ``reports/<name>``), run folders (checkpoints, logs)
    under ``runs_dir`` (default ``runs/ablate/<name>``). ``launcher`` says where the runs train (this process, or
    a Slurm job array); a run's batch is ``batch_size`` x ``grad_accum`` images per step however many processes
    train it.
    """

    name: str = "default"
    preset: str = DEFAULT_PRESET
    backbone: str | None = None
    rankings: tuple[str, ...] = ("dam",)
    keep_ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    baseline: bool = True
    random: bool = False
    no_enc_aux: bool = False
    eval_keep_ratios: tuple[float, ...] = ()
    eval_train_keep_ratio: float | None = None
    eval_ranking: str | None = None
    seeds: tuple[int, ...] = ()
    data: str | None = None
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    output: str | None = None
    runs_dir: str | None = None
    device: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    benchmark: BenchmarkSettings = field(default_factory=BenchmarkSettings)
    launcher: LauncherSettings = field(default_factory=LauncherSettings)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise SweepError(f"name {self.name!r} must be a folder name: letters, digits, '.', '_' or '-'")
        check_preset(self.preset, SweepError)
        for ranking in (*self.rankings, *([self.eval_ranking] if self.eval_ranking else [])):
            if ranking not in TOKEN_RANKINGS:
                raise SweepError(f"unknown ranking {ranking!r}; rankings: {', '.join(TOKEN_RANKINGS)}")
        keep_ratios = keep_ratio_range()
        for key, values in (("keep_ratios", self.keep_ratios), ("eval_keep_ratios", self.eval_keep_ratios)):
            bad = [v for v in values if not keep_ratios.test(v)]
            if bad:
                raise SweepError(f"{key}: each value must be {keep_ratios.text}, got {bad}")
        if self.eval_keep_ratios and self.eval_model_keep_ratio is None:
            raise SweepError(
                "eval_keep_ratios needs eval_train_keep_ratio (the keep ratio that model trains at) or keep_ratios"
            )
        if len(set(self.seeds)) != len(self.seeds) or any(seed < 0 for seed in self.seeds):
            raise SweepError(f"seeds must be distinct integers of at least 0, got {list(self.seeds)}")
        if self.eval_train_keep_ratio is not None and not keep_ratios.test(self.eval_train_keep_ratio):
            raise SweepError(f"eval_train_keep_ratio must be {keep_ratios.text}, got {self.eval_train_keep_ratio}")
        explicit = [getattr(self, key) for key in DATA_FIELDS[1:]]
        if any(explicit) and (self.data is not None or not all(explicit)):
            raise SweepError("give either data (a COCO root) or all of train_images, train_ann, val_images, val_ann")
        _check_table("train", self.train, TrainConfig, RUN_TRAIN_FIELDS)
        _check_table("model", self.model, ModelConfig, RUN_MODEL_FIELDS)
        _check_values(self)
        if not self.runs():
            raise SweepError("the sweep has no runs: give keep_ratios, baseline = true or eval_keep_ratios")

    @property
    def eval_model_keep_ratio(self) -> float | None:
        """The keep ratio the inference-time sweep's model trains at: ``eval_train_keep_ratio``, else the first ρ."""
        if self.eval_train_keep_ratio is not None:
            return self.eval_train_keep_ratio
        return self.keep_ratios[0] if self.keep_ratios else None

    @property
    def eval_model_ranking(self) -> str:
        """The ranking of the inference-time sweep's model: ``eval_ranking``, else the first ranking."""
        return self.eval_ranking or (self.rankings[0] if self.rankings else "dam")

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds every run trains with: ``seeds``, else the training recipe's one seed."""
        return self.seeds or (train_recipe(self.preset, **self.train).seed,)

    @property
    def report_dir(self) -> Path:
        return Path(self.output) if self.output else Path("reports") / self.name

    @property
    def run_root(self) -> Path:
        return Path(self.runs_dir) if self.runs_dir else Path("runs") / "ablate" / self.name

    @property
    def data_source(self) -> DataSource:
        """Where the sweep's images and annotations are (``data`` is a dataset folder)."""
        return DataSource(self.data, self.train_images, self.train_ann, self.val_images, self.val_ann)

    def variants(self) -> list[Run]:
        """The models to compare, each once (with the first seed), in a fixed order: baseline, rankings x ρ,
        without aux loss, random, inference model."""
        specs: list[tuple[str, float, bool]] = [("baseline", 0.0, False)] if self.baseline else []
        specs += [(ranking, keep_ratio, True) for ranking in self.rankings for keep_ratio in self.keep_ratios]
        if self.no_enc_aux:
            specs += [(ranking, keep_ratio, False) for ranking in self.rankings for keep_ratio in self.keep_ratios]
        if self.random:
            specs += [("random", keep_ratio, True) for keep_ratio in self.keep_ratios]
        if self.eval_keep_ratios:
            specs.append((self.eval_model_ranking, self.eval_model_keep_ratio, True))
        runs: dict[str, Run] = {}
        for ranking, keep_ratio, enc_aux_loss in specs:
            name = run_name(ranking, keep_ratio, enc_aux_loss)
            runs.setdefault(name, Run(name, ranking, keep_ratio, enc_aux_loss))
        if self.eval_keep_ratios:
            name = run_name(self.eval_model_ranking, self.eval_model_keep_ratio)
            runs[name] = dataclasses.replace(runs[name], eval_keep_ratios=tuple(self.eval_keep_ratios))
        first_seed = self.run_seeds[0]
        return [dataclasses.replace(run, seed=first_seed) for run in runs.values()]

    def runs(self) -> list[Run]:
        """Every variant with every seed, seed by seed (so that an interrupted sweep has whole seeds); the
        order decides the shards."""
        variants = self.variants()
        return [dataclasses.replace(run, seed=seed) for seed in self.run_seeds for run in variants]


def _check_values(sweep: Sweep) -> None:
    """Build the preset's model config and training recipe once, so that a bad value fails before any run."""
    try:
        train_recipe(sweep.preset, **sweep.train)
    except (TypeError, ValueError) as error:
        raise SweepError(f"[train]: {error}") from None
    try:
        apply_overrides(get_preset(sweep.preset, sweep.backbone), {f"model.{k}": v for k, v in sweep.model.items()})
    except (TypeError, ValueError) as error:
        raise SweepError(f"[model]: {error}") from None


def _check_table(table: str, values: dict[str, Any], cls: type, reserved: tuple[str, ...]) -> None:
    """Check each key of a ``[train]`` / ``[model]`` table against the fields of ``cls`` (name and type);
    values are converted in place (an integer for a float field becomes a float)."""
    known = [name for name in field_names(cls) if name not in reserved]
    for key, value in values.items():
        if key in reserved:
            raise SweepError(f"[{table}] {key} is set by each run of the sweep and cannot be given")
        if key not in known:
            raise SweepError(f"unknown key [{table}] {key!r}; known: {', '.join(known)}")
        try:
            values[key] = check_field(cls, key, value, f"[{table}] {key}")
        except ConfigError as error:
            raise SweepError(str(error)) from None


DEFAULT_SWEEP_FILE = Path(__file__).with_name("default.toml")


def default_sweep() -> Sweep:
    """The ablation ``sdetr ablate`` runs with no experiment file: the one in :data:`DEFAULT_SWEEP_FILE`."""
    return load_sweep(DEFAULT_SWEEP_FILE)


# A sweep file's values are checked against the fields' types by the configuration's one field check; these
# keys need more: a table, and seeds = [] (which would silently mean the recipe's one seed).
def _checked(cls: type, key: str, value: Any, name: str | None = None) -> Any:
    try:
        return check_field(cls, name or key, value, key)
    except ConfigError as error:
        raise SweepError(str(error)) from None


def _seeds(key: str, value: Any) -> tuple[int, ...]:
    if value == []:
        raise SweepError(f"{key} = [] lists no seed: give at least one, or leave {key} out for the recipe's seed")
    return _checked(Sweep, key, value)


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SweepError(f"{key} must be a table ([{key}]), got {value!r}")
    return dict(value)


def _benchmark(key: str, value: Any) -> BenchmarkSettings:
    table, known = _table(key, value), field_names(BenchmarkSettings)
    for name, item in table.items():
        if name not in known:
            raise SweepError(f"unknown key [benchmark] {name!r}; known: {', '.join(known)}")
        table[name] = _checked(BenchmarkSettings, f"[benchmark] {name}", item, name)
    return BenchmarkSettings(**table)


def _launcher(key: str, value: Any) -> LauncherSettings:
    try:
        return launcher_from_dict(_table(key, value))
    except ConfigError as error:
        raise SweepError(str(error)) from None


_PARSERS: dict[str, Callable[[str, Any], Any]] = {"seeds": _seeds, "train": _table, "model": _table,
                                                  "benchmark": _benchmark, "launcher": _launcher}  # fmt: skip


def sweep_from_dict(data: dict[str, Any], default_name: str = "default") -> Sweep:
    """A :class:`Sweep` from a parsed TOML document; ``name`` defaults to ``default_name``."""
    known = field_names(Sweep)
    unknown = [key for key in data if key not in known]
    if unknown:
        raise SweepError(f"unknown key {unknown[0]!r}; known: {', '.join(known)}")
    values = {key: _PARSERS.get(key, functools.partial(_checked, Sweep))(key, value) for key, value in data.items()}
    return Sweep(**{"name": default_name, **values})


def sweep_to_dict(sweep: Sweep) -> dict[str, Any]:
    """The experiment file that gives ``sweep`` back (unset fields left out, tuples as lists)."""

    def toml_ready(values: dict[str, Any]) -> dict[str, Any]:
        return {
            key: toml_ready(value) if isinstance(value, dict) else list(value) if isinstance(value, tuple) else value
            for key, value in values.items()
            if value is not None and value != {}
        }

    document = toml_ready(dataclasses.asdict(sweep))
    if sweep.launcher == LauncherSettings():  # the default: this process
        del document["launcher"]
    return document


# what does not change a sweep's results: where they are written and on what they run
_PLACEMENT_FIELDS = ("name", "output", "runs_dir", "device", "launcher")


def placement_free(document: dict[str, Any]) -> dict[str, Any]:
    """A :func:`sweep_to_dict` document without where and on what it runs: what decides its results."""
    return {key: value for key, value in document.items() if key not in _PLACEMENT_FIELDS}


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file; any error names the file and the key. The name defaults to the file's stem."""
    path = Path(path)
    try:
        data = load_toml(path, "experiment file")
    except ConfigError as error:
        raise SweepError(str(error)) from None
    try:
        return sweep_from_dict(data, default_name=path.stem)
    except (SweepError, TypeError) as error:
        raise SweepError(f"{path}: {error}") from None


def with_changes(sweep: Sweep, **changes: Any) -> Sweep:
    """``sweep`` with the given fields replaced (None: unchanged). ``epochs``, ``iters_per_epoch`` and
    ``workers`` go into the ``train`` table; ``seed_count`` N trains every run with N seeds: the sweep's
    first seed and the ones after it."""
    changes = {key: value for key, value in changes.items() if value is not None}
    if "seed_count" in changes:
        count = changes.pop("seed_count")
        if count < 1:
            raise SweepError(f"--seeds must be at least 1, got {count}")
        first = (changes.get("seeds") or sweep.run_seeds)[0]
        changes["seeds"] = tuple(range(first, first + count))
    train_keys = [key for key in ("epochs", "iters_per_epoch", "workers") if key in changes]
    if train_keys:
        changes["train"] = {**sweep.train, **{key: changes.pop(key) for key in train_keys}}
    if "data" in changes:  # a COCO root replaces the sweep's explicit paths
        changes.update(dict.fromkeys(DATA_FIELDS[1:], None))
    unknown = [key for key in changes if key not in field_names(Sweep)]
    if unknown:
        raise SweepError(f"unknown sweep option {unknown[0]!r}")
    return dataclasses.replace(sweep, **changes)


def resolve_sweep(path: str | Path | None = None, **changes: Any) -> Sweep:
    """The sweep of an experiment file, or with none: the built-in :func:`default_sweep` unless another
    ``preset`` is asked for, which then trains with its own recipe at the paper's ρ 0.1…0.5 (DAM, with the
    baseline). ``changes`` as in :func:`with_changes`."""
    if path is not None:
        base = load_sweep(path)
    elif changes.get("preset") not in (None, default_sweep().preset):
        base = Sweep(name=changes["preset"], preset=changes["preset"])
    else:
        base = default_sweep()
    return with_changes(base, **changes)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise SweepError(f"--shard must be I/N with 0 <= I < N, such as 0/2, got {text!r}")
    return int(match[1]), int(match[2])


def shard_runs(runs: list[Run], index: int, count: int) -> list[Run]:
    """The runs of shard ``index`` of ``count``: those at positions p with p % count == index."""
    return [run for position, run in enumerate(runs) if position % count == index]
