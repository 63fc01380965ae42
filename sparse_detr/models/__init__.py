"""Deformable DETR and Sparse DETR."""

from sparse_detr.models.deformable_attention import MSDeformAttn

__all__ = ["MSDeformAttn"]
