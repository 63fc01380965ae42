"""What the sparse encoder keeps: saliency, selected tokens and decoder attention drawn over an image; and
detections drawn for people to look at."""

from sparse_detr.viz.detections import draw_detections, drawing_files, drawing_writer, save_drawing
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
    "draw_detections",
    "draw_explanation",
    "drawing_files",
    "drawing_writer",
    "existing_outputs",
    "explain_image",
    "figure_stems",
    "level_strides",
    "require_saliency",
    "save_drawing",
    "save_explanation",
    "token_view",
    "upsample_to_image",
    "visualize_file",
    "visualize_files",
]
