"""sparse-detr: Sparse DETR and Deformable DETR, trained, evaluated, benchmarked and explained."""

__version__ = "0.1.0"
