"""Where the multi-scale tokens sit in the flattened token map, and which of them the sparse encoder refines.

The transformer flattens each level's (N, C, H_l, W_l) map row-major and concatenates the levels, level 0
first, into one (N, S, C) token map with S = sum_l H_l * W_l. :class:`TokenLayout` describes that map once
for every part that needs it (encoder, decoder, DAM, coverage, visualizer); :class:`TokenSelection` is the
sparse encoder's choice of tokens in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) padding mask -> (N, 2) float32 (valid width / W, valid height / H)."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare by
class TokenLayout:
    """The level structure and padding of a batch's flattened token map.

    Attributes:
        level_shapes: (H_l, W_l) of each level as ints, read from the maps' shapes (never from a tensor's
            values, so that traced graphs keep them symbolic: see :mod:`sparse_detr.export`).
        spatial_shapes: (L, 2) int64, the same as a tensor for the deformable attention op.
        level_start_index: (L,) int64, index of each level's first token.
        valid_ratios: (N, L, 2) float32, (valid width / W_l, valid height / H_l): the share of each level
            that image i covers; the rest is batch padding.
        padding_mask: (N, S) bool, True on padded tokens.
    """

    level_shapes: tuple[tuple[int, int], ...]
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    padding_mask: torch.Tensor

    @classmethod
    def of(cls, masks: Sequence[torch.Tensor]) -> TokenLayout:
        """The layout of the token map flattened from levels with these padding masks, (N, H_l, W_l) each,
        True on padding."""
        padding_mask = torch.cat([mask.flatten(1) for mask in masks], 1)  # (N, S)
        level_shapes = tuple((mask.shape[-2], mask.shape[-1]) for mask in masks)
        spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64, device=padding_mask.device)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        valid_ratios = torch.stack([_valid_ratios(mask) for mask in masks], 1)  # (N, L, 2)
        return cls(level_shapes, spatial_shapes, level_start_index, valid_ratios, padding_mask)

    @property
    def num_tokens(self) -> int:
        """S, the tokens of all levels."""
        return self.padding_mask.shape[1]

    @property
    def level_sizes(self) -> list[int]:
        """H_l * W_l, the tokens of each level."""
        return [height * width for height, width in self.level_shapes]

    def split_levels(self, values: torch.Tensor) -> list[torch.Tensor]:
        """(..., S) values of every token -> one (..., H_l, W_l) map per level."""
        levels = values.split(self.level_sizes, -1)
        # (..., H_l * W_l) -> (..., H_l, W_l), rows first as the levels were flattened
        return [
            level.view(*level.shape[:-1], height, width) for level, (height, width) in zip(levels, self.level_shapes)
        ]

    def image(self, index: int) -> TokenLayout:
        """Image ``index``'s part of this layout as a batch of one (its padding is the batch's)."""
        one = slice(index, index + 1)
        return TokenLayout(
            self.level_shapes,
            self.spatial_shapes,
            self.level_start_index,
            self.valid_ratios[one],
            self.padding_mask[one],
        )


@dataclass(frozen=True, eq=False)
class TokenSelection:
    """The tokens the sparse encoder refines, best first.

    All images share k = max(counts) so that they batch; image i refines only its first ``counts[i]``
    indices, and the rest of its row pads the batch (SPEC §4.5). In a traced graph (``torch.compile``,
    export) k comes from the shapes instead (see :meth:`top`).

    Attributes:
        indices: (N, k) int64 token indices into the (N, S) token map.
        counts: (N,) int64, how many of its indices image i keeps.
    """

    indices: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def top(cls, scores: torch.Tensor, counts: torch.Tensor, most: int | None = None) -> TokenSelection:
        """The highest ``scores`` (N, S) of each image, ``counts`` (N,) int64 of them kept.

        ``most`` bounds the counts from the shapes alone (:func:`~sparse_detr.models.scoring.most_kept`);
        while traced, k is that bound, because reading max(counts) would end the graph with a Python int.
        The indices past ``counts[i]`` are not kept, so the encoded tokens are the same either way.
        """
        if most is not None and torch.compiler.is_compiling():
            k = torch.sym_min(most, scores.shape[1])
        else:
            k = min(int(counts.max()), scores.shape[1])
        return cls(scores.topk(k, dim=1).indices, counts)

    @property
    def kept(self) -> torch.Tensor:
        """(N, k) bool, True on the indices image i keeps (its first ``counts[i]``)."""
        return torch.arange(self.indices.shape[1], device=self.indices.device) < self.counts[:, None]

    def token_mask(self, num_tokens: int) -> torch.Tensor:
        """(N, S) bool over the token map, True on the tokens each image keeps."""
        mask = torch.zeros(self.indices.shape[0], num_tokens, dtype=torch.bool, device=self.indices.device)
        return mask.scatter_(1, self.indices, self.kept)

    def image(self, index: int) -> TokenSelection:
        """Image ``index``'s selection as a batch of one (k stays the batch's)."""
        one = slice(index, index + 1)
        return TokenSelection(self.indices[one], self.counts[one])
