"""Training and dev batches for the Trainer: a tokenised split padded batch by batch.

:class:`TextDataset` is the ordinary one (one sequence per example, a sentence pair packed as
``[CLS] a [SEP] b [SEP]``). :class:`SidesDataset` tokenises the two sentences of a pair *alone*
(``[CLS] a [SEP]`` and ``[CLS] b [SEP]``) and either hands both to the model (``pair_`` keys, the
Siamese towers) or concatenates them into one sequence whose positions restart at the second
sentence (embed-then-concatenate). Items are indices; :func:`collate_items` pads a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from probekit.encoding import Tokenized, collate

PAIR_PREFIX = "pair_"


def _labels(labels: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(labels, dtype=torch.float32 if labels.dtype.kind == "f" else torch.long)


class TextDataset(torch.utils.data.Dataset):
    """A tokenised split; items are indices, batches are padded by :meth:`collate`. ``keep_special``
    keeps the special-tokens mask in the batch (the multi-objective variant masks real tokens only)."""

    def __init__(self, tok: Tokenized, labels: np.ndarray, pad_id: int, keep_special: bool = False) -> None:
        self.tok, self.labels, self.pad_id, self.keep_special = tok, labels, pad_id, keep_special

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"dataset": self, "index": int(i)}

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx)
        batch = collate(self.tok, idx, self.pad_id, torch.device("cpu"))
        if not self.keep_special:
            batch.pop("special_tokens_mask")
        batch["labels"] = _labels(self.labels[idx])
        return batch


class SidesDataset(TextDataset):
    """A sentence-pair split with each sentence tokenised alone (``a`` and ``b``).

    ``concat=False``: batches hold the first sentences (``input_ids``...) and the second ones
    (``pair_input_ids``...), each padded on its own. ``concat=True``: one sequence per example,
    the first sentence's tokens then the second's, ``position_ids`` restarting at 0 for the
    second, token types 0 for both (``second_type=1``: 1 for the second sentence's tokens).
    """

    def __init__(
        self,
        a: Tokenized,
        b: Tokenized,
        labels: np.ndarray,
        pad_id: int,
        concat: bool = False,
        second_type: int = 0,
    ) -> None:
        super().__init__(a, labels, pad_id)
        self.b, self.concat, self.second_type = b, concat, second_type

    def collate(self, idx: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx)
        if not self.concat:
            first = collate(self.tok, idx, self.pad_id, torch.device("cpu"))
            second = collate(self.b, idx, self.pad_id, torch.device("cpu"))
            first.pop("special_tokens_mask")
            second.pop("special_tokens_mask")
            batch = {**first, **{PAIR_PREFIX + k: v for k, v in second.items()}}
            batch["labels"] = _labels(self.labels[idx])
            return batch
        return {
            **concatenated(self.tok, self.b, idx, self.pad_id, self.second_type),
            "labels": _labels(self.labels[idx]),
        }


def concatenated(
    a: Tokenized, b: Tokenized, idx: np.ndarray, pad_id: int, second_type: int = 0
) -> dict[str, torch.Tensor]:
    """Each example's first-sentence tokens then its second's, padded: ``input_ids``, ``attention_mask``,
    ``position_ids`` (0.. for each sentence) and ``token_type_ids`` (0, or ``second_type`` for the second)."""
    la, lb = a.lengths[idx], b.lengths[idx]
    width = int((la + lb).max())
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(idx), width), dtype=np.int64)
    types = np.zeros((len(idx), width), dtype=np.int64)
    for row, i in enumerate(idx):
        na, nb = int(la[row]), int(lb[row])
        ids[row, :na] = a.input_ids[i]
        ids[row, na : na + nb] = b.input_ids[i]
        pos[row, :na] = np.arange(na)
        pos[row, na : na + nb] = np.arange(nb)
        types[row, na : na + nb] = second_type
    mask = np.arange(width)[None, :] < (la + lb)[:, None]
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        "position_ids": torch.from_numpy(pos),
        "token_type_ids": torch.from_numpy(types),
    }


def collate_items(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The Trainer's data collator: pad a list of :class:`TextDataset` items."""
    return items[0]["dataset"].collate([it["index"] for it in items])
