"""What the sparse encoder keeps: saliency, selected tokens and decoder attention drawn over an image."""

from sparse_detr.viz.figures import FIGURE_FORMATS, PANEL_TITLES, display_size, draw_explanation, save_explanation
from sparse_detr.viz.saliency import (
    TokenView,
    crop_to_image,
    explain_image,
    level_strides,
    require_saliency,
    token_view,
    upsample_to_image,
)
from sparse_detr.viz.visualize import existing_outputs, figure_stems, visualize_file, visualize_files

__all__ = [
    "FIGURE_FORMATS",
    "PANEL_TITLES",
    "TokenView",
    "crop_to_image",
    "display_size",
    "draw_explanation",
    "existing_outputs",
    "explain_image",
    "figure_stems",
    "level_strides",
    "require_saliency",
    "save_explanation",
    "token_view",
    "upsample_to_image",
    "visualize_file",
    "visualize_files",
]
