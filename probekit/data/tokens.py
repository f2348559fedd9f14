"""Tokenised text as data: unpadded token ids per text (what tokenising and windowing return)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np


class Ragged(Sequence[np.ndarray]):
    """Rows of different lengths in one flat array: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``.

    What :func:`probekit.encoding.tokenize` stores token ids in: a few bytes per token where a list of
    Python lists takes about 50, so tokenising 100k texts holds tens of MB, not hundreds (issue 16).
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values, self.offsets = values, np.asarray(offsets, dtype=np.int64)

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[int]], dtype: Any = np.int32) -> Ragged:
        rows = list(rows)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter((v for r in rows for v in r), dtype=dtype, count=int(lengths.sum()))
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]))

    @classmethod
    def concat(cls, parts: Sequence[Ragged]) -> Ragged:
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64))
        values = np.concatenate([p.values for p in parts])
        starts = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)])
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range ({n} rows)")
        i %= n
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.values[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True))


@dataclass
class Tokenized:
    """Unpadded token ids of a list of texts (one row per text: lists, or a :class:`Ragged`)."""

    input_ids: Sequence[Sequence[int]]
    token_type_ids: Sequence[Sequence[int]] | None
    special: Sequence[Sequence[int]]
    lengths: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def truncated(self, max_length: int) -> int:
        """How many texts reached ``max_length`` (and were most likely cut)."""
        return int((self.lengths >= max_length).sum())
