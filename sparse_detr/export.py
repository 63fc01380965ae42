"""ONNX export of a detector, and the exported file run with onnxruntime like the detector.

One file serves every batch size and image size: the graph is captured by ``torch.export`` with dynamic
batch, height and width, and nothing in the model reads a shape from a tensor's values (level shapes come
from the feature maps' sizes, the sparse encoder's per-image counts stay tensors and its top-k width is a
bound computed from the token count, see :meth:`~sparse_detr.models.TokenSelection.top`). The deformable
attention op takes one of three forms (``msda``, :mod:`sparse_detr.ops.onnx`): standard ONNX operators that
any runtime runs (``gridsample``), one node that onnxruntime runs with the project's kernel (``custom``), or
TensorRT's plugin node (``tensorrt``).

Inputs: ``images`` (N, 3, H, W) float32 normalized as in evaluation and ``mask`` (N, H, W) bool, True on
padding; with ``postprocess``, also ``orig_sizes`` (N, 2) int64 (height, width of each original image).
Outputs: ``pred_logits`` (N, Q, C) and ``pred_boxes`` (N, Q, 4) cxcywh in [0, 1]; with ``postprocess``,
``scores`` (N, K), ``labels`` (N, K) int64 and ``boxes`` (N, K, 4) xyxy in pixels, K = min(100, Q * C),
as :func:`~sparse_detr.models.postprocess` gives them. The file's metadata (``sparse_detr`` key, JSON)
holds the classes, the image size the model was trained for, the keep ratio and the ``msda`` form.

:class:`OnnxDetector` runs a file with onnxruntime or OpenVINO (``runtime``), like the detector.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from sparse_detr.checkpoint import Category, load_for_inference
from sparse_detr.config import MAX_IMAGE_SIZE, keep_ratio_range
from sparse_detr.errors import InputError, MissingFileError, UnavailableError, UsageError
from sparse_detr.models import DeformableDETR, pad_images
from sparse_detr.models.postprocess import MAX_DETECTIONS, top_detections
from sparse_detr.ops.loader import BackendUnavailableError
from sparse_detr.ops.onnxruntime_library import library_path
from sparse_detr.utils.io import atomic_write, check_writable
from sparse_detr.zoo import resolve_checkpoint

DEFAULT_OPSET = 18  # onnxruntime, OpenVINO (no GridSample from opset 20 on) and TensorRT all import it
RUNTIMES = ("onnxruntime", "openvino")
METADATA_KEY = "sparse_detr"
IMAGE_SIZES = range(16, MAX_IMAGE_SIZE + 1)  # the shorter sides a file's metadata may give (a forged one is refused)
INSTALL_HINT = "pip install 'sparse-detr[onnx]' (onnx, onnxscript and onnxruntime)"
OPENVINO_HINT = "pip install 'sparse-detr[openvino]'"


def _require(module: str):
    """Import ``module`` of the optional ONNX extra, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UnavailableError(f"ONNX export and onnxruntime inference need {module}: {INSTALL_HINT}") from None


def require_export_packages(run: bool = True) -> None:
    """Check that onnx and onnxscript (and onnxruntime, to ``run`` the file) can be imported.

    Raises:
        UnavailableError: one line naming the missing package and how to install it.
    """
    for module in ("onnx", "onnxscript") + (("onnxruntime",) if run else ()):
        _require(module)


def supported_opsets() -> range:
    """The ONNX opsets ``sdetr export`` writes: from the lowest one torch's exporter implements (it converts
    to a lower one asked for, and silently keeps its own when the conversion fails) and the deformable
    attention op's GridSample needs, to the highest one the exporter knows."""
    from sparse_detr.ops.onnx import MIN_OPSET

    try:
        from torch.onnx import _constants
        from torch.onnx._internal.exporter import _constants as exporter_constants

        lowest, highest = exporter_constants.TORCHLIB_OPSET, _constants.ONNX_MAX_OPSET
    except (ImportError, AttributeError):  # private names: another torch release may move them
        lowest, highest = MIN_OPSET, _require("onnx").defs.onnx_opset_version()
    return range(max(MIN_OPSET, lowest), highest + 1)


def check_opset(opset: int) -> None:
    """Refuse an opset ``sdetr export`` cannot write (see :func:`supported_opsets`) before any work.

    Raises:
        UsageError: naming --opset and the supported range.
    """
    from sparse_detr.ops.onnx import MIN_OPSET

    opsets = supported_opsets()
    if opset not in opsets:
        raise UsageError(
            f"--opset {opset} is not supported: give {opsets[0]} to {opsets[-1]} (the opsets torch "
            f"{torch.__version__.split('+')[0]} exports; the deformable attention op needs GridSample, opset "
            f"{MIN_OPSET} or later)"
        )


class _ExportedGraph(nn.Module):
    """The detector's forward pass as the exported graph sees it: fixed keep ratio, tensors out."""

    def __init__(self, model: DeformableDETR, keep_ratio: float | None, top_k: int | None):
        super().__init__()
        self.model, self.keep_ratio, self.top_k = model, keep_ratio, top_k

    def forward(self, images: torch.Tensor, mask: torch.Tensor, orig_sizes: torch.Tensor | None = None):
        outputs = self.model(images, mask, keep_ratio=self.keep_ratio)
        if self.top_k is None:
            return outputs["pred_logits"], outputs["pred_boxes"]
        return top_detections(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes, self.top_k)


def _sample_inputs(model: DeformableDETR, postprocess: bool) -> tuple[torch.Tensor, ...]:
    """Two images of different sizes padded into one batch: the tracing example (its values do not matter,
    its sizes only need enough tokens for the queries)."""
    generator = torch.Generator().manual_seed(0)
    images, mask = pad_images(
        [torch.randn(3, 320, 416, generator=generator), torch.randn(3, 288, 448, generator=generator)]
    )
    if not postprocess:
        return images, mask
    return images, mask, torch.tensor([[480, 624], [432, 672]])


def export_onnx(
    model: DeformableDETR,
    out: str | Path,
    keep_ratio: float | None = None,
    opset: int = DEFAULT_OPSET,
    postprocess: bool = False,
    metadata: Mapping[str, Any] | None = None,
    verify: Callable[[Path], None] | None = None,
    msda: str = "gridsample",
) -> Path:
    """Write ``model`` (made float32, on the CPU, in eval mode, at ``keep_ratio``) as one ONNX file ``out``
    with dynamic batch, height and width; see the module docstring for its inputs and outputs.

    The file is written to a temporary beside ``out`` and checked there (``onnx.checker``, the opset, then
    ``verify(temporary)`` when given) before it takes its name: a failed export leaves no file, and an
    existing ``out`` stays as it was.

    Args:
        keep_ratio: the encoder keep ratio ρ the graph encodes with (default the model's), fixed in the file.
        opset: the ONNX opset (see :func:`supported_opsets`).
        postprocess: end the graph with the top-100 detections in original-image pixels.
        metadata: JSON-able facts stored in the file (classes, image size); the keep ratio is added.
        msda: the form of deformable attention in the graph: ``gridsample``, ``custom`` or ``tensorrt``
            (see :mod:`sparse_detr.ops.onnx`).

    Raises:
        UnavailableError: onnx or onnxscript is not installed.
        UsageError: an opset outside :func:`supported_opsets`.
        InputError: the written graph fails its checks (nothing is left on disk).
    """
    require_export_packages(run=False)
    check_opset(opset)
    check_msda(msda)
    from sparse_detr.ops.onnx import TRANSLATED_OP, ms_deform_attn_translation

    model = model.float().cpu().eval()
    if keep_ratio is not None:
        model.set_keep_ratio(keep_ratio)  # checks it
    keep_ratio = model.keep_ratio
    logits_per_image = model.config.model.num_queries * model.config.model.num_classes
    top_k = min(MAX_DETECTIONS, logits_per_image) if postprocess else None
    graph = _ExportedGraph(model, keep_ratio, top_k).eval()
    dynamic = torch.export.Dim.DYNAMIC
    dynamic_shapes = {"images": {0: dynamic, 2: dynamic, 3: dynamic}, "mask": {0: dynamic, 1: dynamic, 2: dynamic}}
    input_names = ["images", "mask"]
    output_names = ["pred_logits", "pred_boxes"]
    if postprocess:
        dynamic_shapes["orig_sizes"] = {0: dynamic}
        input_names.append("orig_sizes")
        output_names = ["scores", "labels", "boxes"]
    optimizer_log = logging.getLogger("onnxscript")  # its notes on folding are not the user's business
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            graph, _sample_inputs(model, postprocess), dynamo=True, dynamic_shapes=dynamic_shapes,
            custom_translation_table={TRANSLATED_OP: ms_deform_attn_translation(opset, msda)}, opset_version=opset,
            input_names=input_names, output_names=output_names, verbose=False,
        )  # fmt: skip
    finally:
        optimizer_log.setLevel(level)
    facts = {**(metadata or {}), "keep_ratio": keep_ratio, "postprocess": postprocess, "opset": opset, "msda": msda}
    program.model.metadata_props[METADATA_KEY] = json.dumps(facts)

    def save_checked(tmp: Path) -> None:
        program.save(str(tmp), external_data=False)
        written = program.model.opset_imports.get("", opset)
        if written != opset:
            raise InputError(f"torch's exporter wrote opset {written} instead of {opset}: {out} was not written")
        check_onnx(tmp, name=out)
        if verify is not None:
            verify(tmp)

    return atomic_write(out, save_checked)


def check_msda(msda: str) -> None:
    """Refuse an unknown ``--msda`` form with one line naming the valid ones."""
    from sparse_detr.ops.onnx import MSDA_FORMATS

    if msda not in MSDA_FORMATS:
        raise UsageError(f"--msda {msda!r} is not a form of deformable attention: use one of {', '.join(MSDA_FORMATS)}")


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def check_onnx(path: str | Path, name: str | Path | None = None) -> None:
    """``onnx.checker`` on the file (its full check, shape inference included); ``name``: what the message
    calls the file (its final name, for a temporary).

    Raises:
        InputError: naming the file and the checker's first line.
    """
    onnx = _require("onnx")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise InputError(f"{name or path} is not a valid ONNX model: {_first_line(error)}") from None


def _check_number(value: Any, name: str | Path, key: str, allowed: str, valid: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
        raise InputError(
            f"{name}: its metadata's '{key}' must be {allowed}, got {value!r}: export the checkpoint again "
            "with `sdetr export`"
        )


def file_metadata(model: DeformableDETR, categories: Mapping[int, Category], image_size: int) -> dict[str, Any]:
    """What an exported file stores for :class:`OnnxDetector` besides the graph (see :func:`read_metadata`):
    the classes the model predicts and the image size it runs at."""
    return {
        "image_size": image_size,
        "num_classes": model.config.model.num_classes,
        "categories": {str(label): {"id": c.id, "name": c.name} for label, c in categories.items()},
    }


def read_metadata(stored: str | None, name: str | Path) -> dict[str, Any]:
    """The ``sparse_detr`` metadata of the exported file ``name``, checked: ``image_size`` a whole number of
    pixels in :data:`IMAGE_SIZES`, ``keep_ratio`` in [0, 1], ``categories`` a mapping of class labels
    (``"0"``, ``"1"``, ...; below ``num_classes`` when given) to ``{"id": int, "name": str}`` with distinct ids.

    Raises:
        InputError: one line naming the file and the key that is missing or malformed.
    """
    if stored is None:
        raise InputError(f"{name} was not written by `sdetr export` (no '{METADATA_KEY}' metadata)")
    again = "export the checkpoint again with `sdetr export`"
    try:
        metadata = json.loads(stored)
    except json.JSONDecodeError as error:
        raise InputError(f"{name}: its '{METADATA_KEY}' metadata is not valid JSON ({error.msg}): {again}") from None
    if not isinstance(metadata, dict):
        raise InputError(f"{name}: its '{METADATA_KEY}' metadata is not a JSON object: {again}")
    for key in ("categories", "image_size", "keep_ratio"):
        if key not in metadata:
            raise InputError(f"{name}: its '{METADATA_KEY}' metadata has no '{key}': {again}")
    sizes = f"a whole number of pixels from {IMAGE_SIZES[0]} to {IMAGE_SIZES[-1]}"
    _check_number(metadata["image_size"], name, "image_size", sizes, lambda v: isinstance(v, int) and v in IMAGE_SIZES)
    keep_ratios = keep_ratio_range(dense=True)
    _check_number(metadata["keep_ratio"], name, "keep_ratio", keep_ratios.text, keep_ratios.test)
    num_classes = metadata.get("num_classes")
    if num_classes is not None:
        _check_number(
            num_classes, name, "num_classes", "a positive whole number", lambda v: isinstance(v, int) and v >= 1
        )
    categories, ids = metadata["categories"], set()
    if not isinstance(categories, dict) or not categories:
        raise InputError(f"{name}: its metadata's 'categories' must map class labels to categories: {again}")
    for label, entry in categories.items():
        well_formed = (
            label.isdigit() and (num_classes is None or int(label) < num_classes) and isinstance(entry, dict)
            and isinstance(entry.get("id"), int) and not isinstance(entry["id"], bool)
            and isinstance(entry.get("name"), str) and entry["id"] not in ids
        )  # fmt: skip
        if not well_formed:
            raise InputError(
                f"{name}: its metadata's 'categories' entry {label!r}: {entry!r} is not a class label below "
                f"num_classes with a distinct integer 'id' and a 'name': {again}"
            )
        ids.add(entry["id"])
    return metadata


def _read_graph_facts(path: Path, name: str | Path) -> tuple[str | None, dict[str, int]]:
    """The ``sparse_detr`` metadata of an ONNX file and its operator sets (domain -> version)."""
    onnx = _require("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends
        raise InputError(f"{name} is not an ONNX file ({_first_line(error)})") from None
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    return metadata.get(METADATA_KEY), {entry.domain: entry.version for entry in model.opset_import}


def _msda_form(opsets: Mapping[str, int]) -> str:
    """The form of deformable attention a graph holds, read from its operator sets."""
    from sparse_detr.ops.onnx import CUSTOM_DOMAIN, TENSORRT_DOMAIN

    return "tensorrt" if TENSORRT_DOMAIN in opsets else "custom" if CUSTOM_DOMAIN in opsets else "gridsample"


class OnnxDetector:
    """An exported detector (see :func:`export_onnx`) run with onnxruntime or OpenVINO (``runtime``) on the
    CPU, called like the detector. A file with the ``custom`` node gets the project's custom-op library
    registered in onnxruntime (:mod:`sparse_detr.ops.onnxruntime_library`, built on first use).

    Attributes:
        metadata: what the export stored (classes, ``image_size``, ``keep_ratio``, ``postprocess``), checked
            by :func:`read_metadata`.
        msda: the graph's form of deformable attention (``gridsample``, ``custom`` or ``tensorrt``).
        takes_original_sizes: the graph ends in post-processing and needs ``orig_sizes``.
        name: what messages call the file (``path`` unless given: the final name of a temporary).
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        name: str | Path | None = None,
        runtime: str = "onnxruntime",
        allow_tensorrt: bool = False,
    ):
        if runtime not in RUNTIMES:
            raise UsageError(f"--runtime {runtime!r} is not supported: use one of {', '.join(RUNTIMES)}")
        self.path = Path(path)
        self.name = name or path
        self.runtime = runtime
        if not self.path.is_file():
            raise MissingFileError(f"ONNX file not found: {self.name} (write one with `sdetr export`)")
        stored, opsets = _read_graph_facts(self.path, self.name)
        self.metadata = read_metadata(stored, self.name)
        self.msda = _msda_form(opsets)
        if self.msda == "tensorrt" and not allow_tensorrt:
            raise InputError(
                f"{self.name} holds TensorRT's plugin node (sdetr export --msda tensorrt): build an engine with "
                f"`trtexec --onnx={self.name}`, or export with --msda custom or gridsample for {runtime}"
            )
        if runtime == "openvino":
            inputs, outputs = self._start_openvino(opsets.get("", 0), threads)
        else:
            inputs, outputs = self._start_onnxruntime(providers, threads)
        self.takes_original_sizes = self._check_interface(inputs, outputs)
        self.output_names = outputs
        self.keep_ratio = float(self.metadata["keep_ratio"])

    def _start_onnxruntime(self, providers: Sequence[str], threads: int | None) -> tuple[list[str], list[str]]:
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if self.msda != "gridsample":
            try:
                options.register_custom_ops_library(str(library_path()))
            except BackendUnavailableError as error:
                raise UnavailableError(
                    f"{self.name} needs the onnxruntime custom-op library of deformable attention, which cannot be "
                    f"built here ({error}): export with --msda gridsample for a file without it"
                ) from None
        try:
            session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            raise InputError(f"{self.name}: onnxruntime cannot load it ({_first_line(error)})") from None

        def run(feeds: dict[str, Any]) -> list[Any]:
            return session.run(self.output_names, feeds)

        self._run = run
        return [value.name for value in session.get_inputs()], [value.name for value in session.get_outputs()]

    def _start_openvino(self, opset: int, threads: int | None) -> tuple[list[str], list[str]]:
        try:
            import openvino
        except ImportError:
            raise UnavailableError(f"--runtime openvino needs OpenVINO: {OPENVINO_HINT}") from None
        if self.msda != "gridsample":
            raise InputError(
                f"{self.name} holds the {self.msda} node of deformable attention, which OpenVINO does not know: "
                "export with --msda gridsample for OpenVINO"
            )
        if opset >= 20:
            raise InputError(
                f"{self.name} is ONNX opset {opset}: OpenVINO cannot import its GridSample from opset 20 on "
                "(openvinotoolkit/openvino#33531); export with --opset 19 or lower"
            )
        core = openvino.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # not the bf16 it picks on AMX/AVX512-BF16
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        except Exception as error:  # OpenVINO raises RuntimeError with a long trace text
            raise InputError(f"{self.name}: OpenVINO cannot load it ({_first_line(error)})") from None
        request = compiled.create_infer_request()

        def run(feeds: dict[str, Any]) -> list[Any]:
            results = request.infer(feeds)
            return [results[compiled.output(name)].copy() for name in self.output_names]

        self._run = run
        return [port.get_any_name() for port in compiled.inputs], [port.get_any_name() for port in compiled.outputs]

    def _check_interface(self, inputs: list[str], outputs: list[str]) -> bool:
        """Whether the graph ends in post-processing (it takes ``orig_sizes``), checked against its outputs
        and the metadata's ``postprocess``.

        Raises:
            InputError: the graph's inputs or outputs are not an exported detector's, or the metadata
                disagrees with them.
        """
        postprocess = "orig_sizes" in inputs
        expected = ["scores", "labels", "boxes"] if postprocess else ["pred_logits", "pred_boxes"]
        if inputs[:2] != ["images", "mask"] or outputs != expected:
            raise InputError(
                f"{self.name}: inputs {', '.join(inputs)} and outputs {', '.join(outputs)} are not those of a "
                "detector from `sdetr export`"
            )
        if self.metadata.get("postprocess", postprocess) != postprocess:
            raise InputError(
                f"{self.name}: its metadata's 'postprocess' is {self.metadata['postprocess']!r}, but the graph "
                f"{'ends' if postprocess else 'does not end'} in post-processing: export the checkpoint again"
            )
        return postprocess

    @property
    def image_size(self) -> int:
        """The shorter side the exported model was trained for."""
        return int(self.metadata["image_size"])

    @property
    def categories(self) -> dict[int, Category]:
        """Class label -> category, as the exported checkpoint named them."""
        return {int(label): Category(int(entry["id"]), str(entry["name"]))
                for label, entry in self.metadata["categories"].items()}  # fmt: skip

    def __call__(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        keep_ratio: float | None = None,
        orig_sizes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Outputs named as the graph's (``pred_logits``, ``pred_boxes``, or ``scores``, ``labels``,
        ``boxes`` for a post-processing graph, which needs ``orig_sizes`` (N, 2)), as CPU tensors."""
        if keep_ratio is not None and keep_ratio != self.keep_ratio:
            raise UsageError(
                f"{self.name} encodes with keep ratio {self.keep_ratio:g}, fixed at export; "
                f"export again with --rho {keep_ratio:g}"
            )
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        feeds = {"images": images.detach().cpu().float().numpy(), "mask": mask.cpu().numpy()}
        if self.takes_original_sizes:
            if orig_sizes is None:
                raise UsageError(f"{self.name} ends in post-processing: pass orig_sizes (N, 2) (height, width)")
            feeds["orig_sizes"] = torch.as_tensor(orig_sizes, dtype=torch.int64).cpu().numpy()
        try:
            values = self._run(feeds)
        except Exception as error:  # the runtime's own types; e.g. an image too small for the queries
            raise InputError(
                f"{self.name}: {self.runtime} cannot run it on this input ({_first_line(error)})"
            ) from None
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, values)}


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_checkpoint` wrote and how closely onnxruntime reproduces PyTorch.

    ``max_abs_diff``: per output, the largest absolute difference between onnxruntime and the PyTorch
    model over the check batches (None when not checked).
    """

    path: Path
    keep_ratio: float
    opset: int
    postprocess: bool
    seconds: float
    size_mib: float
    max_abs_diff: dict[str, float] | None
    msda: str = "gridsample"
    note: str = ""  # what changed from what was asked, and why


def _matched(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``got``'s rows reordered, per image, to the ``expected`` row each is closest to (Hungarian matching on
    the largest difference over every output): tokens with equal scores (the padding's, whose scoring input
    is zeroed) may be ranked in any order by a top-k, and detections are a set."""

    def rows(outputs):  # (N, Q, F): every output's values of a row side by side
        return torch.cat([value.reshape(*value.shape[:2], -1).double() for value in outputs.values()], -1)

    got_rows, expected_rows = rows(got), rows(expected)
    order = []
    for got_image, expected_image in zip(got_rows, expected_rows):
        cost = torch.cdist(expected_image.nan_to_num(posinf=1e30), got_image.nan_to_num(posinf=1e30), p=float("inf"))
        _, columns = linear_sum_assignment(cost.numpy())
        order.append(torch.as_tensor(columns))
    order = torch.stack(order)  # (N, Q): the got row matched to each expected row
    return {
        name: value.gather(1, order.view(*order.shape, *([1] * (value.dim() - 2))).expand_as(value))
        for name, value in got.items()
    }


def compare_with_pytorch(
    detector: OnnxDetector, model: DeformableDETR, sizes: Sequence[Sequence[tuple[int, int]]]
) -> dict[str, float]:
    """Largest absolute difference per output between ``detector`` and ``model`` (float32, its keep ratio)
    on random batches of images of the (height, width) ``sizes`` (one list per batch; padded as a batch),
    queries (or detections) matched as sets (see :func:`_matched`)."""
    generator = torch.Generator().manual_seed(1)
    worst: dict[str, float] = {}
    graph = _ExportedGraph(model.float().cpu().eval(), detector.keep_ratio, None)
    for batch_sizes in sizes:
        images, mask = pad_images([torch.randn(3, h, w, generator=generator) for h, w in batch_sizes])
        orig_sizes = torch.tensor([[2 * h, 2 * w] for h, w in batch_sizes])
        with torch.no_grad():
            logits, boxes = graph(images, mask)
            expected = {"pred_logits": logits, "pred_boxes": boxes}
            if detector.takes_original_sizes:
                top_k = min(MAX_DETECTIONS, logits[0].numel())
                scores, labels, pixels = top_detections(logits, boxes, orig_sizes, top_k)
                expected = {"scores": scores, "labels": labels, "boxes": pixels}
        got = detector(images, mask, orig_sizes=orig_sizes)
        got = _matched({name: got[name].to(value.dtype) for name, value in expected.items()}, expected)
        for name, value in expected.items():
            finite = torch.isfinite(value)
            if not torch.equal(finite, torch.isfinite(got[name])):
                raise AssertionError(f"{name}: onnxruntime and PyTorch disagree on which values are finite")
            difference = float((got[name] - value)[finite].abs().max()) if finite.any() else 0.0
            worst[name] = max(worst.get(name, 0.0), difference)
    return worst


CHECK_SIZES = ([(320, 416)], [(256, 352), (304, 288)])


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    keep_ratio: float | None = None,
    opset: int = DEFAULT_OPSET,
    postprocess: bool = False,
    check: bool = True,
    trust_checkpoint: bool = False,
    msda: str = "gridsample",
    last: bool = False,
) -> ExportReport:
    """``sdetr export``: a checkpoint file, run folder (its best checkpoint, or its last with ``last``) or zoo
    name as one ONNX file (see
    :func:`export_onnx`), checked by ``onnx.checker`` and, with ``check``, run by onnxruntime against
    PyTorch on a batch of one and a padded batch of two at other sizes than the export's example (a
    ``tensorrt`` file through the custom-op library, which also runs TensorRT's node). The file takes its
    name only when these checks pass; the opset and ``msda`` are checked before anything is loaded.

    ``msda="custom"`` where the custom-op library cannot be built (no compiler) writes the ``gridsample``
    form instead, and the report's ``note`` says so; a ``tensorrt`` file is then written unchecked.
    """
    require_export_packages(run=check)
    check_opset(opset)
    check_msda(msda)
    check_writable(Path(out).parent)
    note = ""
    if msda != "gridsample" and (check or msda == "custom"):
        try:
            library_path()
        except BackendUnavailableError as error:
            if msda == "custom":
                note = f"the onnxruntime custom-op library cannot be built ({error}): wrote --msda gridsample instead"
                msda = "gridsample"
            else:
                note = (
                    f"not run by onnxruntime: the custom-op library that runs TensorRT's node cannot be built ({error})"
                )
                check = False
    path = resolve_checkpoint(checkpoint, last=last)
    loaded = load_for_inference(path, "cpu", trust_checkpoint=trust_checkpoint)
    model = loaded.model
    metadata = {"checkpoint": str(path), **file_metadata(model, loaded.categories, loaded.image_size)}
    differences: dict[str, float] = {}

    def compare(tmp: Path) -> None:
        detector = OnnxDetector(tmp, name=out, allow_tensorrt=True)
        differences.update(compare_with_pytorch(detector, model, CHECK_SIZES))

    start = time.perf_counter()
    written = export_onnx(model, out, keep_ratio, opset, postprocess, metadata, compare if check else None, msda)
    seconds = time.perf_counter() - start
    size_mib = written.stat().st_size / 2**20
    return ExportReport(
        written, model.keep_ratio, opset, postprocess, seconds, size_mib, differences if check else None, msda, note
    )
