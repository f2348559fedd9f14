"""Real early exit: run an encoder one layer at a time and stop once a sample exits.

:class:`LayerStepper` drives the blocks of a BERT-family encoder (BERT, RoBERTa,
XLM-R, CamemBERT, ELECTRA, DistilBERT, ALBERT) by hand: the embeddings, then block 1, 2, ...
with the attention mask the blocks expect (``transformers.masking_utils``). Its hidden
states equal the model's own ``output_hidden_states`` (a test checks it).

:func:`early_exit` runs the off-ramps and an exit policy on top: with ``batch_size=1``
(DeeBERT's setting) each sample runs exactly as many layers as its exit layer; in batched
mode the exited samples leave the batch (and the padding shrinks to the longest one left).
:func:`measure` times it against full inference on the same data (all L layers and the
last off-ramp only, through the same code), back to back, giving the measured saving
1 - t_exit / t_full.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from probekit.encoding import Tokenized, collate, plan_batches
from probekit.errors import ProbekitError
from probekit.offramp.heads import OffRampHeads
from probekit.offramp.policies import Policy

BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert")


class LayerStepper:
    """Runs the embeddings and each transformer block of an encoder separately."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        model_type = getattr(config, "model_type", None)
        if getattr(config, "is_decoder", False) or model_type not in BERT_LIKE:
            raise ProbekitError(
                f"early-exit inference runs BERT-family encoders ({', '.join(BERT_LIKE)}); "
                f"{type(model).__name__} (model_type {model_type!r}) is not supported. "
                "Turn {measure} off to get the policies' expected savings without timing",
                params=("measure",),
            )
        self.model = model
        self.config = config
        if model_type == "distilbert":
            self.blocks = list(model.transformer.layer)
        elif model_type == "albert":  # shared layers: layer i runs its group (ALBERT's own rule)
            groups, n = model.encoder.albert_layer_groups, config.num_hidden_layers
            self.blocks = [groups[int(i / (n / config.num_hidden_groups))] for i in range(n)]
        else:
            self.blocks = list(model.encoder.layer)
        self.project = getattr(model, "embeddings_project", None)
        if model_type == "albert":
            self.project = model.encoder.embedding_hidden_mapping_in
        self.uses_token_types = model_type != "distilbert"

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.uses_token_types:
            h = self.model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        else:
            h = self.model.embeddings(batch["input_ids"])
        return self.project(h) if self.project is not None else h

    def mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        from transformers.masking_utils import create_bidirectional_mask  # here: it loads torch._dynamo

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def block(self, i: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        """Block ``i`` (0-based), i.e. layer ``i + 1``."""
        out = self.blocks[i](hidden, mask)
        return out[0] if isinstance(out, tuple) else out

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """All L+1 hidden states, layer by layer (what ``output_hidden_states`` gives)."""
        h = self.embed(batch)
        mask = self.mask(h, batch["attention_mask"])
        states = [h]
        for i in range(self.n_layers):
            h = self.block(i, h, mask)
            states.append(h)
        return states


@dataclass
class ExitRun:
    """What an early-exit run gave: each sample's off-ramp output, exit layer, and the time taken."""

    outputs: np.ndarray
    exit_layers: np.ndarray
    seconds: float
    layer_calls: int


def _batches(tok: Tokenized, batch_size: int) -> list[np.ndarray]:
    if batch_size == 1:
        return [np.array([i]) for i in range(len(tok.lengths))]
    return plan_batches(tok.lengths, batch_size=batch_size)


@torch.inference_mode()
def early_exit(
    model: nn.Module,
    heads: OffRampHeads,
    tok: Tokenized,
    pad_id: int,
    policy: Policy | None,
    threshold: float = 0.0,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> ExitRun:
    """Run ``model`` with off-ramps, stopping each sample at the layer where ``policy`` exits it.

    ``policy=None`` is full inference: every layer, and only the last off-ramp.
    """
    stepper = LayerStepper(model)
    n_layers = stepper.n_layers
    if heads.n_layers != n_layers:
        raise ProbekitError(f"the off-ramps have {heads.n_layers} layers, the encoder {n_layers}")
    model.eval()
    heads.eval()
    device = torch.device(device)
    if policy is not None:
        policy.to(device)
    n = len(tok.lengths)
    outputs = np.zeros((n, heads.n_out), np.float32)
    exits = np.zeros(n, np.int64)
    calls = 0
    sync = device.type == "cuda"
    start = time.perf_counter()
    for b, idx in enumerate(_batches(tok, batch_size)):
        batch = collate(tok, idx, pad_id, device)
        rows = torch.as_tensor(idx)
        attn = batch["attention_mask"]
        h = stepper.embed(batch)
        mask = stepper.mask(h, attn)
        prev = h[:, 0]
        state = policy.start(len(idx), device, seed=seed + b) if policy is not None else {}
        for i in range(n_layers):
            h = stepper.block(i, h, mask)
            calls += len(rows)
            first = h[:, 0]
            last = i == n_layers - 1
            if policy is None and not last:
                continue
            out = heads.ramps[i](first)
            done = (
                torch.ones(len(rows), dtype=torch.bool, device=device)
                if last
                else policy.step(state, i + 1, out, first, prev, threshold)
            )  # type: ignore[union-attr]
            if bool(done.any()):
                gone = rows[done.cpu()].numpy()
                outputs[gone] = out[done].float().cpu().numpy()
                exits[gone] = i + 1
                if last or bool(done.all()):
                    break
                keep = ~done
                rows, h, attn, first = rows[keep.cpu()], h[keep], attn[keep], first[keep]
                state = {k: v[keep] for k, v in state.items()}
                width = int(attn.sum(1).max())
                if width < h.shape[1]:
                    h, attn = h[:, :width], attn[:, :width]
                mask = stepper.mask(h, attn)
            prev = first
    if sync:
        torch.cuda.synchronize()
    return ExitRun(outputs, exits, time.perf_counter() - start, calls)


@dataclass
class Timing:
    """Measured early exit of one policy threshold against full inference on the same data."""

    batch_size: int
    seconds: float
    full_seconds: float
    exit_layers: np.ndarray

    @property
    def measured_saving(self) -> float:
        return 1.0 - self.seconds / self.full_seconds


def measure(
    model: nn.Module,
    heads: OffRampHeads,
    tok: Tokenized,
    pad_id: int,
    policy: Policy,
    threshold: float,
    batch_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    repeats: int = 1,
) -> Timing:
    """Time early exit at ``threshold`` and full inference on the same data, back to back (best of
    ``repeats`` each), so that drifts of a shared machine's speed hit both alike."""
    full, runs = [], []
    for _ in range(repeats):
        full.append(early_exit(model, heads, tok, pad_id, None, batch_size=batch_size, device=device).seconds)
        runs.append(
            early_exit(
                model, heads, tok, pad_id, policy, float(threshold), batch_size=batch_size, device=device, seed=seed
            )
        )
    return Timing(batch_size, min(r.seconds for r in runs), min(full), runs[0].exit_layers)


def warm_up(
    model: nn.Module,
    heads: OffRampHeads,
    tok: Tokenized,
    pad_id: int,
    batch_sizes: tuple[int, ...],
    device: torch.device | str = "cpu",
) -> None:
    """One untimed full pass per batch size (allocator, kernels and caches warm before timing)."""
    for bs in batch_sizes:
        early_exit(model, heads, tok, pad_id, None, batch_size=bs, device=device)
