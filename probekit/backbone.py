"""Loading a frozen encoder: device and dtype choice, fingerprints, clear load errors.

A ``Backbone`` is a Hugging Face encoder in eval mode with gradients off plus its
tokenizer and a fingerprint of its weights, so caches made from different weights
can never be mistaken for each other.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import socket
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError

from probekit.errors import ParamError, ProbekitError, ProbekitWarning

HUB_HOST = "huggingface.co"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ComputeDType = Literal["auto", "float32", "float16", "bfloat16"]
"""The compute dtypes a backbone runs in (``auto``: float32 on CPU, bfloat16/float16 on GPUs)."""
COMPUTE_DTYPES: tuple[str, ...] = typing.get_args(ComputeDType)
GENERIC_DIR_NAMES = {"model", "models", "snapshot", "checkpoint", "best", "final"}
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
PADDED_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "xlm-roberta-xl", "data2vec-text"}
"""Models whose position ids start after the padding index: ``pad_token_id + 1`` fewer usable positions."""
ARCHITECTURES = "encoder-only models (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa and their kin)"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; an unknown device or one that is absent is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParamError("device", "cuda was asked for but no CUDA GPU is available; use {device} cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParamError("device", f"there is no GPU {dev.index} (this machine has {torch.cuda.device_count()})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ParamError("device", "mps was asked for but Apple's MPS is not available; use {device} cpu")
    return dev


def check_device(device: str) -> None:
    """A :class:`ParamError` naming the accepted forms unless ``device`` is one of them (the hardware is not
    asked: a suite file is checked before anything runs)."""
    kind, _, index = str(device).partition(":")
    if device != "auto" and (kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit()))):
        raise ParamError("device", f"unknown device {device!r}; use {DEVICE_FORMS}")


def position_limit(config: Any) -> int | None:
    """The most tokens (special tokens included) the model's position embeddings can take, if it has any."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if getattr(config, "model_type", None) in PADDED_POSITIONS:
        n -= int(getattr(config, "pad_token_id", None) or 0) + 1
    return n


def usable_length(max_length: int, config: Any, name: str = "the model") -> int:
    """``max_length``, or the model's position limit with a :class:`ProbekitWarning` when it is longer."""
    limit = position_limit(config)
    if limit is None or max_length <= limit:
        return max_length
    warnings.warn(
        f"max_length {max_length} is more than {name} takes ({limit} positions); using {limit}",
        ProbekitWarning,
        stacklevel=3,
    )
    return limit


def check_encoder(config: Any, source: str) -> None:
    """Refuse encoder-decoder and decoder-only checkpoints in one line: probekit probes encoders."""
    from transformers.models.auto.modeling_auto import (  # deferred: transformers takes seconds to import
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder model"
    elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        kind = "a decoder-only model"
    else:
        return
    raise ProbekitError(
        f"{source} is {kind} ({model_type}); probekit probes {ARCHITECTURES}; " + "give {model} such a model",
        params=("model",),
    )


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU, bfloat16 on GPUs that support it, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ParamError("dtype", f"unknown dtype {dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape and bytes).

    Hashing the loaded tensors, not the files, gives one fingerprint whatever the
    checkpoint's format (safetensors, bin, hub or local, or an in-memory model).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's full definition (vocabulary, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer: its vocabulary and class are what matter
        text = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def model_slug(source: str) -> str:
    """A short, filesystem-safe name for a model: its folder's name or its hub id."""
    path = Path(source)
    if path.exists():
        parts = [p for p in path.resolve().parts if p not in ("/", "")]
        name = parts[-1]
        if name.lower() in GENERIC_DIR_NAMES and len(parts) > 1:
            name = parts[-2]
    else:
        name = source.replace("/", "--")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@dataclass
class Backbone:
    """A frozen encoder and its tokenizer, ready to run on ``device`` in ``dtype``."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    source: str = ""
    fingerprint: str = ""
    tokenizer_hash: str = ""
    revision: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        if not self.fingerprint:
            self.fingerprint = weights_fingerprint(self.model)
        if not self.tokenizer_hash:
            self.tokenizer_hash = tokenizer_fingerprint(self.tokenizer)
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            raise ProbekitError(f"the tokenizer of {self.name!r} has no padding token; set one before extracting")
        self.model.to(device=self.device, dtype=self.dtype)
        params = inspect.signature(self.model.forward).parameters
        self.input_names = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        """Number of hidden-state layers including the embeddings (L + 1)."""
        return int(self.config.num_hidden_layers) + 1

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.config, "hidden_size", None) or self.config.dim)

    def usable_length(self, max_length: int) -> int:
        """``max_length`` capped at the model's positions (with a warning when it is more)."""
        return usable_length(max_length, self.config, repr(self.name))

    def info(self) -> dict[str, Any]:
        """What the cache manifest records about the model."""
        return {
            "name": self.name,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "revision": self.revision,
            "class": type(self.model).__name__,
            "model_type": getattr(self.config, "model_type", None),
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "tokenizer": {
                "class": type(self.tokenizer).__name__,
                "fingerprint": self.tokenizer_hash,
                "name_or_path": getattr(self.tokenizer, "name_or_path", None),
            },
        }


def load_backbone(
    model: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    name: str | None = None,
) -> Backbone:
    """Load an encoder that ``AutoModel`` knows, frozen, from a local folder or the hub."""
    from transformers import AutoModel, AutoTokenizer  # deferred: transformers takes seconds to import

    source = str(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = model_source(source)
    mdl = from_pretrained(AutoModel, source, trust_remote_code=trust_remote_code)
    check_encoder(mdl.config, source)
    tok = from_pretrained(AutoTokenizer, source, trust_remote_code=trust_remote_code)
    check_tokenizer(tok, source)
    revision = getattr(mdl.config, "_commit_hash", None)
    return Backbone(
        model=mdl,
        tokenizer=tok,
        name=name or model_slug(source),
        source=source,
        revision=revision,
        device=dev,
        dtype=dt,
    )


def check_tokenizer(tokenizer: Any, source: str) -> None:
    """Refuse a tokenizer with no vocabulary beyond its special tokens: what transformers builds, without a
    word, from a folder whose tokenizer files are missing (every text would become [UNK])."""
    vocab = tokenizer.get_vocab()
    if len(vocab) <= len(set(tokenizer.all_special_tokens)):
        raise ProbekitError(
            f"{source} has no tokenizer (no tokenizer.json, vocab.txt or similar: only {len(vocab)} special "
            "tokens); save the model's tokenizer into it (tokenizer.save_pretrained(DIR))"
        )


def model_source(model: str | Path) -> str:
    """A local checkpoint folder as an absolute path, or a hub id as given."""
    local = Path(model).expanduser()
    if not local.exists():
        return str(model)
    if not local.is_dir():
        raise ProbekitError(
            "{model} " + f"{model}: expected a checkpoint folder (config.json, weights), got a file", params=("model",)
        )
    return str(local.resolve())


def from_pretrained(auto_cls: Any, source: str, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained(source, **kwargs)`` from a local folder or the hub (offline when
    the hub cannot be reached), without the hub's log noise, failures as one-line errors."""
    local = Path(source).exists()
    if not local:
        kwargs.setdefault("local_files_only", _hub_offline())
    try:
        with quiet_hub():
            return auto_cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        raise _load_error(source, local, e) from None


def _hub_offline() -> bool:
    """True when the hub is switched off or unreachable."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not _hub_reachable()


@functools.cache
def _hub_reachable() -> bool:
    """One quick connection per process (a fine-tuning grid loads the model many times)."""
    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _load_error(source: str, is_local: bool, err: Exception) -> ProbekitError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "trust_remote_code" in str(err):
        return ProbekitError(
            f"model {source!r} needs its own code to load; " + "pass {trust_remote_code} only if you trust it",
            params=("trust_remote_code",),
        )
    if isinstance(err, SafetensorError):
        return ProbekitError(
            f"could not load a model from {source}: its weights file is damaged or truncated ({first}); "
            "download or save the model again"
        )
    if is_local:
        return ProbekitError(f"could not load a model from {source}: {first}")
    return ProbekitError(
        f"model {source!r} is not a local folder, not in the Hugging Face cache, and could not be fetched "
        f"from the hub ({first}). Where there is internet, download it "
        f"(`hf download {source} --local-dir DIR`) and pass " + "{model} DIR.",
        params=("model",),
    )


class quiet_hub:
    """Silence the hub's retry chatter and the weight-loading bar; errors still raise."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging  # deferred: transformers takes seconds to import

        self.loggers = [logging.getLogger(n) for n in ("huggingface_hub", "transformers")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)
        self.bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging  # deferred: transformers takes seconds to import

        for lg, level in zip(self.loggers, self.levels, strict=True):
            lg.setLevel(level)
        if self.bars:
            hf_logging.enable_progress_bar()
