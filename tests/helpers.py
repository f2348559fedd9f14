"""Builders shared by the tests: tiny random encoders and SentEval-format files."""

from __future__ import annotations

import copy
import random
import string
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import BertConfig, BertModel, BertTokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "rug",
    "big",
    "small",
    "red",
    "blue",
    "today",
    "yesterday",
    "quickly",
    "and",
    "but",
    "he",
    "she",
    "they",
    "we",
    "it",
    "was",
    "were",
    "is",
    "are",
    "saw",
    "sees",
]


def tiny_vocab() -> list[str]:
    """Specials, whole words, single characters and ##-continuations: any lowercase text tokenises."""
    chars = list(string.ascii_lowercase + string.digits + ".,'!?;:-")
    return SPECIALS + WORDS + chars + [f"##{c}" for c in chars]


def tiny_tokenizer() -> BertTokenizer:
    vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
    return BertTokenizer(vocab=vocab)


def tiny_bert_config(layers: int = 2, hidden: int = 32, **kw: object) -> BertConfig:
    return BertConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        **kw,
    )


def make_tiny_bert(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised tiny BERT and its tokenizer to ``path``."""
    torch.manual_seed(seed)
    model = BertModel(tiny_bert_config(layers, hidden))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def random_sentence(rng: random.Random, lo: int = 2, hi: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_senteval(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Write ``(split, label, sentence)`` rows in SentEval format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s}\t{y}\t{x}\n" for s, y, x in rows), encoding="utf-8")
    return path


def toy_senteval(
    path: Path, n: tuple[int, int, int] = (40, 12, 16), seed: int = 0, labels: tuple[str, ...] = ("O", "I")
) -> Path:
    """A small SentEval file of random sentences with varied lengths."""
    rng = random.Random(seed)
    rows = []
    for tag, count in zip(("tr", "va", "te"), n, strict=True):
        rows += [(tag, labels[i % len(labels)], random_sentence(rng)) for i in range(count)]
    return write_senteval(path, rows)


class RangeHandler:
    """Factory for an ``http.server`` handler that serves a folder with HTTP range support
    (Python's own handler ignores ``Range``), counting requests per path."""

    @staticmethod
    def make(root: Path, log: list[tuple[str, str | None]]) -> type:
        from http.server import BaseHTTPRequestHandler

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                log.append((self.path, rng))
                path = root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def senteval_classifier(
    x: torch.Tensor, y: torch.Tensor, xd: torch.Tensor, yd: torch.Tensor, l2: float, k: int, seed: int = 1111
) -> tuple[float, torch.nn.Module]:
    """SentEval's PyTorchClassifier.fit with nhid=0, written out plainly (the reference the batched ``senteval``
    protocol is tested against): re-seed, nn.Linear, Adam with weight_decay, one np.random.permutation per epoch,
    batch 64, mean loss, a dev check every 4 epochs, the never-reset tenacity counter. The best dev accuracy
    and the model that had it."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], k)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=l2)
    best, best_model, count, nepoch = -1.0, model, 0, 0
    while nepoch <= 200:
        for _ in range(4):
            perm = np.random.permutation(len(x))
            for i in range(0, len(x), 64):
                idx = torch.from_numpy(perm[i : i + 64])
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        nepoch += 4
        with torch.no_grad():
            acc = float((model(xd).argmax(1) == yd).float().mean())
        if acc > best:
            best, best_model = acc, copy.deepcopy(model)
        elif count >= 5:
            break
        else:
            count += 1
    return best, best_model


def run_probe_suite(tmp_path: Path, model: Path, probe_keys: str) -> pd.DataFrame:
    """Write and run a one-task suite probing ``model`` on a toy task with the ``[probe]`` keys given (TOML
    lines); its probe rows. The protocols' short ``max_epoch`` runs warn of convergence: ignored."""
    from probekit.errors import ConvergenceWarning
    from probekit.results import load_results
    from probekit.suite import run_suite

    toy_senteval(tmp_path / "toy_a.txt", seed=1)
    suite = tmp_path / "study.toml"
    suite.write_text(
        f'name = "p"\nout = "runs"\n\n[model]\nname = "tiny"\npath = "{model}"\n\n'
        f'[probe]\ntasks = ["toy_a.txt"]\nmax_length = 32\n{probe_keys}',
        encoding="utf-8",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        run_suite(suite, progress=False)
    results = load_results(tmp_path / "runs" / "results" / "tiny")
    return results[results["source"] == "probe"]


def serve(root: Path, log: list[tuple[str, str | None]]):  # type: ignore[no-untyped-def]
    """Start a local HTTP server for ``root`` in a thread; returns (server, base_url)."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler.make(root, log))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def run_probekit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m probekit ARGS`` in a new process, as a user runs it (stdout and stderr captured)."""
    return subprocess.run([sys.executable, "-m", "probekit", *map(str, args)], capture_output=True, text=True)
