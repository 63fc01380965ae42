"""Training and evaluation: the loop, one optimizer step, a run's set-up, COCO evaluation, optimizer, run
state, configuration, distributed helpers. (``TrainConfig`` and ``train_recipe`` live in
:mod:`sparse_detr.config`, with the presets; they are exported here too, where training code looks for them.)"""

from sparse_detr.config import TrainConfig, train_config_from_dict, train_config_to_dict, train_recipe
from sparse_detr.engine.evaluate import METRIC_KEYS, coco_metrics, evaluate, evaluate_checkpoint, format_metrics
from sparse_detr.engine.optim import build_optimizer, build_scheduler, lr_scale, param_groups
from sparse_detr.engine.setup import build_datasets
from sparse_detr.engine.step import StepResult, train_step
from sparse_detr.engine.trainer import NonFiniteLossError, train, train_run

__all__ = [
    "METRIC_KEYS",
    "NonFiniteLossError",
    "StepResult",
    "TrainConfig",
    "build_datasets",
    "build_optimizer",
    "build_scheduler",
    "coco_metrics",
    "evaluate",
    "evaluate_checkpoint",
    "format_metrics",
    "lr_scale",
    "param_groups",
    "train",
    "train_config_from_dict",
    "train_config_to_dict",
    "train_recipe",
    "train_run",
    "train_step",
]
