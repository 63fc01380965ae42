"""Which folder a run writes to, by one rule: an identical command resumes its run, and a run of another
configuration never writes into an existing one.

A folder holds a run when it has a ``config.toml``. A command's resolved configuration is compared with it:

- the same, or differing only in what a resumed run may change (:data:`RESUMABLE_KEYS`: the learning
  rates, ``epochs`` and ``lr_drop``, workers, device, log and evaluation cadence, ...): the run continues
  there (it resumes, or reports that it has finished), with a notice listing the changed settings;
- another configuration: the default folder (no ``--output-dir``) gives way to a numbered one,
  ``runs/tiny-2``, ``runs/tiny-3``, ... (the first that holds this configuration's run, else the first free
  one, so an identical later command finds it again); a folder given explicitly is refused (another
  ``--output-dir``, or ``--force`` to start a new run there, replacing the files of the run it holds).

``--init`` starts a new run: its default folder is ``runs/<preset>-finetune`` (numbered the same way), and
it never writes into the run folder it reads from.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sparse_detr.checkpoint import CHECKPOINT_NAME
from sparse_detr.config.files import load_toml, parse_toml
from sparse_detr.data.annotations import category_label_map
from sparse_detr.data.source import DataSource
from sparse_detr.engine.run_config import CONFIG_FILE_NAME, RunConfig
from sparse_detr.errors import SparseDetrError, UsageError

# what a resumed run may change: the rest is another configuration
RESUMABLE_KEYS = frozenset(
    f"train.{name}"
    for name in (
        "lr", "lr_backbone", "lr_linear_proj_mult", "epochs", "lr_drop", "workers", "device", "log_every",
        "eval_every_epochs", "eval_batch_size", "checkpoint_every_iters", "tensorboard", "allow_other_categories",
        "resume", "auto_resume", "find_unused_parameters",
    )
)  # fmt: skip
# where the run is, not what it is; and the class count, which follows the data (compared by its files)
_IGNORED_KEYS = frozenset({"train.output_dir", "model.num_classes"})
# the files a run writes into its folder, removed by --force (a new run in the folder)
RUN_FILES = (
    CONFIG_FILE_NAME, "initial_weights.json", CHECKPOINT_NAME, "checkpoint*.pth", "metrics.jsonl",
    "metrics_final.json", "eval_epoch*.json", "detections_epoch*.json", "tensorboard",
)  # fmt: skip
_FORCE_HINT = (
    "use another --output-dir, or --force to start a new run there (replacing that run's checkpoint and metrics)"
)


@dataclass(frozen=True)
class RunFolder:
    """The folder a run writes to, and the one-line notice that says why when it is not the obvious one."""

    path: Path
    notice: str | None = None


def choose_run_folder(run_config: RunConfig, explicit: bool, force: bool = False) -> RunFolder:
    """The folder ``run_config`` writes to by the module's rule. ``explicit``: ``run_config.train.output_dir`` was given
    (an option, ``--set`` or a config file), so it is never replaced by another; ``force``: start a new run
    there whatever it holds (the caller removes the old run's files, :func:`clear_run`).

    Raises:
        UsageError: an explicit folder holds a run of another configuration, the run would write into the
            run folder its ``init`` reads from, or ``force`` comes with ``resume``.
    """
    if force and run_config.train.resume is not None:
        raise UsageError("--force starts a new run and --resume continues one: give one")
    base = Path(run_config.train.output_dir)
    if run_config.train.init is not None and not explicit:
        base = base.with_name(f"{base.name}-finetune")
    if force:
        notice = f"--force: a new run in {base}, replacing the run it held" if _holds_run(base) else None
        folder = RunFolder(base, notice)
    else:
        folder = _verdict(run_config, base)
        if isinstance(folder, str):
            if explicit:
                raise UsageError(f"{base} holds a run of another configuration ({folder}): {_FORCE_HINT}")
            folder = _numbered(run_config, base, folder)
    _check_not_init_source(run_config, folder.path)
    return folder


def _numbered(run_config: RunConfig, base: Path, reason: str) -> RunFolder:
    """The first of ``base-2``, ``base-3``, ... that holds this configuration's run, else the first free one."""
    free = None
    for number in itertools.count(2):
        candidate = base.with_name(f"{base.name}-{number}")
        if not _holds_run(candidate):
            free = free or candidate
            if not candidate.exists():
                break
        elif isinstance(folder := _verdict(run_config, candidate), RunFolder):
            notice = f"{base} holds a run of another configuration ({reason}); this configuration's run is {candidate}"
            return replace(folder, notice=notice + (f"; {folder.notice}" if folder.notice else ""))
    return RunFolder(free, f"{base} holds a run of another configuration ({reason}): this run goes to {free}")


def _verdict(run_config: RunConfig, folder: Path) -> RunFolder | str:
    """``folder`` when ``run_config`` may write there: it holds no run, or this run (up to resumable changes, which
    the notice names); else why not, in a few words."""
    differences = run_differences(run_config, folder)
    if differences is None:
        return RunFolder(folder)
    others = [key for key in differences if key not in RESUMABLE_KEYS]
    if others:
        return f"{', '.join(others[:4])}{', ...' if len(others) > 4 else ''} differ{'s' if len(others) == 1 else ''}"
    if _starts_anew(run_config):
        return "auto_resume is off, so this run would start over it"
    if not differences:
        return RunFolder(folder)
    changes = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in differences.items())
    return RunFolder(folder, f"continuing the run in {folder} with {changes}")


def _starts_anew(run_config: RunConfig) -> bool:
    return run_config.train.resume is None and not run_config.train.auto_resume


def _holds_run(folder: Path) -> bool:
    return (folder / CONFIG_FILE_NAME).is_file()


def _check_not_init_source(run_config: RunConfig, folder: Path) -> None:
    """A fine-tuning run never writes into the run folder it starts from (it would replace its source)."""
    if run_config.train.init is None or not Path(run_config.train.init).exists():
        return
    source = Path(run_config.train.init)
    source = source if source.is_dir() else source.parent
    if folder.exists() and source.resolve() == folder.resolve():
        raise UsageError(
            f"--init {run_config.train.init} is read from {folder}: write the new run to another --output-dir"
        )


def run_differences(run_config: RunConfig, folder: Path) -> dict[str, tuple[Any, Any]] | None:
    """Dotted key -> (stored value, ``run_config``'s) for each setting in which ``run_config`` differs from the run that
    ``folder`` holds (its ``config.toml``); None when it holds none. Data sources compare by the files they
    name, so ``--data DIR`` matches the stored paths of ``DIR``'s splits."""
    stored_file = folder / CONFIG_FILE_NAME
    if not stored_file.is_file():
        return None
    stored = _comparable(load_toml(stored_file, "run configuration"))
    current = _comparable(parse_toml(run_config.to_toml()))
    keys = [*current, *(key for key in stored if key not in current)]
    return {
        key: (stored.get(key), current.get(key))
        for key in keys
        if key not in _IGNORED_KEYS and stored.get(key) != current.get(key)
    }


def _comparable(document: Mapping[str, Any]) -> dict[str, Any]:
    """A config document as flat dotted keys, its data source as the absolute paths of its splits."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if key == "data":
            flat.update({f"data.{name}": path for name, path in _split_paths(value).items()})
        elif isinstance(value, dict):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def _split_paths(data: Mapping[str, Any]) -> dict[str, str]:
    """The absolute paths of the splits a ``[data]`` table names (as given when they cannot be resolved)."""
    try:
        paths = DataSource(**data).splits()._asdict()
    except (SparseDetrError, OSError, TypeError):
        paths = data
    return {name: os.path.abspath(path) for name, path in paths.items() if path is not None}


def clear_run(folder: str | Path) -> list[Path]:
    """Remove the files of the run ``folder`` holds (:data:`RUN_FILES`; nothing else), for a new run there;
    returns them."""
    removed = []
    for pattern in RUN_FILES:
        for path in sorted(Path(folder).glob(pattern)):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def with_data_classes(run_config: RunConfig) -> RunConfig:
    """``run_config`` with ``model.num_classes`` set from its training annotations' categories, as training sets it
    (:func:`~sparse_detr.data.annotations.category_label_map`); unchanged when they cannot be read yet
    (training then says why)."""
    try:
        ids = [category["id"] for category in read_categories(run_config.data.splits().train_ann)]
        num_classes = max(category_label_map(ids).values()) + 1
    except (SparseDetrError, OSError, ValueError, KeyError, TypeError):
        return run_config
    model = replace(run_config.config.model, num_classes=num_classes)
    return replace(run_config, config=replace(run_config.config, model=model))


def read_categories(path: str | Path) -> list[dict[str, Any]]:
    """The ``categories`` of a COCO instances file without parsing all of it: the key is looked for from the
    end (where COCO has it) and its list decoded alone; the whole file is parsed when that fails.

    Raises:
        OSError / ValueError / KeyError: the file cannot be read, or is no instances file.
    """
    key = b'"categories"'
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as content:
        start = content.rfind(key)
        if start >= 0:
            tail = content[start + len(key) :].decode("utf-8", errors="replace").lstrip()
            if tail.startswith(":"):
                try:
                    categories, _ = json.JSONDecoder().raw_decode(tail[1:].lstrip())
                except ValueError:
                    categories = None
                if isinstance(categories, list) and all(isinstance(item, dict) and "id" in item for item in categories):
                    return categories
        return json.loads(content[:])["categories"]
