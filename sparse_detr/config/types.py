"""The configuration types: a model (:class:`ModelConfig`), its loss (:class:`LossConfig`), both named
(:class:`Config`), and a training run's settings (:class:`TrainConfig`); plain data, every field checked
(:mod:`sparse_detr.config.fields`) when an instance is made."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparse_detr.config.fields import (
    NON_NEGATIVE_FINITE,
    POSITIVE_FINITE,
    Allowed,
    at_least,
    check_fields,
    declare_ranges,
    field_names,
    from_to,
    keep_ratio_range,
    one_of,
)
from sparse_detr.errors import ConfigError

BACKBONES = ("r50", "swin-t")
TOKEN_RANKINGS = ("dam", "oam", "foreground", "salience", "random")
KEEP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
BACKBONE_NORMS = ("frozen_bn", "batch_norm")
MAX_IMAGE_SIZE = 8192  # the largest image size (shorter side) a run may ask for, 10x COCO's: beyond, no memory holds it
MAX_QUERIES = 10_000  # decoder self-attention grows with the square of the queries


@dataclass
class ModelConfig:
    """Architecture of Deformable DETR / Sparse DETR.

    ``backbone`` is ``"r50"``, ``"swin-t"`` or a timm ResNet name (``"resnet18"``) for small models.
    ``pretrained_backbone`` is what the backbone starts from when a run trains it: ``"imagenet"`` (the
    reference's weights: torchvision's ResNet-50 IMAGENET1K_V1, the official Swin-T ImageNet-1k),
    ``"timm"`` (timm's default weights for the backbone), a local weights file, or ``"none"`` (random;
    the backbone must then train its norm layers and every stage). ``build_model`` alone never loads
    them: see :mod:`sparse_detr.models.backbone_weights`.
    ``keep_ratio`` is the share ρ of encoder tokens that are encoded (0 = every token, no scoring:
    :attr:`is_sparse` is False).
    ``token_ranking`` picks how tokens are ranked when ρ > 0: ``"dam"`` (scoring network trained on
    the decoder attention map), ``"oam"`` (objectness of a detection head), ``"foreground"`` (the scoring
    network trained on Focus-DETR's foreground labels from the boxes, its loss weighted 1.5 x
    ``mask_prediction_coef``), ``"salience"`` (on Salience-DETR's scale-independent salience, 2 x) or
    ``"random"``.
    ``backbone_norm`` (ResNets only) is ``"frozen_bn"`` as in the reference, which needs pretrained
    statistics, or ``"batch_norm"`` (trained, for backbones learned from scratch); the first
    ``backbone_frozen_stages`` stages do not train (ResNet 1: the stem, 2: the stem and layer1; Swin-T 1: the
    patch embedding, 2: it and stage 1; 2 is the reference's setting for both).
    """

    backbone: str = "r50"
    pretrained_backbone: str = "imagenet"
    backbone_norm: str = "frozen_bn"
    backbone_frozen_stages: int = 2
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    num_classes: int = 91
    two_stage: bool = False
    with_box_refine: bool = False
    keep_ratio: float = 0.0
    use_enc_aux_loss: bool = False
    token_ranking: str = "dam"
    aux_loss: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if self.hidden_dim % self.nheads != 0:
            raise ConfigError(f"hidden_dim ({self.hidden_dim}) must be divisible by nheads ({self.nheads})")

    @property
    def is_sparse(self) -> bool:
        """Whether the encoder ranks tokens and encodes only the top ρ (Sparse DETR)."""
        return self.keep_ratio > 0


@dataclass
class LossConfig:
    """Loss weights and matching costs (SPEC §6)."""

    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_prediction_coef: float = 1.0
    focal_alpha: float = 0.25
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Config:
    """Everything needed to rebuild a model and its criterion."""

    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)


AMP_MODES = (None, "bf16", "fp16")  # utils.precision.AMP_DTYPES maps them to dtypes (config stays torch-free)


@dataclass
class TrainConfig:
    """Optimizer, schedule, batching, precision, checkpointing and output of one run.

    Learning rates are given for a total batch of 16 images; with ``scale_lr`` the run multiplies ``lr``
    and ``lr_backbone`` by sqrt(total / 16), total = ``batch_size`` x processes x ``grad_accum``.
    Parameters whose name contains one of ``linear_proj_names`` train at ``lr x lr_linear_proj_mult``,
    those containing one of ``backbone_names`` at ``lr_backbone``.

    The learning rates drop x0.1 once, after epoch ``lr_drop`` (never when ``lr_drop >= epochs``).
    ``image_size`` is the evaluation shorter side; training sizes follow the COCO recipe scaled by
    ``image_size / 800`` (see :func:`sparse_detr.data.scaled_sizes`). ``checkpoint_every_iters`` counts
    optimizer steps (0: only at the end of each epoch). ``iters_per_epoch`` caps the batches of an epoch
    (None: the whole training set), for quick runs and tests.

    ``init`` starts a new run from the weights of a checkpoint (a file, run folder or zoo name: fine-tuning,
    see :mod:`sparse_detr.engine.finetune`) instead of the backbone's pretrained weights; ``resume``
    continues a run (on the categories it started with, unless ``allow_other_categories``).
    ``tensorboard`` mirrors ``metrics.jsonl`` to TensorBoard event files.
    """

    epochs: int = 50
    lr_drop: int = 40
    batch_size: int = 2
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    backbone_names: tuple[str, ...] = ("backbone.0",)
    linear_proj_names: tuple[str, ...] = ("sampling_offsets", "reference_points")
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    scale_lr: bool = True
    amp: str | None = None
    grad_accum: int = 1
    seed: int = 42
    workers: int = 2
    image_size: int = 800
    iters_per_epoch: int | None = None
    init: str | None = None
    checkpoint_every_iters: int = 0
    eval_every_epochs: int = 1
    eval_batch_size: int | None = None
    output_dir: str = "runs/default"
    resume: str | None = None
    auto_resume: bool = True
    device: str | None = None
    log_every: int = 20
    tensorboard: bool = False
    allow_other_categories: bool = False
    find_unused_parameters: bool = True

    def __post_init__(self) -> None:
        self.output_dir = str(self.output_dir)
        if self.resume is not None:
            self.resume = str(self.resume)
        if self.init is not None:
            self.init = str(self.init)
            if self.resume is not None:
                raise ConfigError(
                    "init starts a new run from a checkpoint's weights and resume continues a run: give one"
                )
        check_fields(self)
        if self.iters_per_epoch is not None and self.iters_per_epoch < self.grad_accum:
            raise ConfigError(
                f"iters_per_epoch ({self.iters_per_epoch}) must be at least grad_accum ({self.grad_accum})"
            )

    @property
    def batch_size_eval(self) -> int:
        return self.eval_batch_size or self.batch_size


declare_ranges(
    ModelConfig,
    {
        "token_ranking": one_of(TOKEN_RANKINGS),
        "backbone_norm": one_of(BACKBONE_NORMS),
        "backbone_frozen_stages": from_to(0, 5),
        "hidden_dim": Allowed(lambda value: value > 0 and value % 32 == 0, "a positive multiple of 32"),
        **{name: at_least(1) for name in ("nheads", "enc_layers", "dec_layers", "dim_feedforward")},
        "dropout": Allowed(lambda value: 0 <= value < 1, "a number in [0, 1)"),
        "num_feature_levels": at_least(3),
        "enc_n_points": at_least(1),
        "dec_n_points": at_least(1),
        "num_queries": from_to(1, MAX_QUERIES),
        "num_classes": at_least(1),
        "keep_ratio": keep_ratio_range(dense=True),
    },
)

declare_ranges(
    LossConfig,
    {
        **{name: NON_NEGATIVE_FINITE for name in field_names(LossConfig) if name != "focal_alpha"},
        "focal_alpha": Allowed(lambda value: 0 <= value <= 1, "a number in [0, 1]"),
    },
)

declare_ranges(
    TrainConfig,
    {
        **{name: POSITIVE_FINITE for name in ("lr", "lr_backbone", "lr_linear_proj_mult")},
        "weight_decay": NON_NEGATIVE_FINITE,
        "clip_max_norm": NON_NEGATIVE_FINITE,
        "amp": one_of(tuple(mode for mode in AMP_MODES if mode is not None)),
        "image_size": from_to(1, MAX_IMAGE_SIZE),
        **{name: at_least(1) for name in ("epochs", "lr_drop", "batch_size", "grad_accum")},
        **{name: at_least(1) for name in ("eval_every_epochs", "log_every", "eval_batch_size")},
        "iters_per_epoch": at_least(1),
        "seed": from_to(0, 2**32 - 1),
        "workers": at_least(0),
        "checkpoint_every_iters": at_least(0),
    },
)
