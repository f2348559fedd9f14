"""Tokenised text as data: unpadded token ids per text (what tokenising and windowing return)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Tokenized:
    """Unpadded token ids of a list of texts (one array per text)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    special: list[list[int]]
    lengths: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def truncated(self, max_length: int) -> int:
        """How many texts reached ``max_length`` (and were most likely cut)."""
        return int((self.lengths >= max_length).sum())
