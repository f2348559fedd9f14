"""Bad inputs, share ``inputs``: text files, models, devices and number options (tests/test_catalogue_inputs.py).

Every row writes its output (if anything were written) to ``{tmp}/out``; a suite file's ``out`` is ``out`` too."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tests.catalogue import Case
from tests.helpers import make_tiny_bert, toy_senteval

TOY = "{tmp}/toy.txt"
OUT = "{tmp}/out"


def toy(tmp: Path) -> None:
    toy_senteval(tmp / "toy.txt")


def text(name: str, content: bytes | str) -> Callable[[Path], None]:
    """A setup writing ``content`` to ``tmp/name`` (and the toy task)."""

    def setup(tmp: Path) -> None:
        toy(tmp)
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def model(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """A setup saving a tiny BERT to ``tmp/m`` and then damaging it."""

    def setup(tmp: Path) -> None:
        toy(tmp)
        damage(make_tiny_bert(tmp / "m"))

    return setup


def truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def unlink(*names: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        for p in folder.iterdir():
            if p.name.startswith(names):
                p.unlink()

    return damage


def corrupt_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": ', encoding="utf-8")


def other_architecture(kind: str) -> Callable[[Path], None]:
    """Replace the weights by a tiny T5 (encoder-decoder) or GPT-2 (decoder-only), keeping the tokenizer."""

    def damage(folder: Path) -> None:
        from transformers import GPT2Config, GPT2Model, T5Config, T5Model

        if kind == "t5":
            net = T5Model(T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
        else:
            net = GPT2Model(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=64))
        (folder / "model.safetensors").unlink()
        net.save_pretrained(folder)

    return damage


def glue(train: str, dev: str = "sentence\tlabel\nfun\t1\nbad\t0\n") -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        root = tmp / "data" / "glue" / "SST-2"
        root.mkdir(parents=True)
        (root / "train.tsv").write_bytes(train.encode())
        (root / "dev.tsv").write_bytes(dev.encode())

    return setup


def suite(body: bytes | str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        toy(tmp)
        (tmp / "study.toml").write_bytes(body.encode() if isinstance(body, str) else body)

    return setup


def squad(doc: object) -> Callable[[Path], None]:
    return text("corpus.json", json.dumps(doc))


def copy_weights_as_task(tmp: Path) -> None:
    toy(tmp)
    shutil.copy(make_tiny_bert(tmp / "m") / "model.safetensors", tmp / "weights.safetensors")


EXTRACT = ["extract", "-m", "{model}", "-t", TOY, "-o", OUT, "-q"]
GOOD_SUITE = 'name = "s"\nout = "out"\n[model]\nname = "tiny"\npath = "{model}"\n[probe]\ntasks = ["toy.txt"]\n'

CASES: list[Case] = [
    # ---- text inputs
    Case(
        "task-two-fields",
        ["extract", "-m", "{model}", "-t", "{tmp}/bad.txt", "-o", OUT],
        "bad.txt:2: expected 3 tab-separated columns",
        text("bad.txt", "tr\tO\tthe cat\ntr\tO\n"),
    ),
    Case(
        "task-bom-then-bad-tag",  # the BOM is stripped: the message names the tag, not '\ufeffdev'
        ["extract", "-m", "{model}", "-t", "{tmp}/bad.txt", "-o", OUT],
        "bad.txt:1: unknown split tag 'dev'",
        text("bad.txt", "\ufeffdev\tO\tthe cat\r\ntr\tO\ta dog\r\n"),
    ),
    Case(
        "task-binary-nul",
        ["extract", "-m", "{model}", "-t", "{tmp}/blob.txt", "-o", OUT],
        "blob.txt: a binary file, not text",
        text("blob.txt", b"tr\tO\tthe cat\n\x00\x00\x07"),
    ),
    Case(
        "task-utf16",
        ["extract", "-m", "{model}", "-t", "{tmp}/utf16.txt", "-o", OUT],
        "utf16.txt: UTF-16 text (it starts with a UTF-16 byte-order mark); re-encode the file as UTF-8",
        text("utf16.txt", "tr\tO\tthe cat\n".encode("utf-16")),
    ),
    Case(
        "task-is-safetensors",
        ["extract", "-m", "{model}", "-t", "{tmp}/weights.safetensors", "-o", OUT],
        "weights.safetensors: a binary file, not text",
        copy_weights_as_task,
    ),
    Case(
        "task-not-utf8",
        ["extract", "-m", "{model}", "-t", "{tmp}/latin.txt", "-o", OUT],
        "latin.txt:2: not valid UTF-8",
        text("latin.txt", b"tr\tO\tthe cat\n" + "te\tO\tcaf\u00e9\n".encode("latin-1")),
    ),
    Case(
        "task-empty-sentence",
        ["extract", "-m", "{model}", "-t", "{tmp}/bad.txt", "-o", OUT],
        "bad.txt:2: empty sentence",
        text("bad.txt", "tr\tO\tthe cat\ntr\tO\t \t\n"),
    ),
    Case(
        "task-no-dev-split",
        ["extract", "-m", "{model}", "-t", "{tmp}/bad.txt", "-o", OUT],
        "the dev split (va) has no rows",
        text("bad.txt", "tr\tO\tthe cat\nte\tO\ta dog\n"),
    ),
    Case(
        "task-unseen-label",
        ["extract", "-m", "{model}", "-t", "{tmp}/bad.txt", "-o", OUT],
        "label 'X' of the test split never occurs in the train split",
        text("bad.txt", "tr\tO\tthe cat\nva\tO\ta dog\nte\tX\the ran\n"),
    ),
    Case("task-unknown-name", ["extract", "-m", "{model}", "-t", "no_such_task", "-o", OUT], "unknown task"),
    Case(
        "glue-bad-label",
        ["extract", "-m", "{model}", "-t", "sst2", "--data-dir", "{tmp}/data", "-o", OUT],
        "train.tsv:3: label '7' is not one of",
        glue("\ufeffsentence\tlabel\r\ngood\t1\r\nodd\t7\r\n"),
    ),
    Case(
        "glue-missing-column",
        ["extract", "-m", "{model}", "-t", "sst2", "--data-dir", "{tmp}/data", "-o", OUT],
        "train.tsv:2: expected 2 tab-separated columns",
        glue("sentence\tlabel\ngood\n"),
    ),
    Case(
        "corpus-binary",
        ["mlm-probe", "-m", "{model}", "-c", "{tmp}/blob.txt", "-o", OUT],
        "blob.txt: a binary file, not text",
        text("blob.txt", b"\x00\x01passage\n"),
    ),
    Case(
        "corpus-squad-not-squad",
        ["mlm-probe", "-m", "{model}", "-c", "{tmp}/corpus.json", "-o", OUT],
        'not a SQuAD v1.1 file: expected an object with a "data" list',
        squad(["a", "list"]),
    ),
    Case(
        "suite-binary", ["run", "{tmp}/study.toml"], "study.toml: a binary file, not text", suite(b"name = 1\x00\x00")
    ),
    Case("suite-not-toml", ["run", "{tmp}/study.toml"], "study.toml: not valid TOML", suite("\ufeffname = [\r\n")),
    Case(
        "suite-bom-crlf-then-bad-key",  # read despite the BOM and CRLF: the error is the key, not the encoding
        ["run", "{tmp}/study.toml"],
        "unknown key 'colour' in the top level",
        suite("\ufeff" + ("colour = 1\n" + GOOD_SUITE).replace("\n", "\r\n")),
    ),
    Case(
        "suite-probe-device-tpu",  # refused when the file is read, before any step runs
        ["run", "{tmp}/study.toml"],
        "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps",
        suite(GOOD_SUITE + 'device = "tpu"\n'),
    ),
    # ---- models
    Case(
        "model-truncated-safetensors",
        ["extract", "-m", "{tmp}/m", "-t", TOY, "-o", OUT],
        "weights file is damaged or truncated",
        model(truncate),
    ),
    Case(
        "model-no-weights",
        ["extract", "-m", "{tmp}/m", "-t", TOY, "-o", OUT],
        "no file named model.safetensors",
        model(unlink("model.")),
    ),
    Case(
        "model-corrupt-config",
        ["extract", "-m", "{tmp}/m", "-t", TOY, "-o", OUT],
        "could not load a model from ",
        model(corrupt_config),
    ),
    Case(
        "model-no-tokenizer",
        ["extract", "-m", "{tmp}/m", "-t", TOY, "-o", OUT],
        "/m has no tokenizer (no tokenizer.json",
        model(unlink("tokenizer", "vocab", "special_tokens")),
    ),
    Case(
        "model-encoder-decoder",
        ["extract", "-m", "{tmp}/m", "-t", TOY, "-o", OUT],
        "is an encoder-decoder model (t5); probekit probes encoder-only models",
        model(other_architecture("t5")),
    ),
    Case(
        "model-decoder-only",
        ["mlm-probe", "-m", "{tmp}/m", "-c", TOY, "-o", OUT],
        "is a decoder-only model (gpt2); probekit probes encoder-only models",
        model(other_architecture("gpt2")),
    ),
    Case(
        "model-hub-id-offline",
        ["extract", "-m", "no-such-org/no-such-model", "-t", TOY, "-o", OUT],
        "could not be fetched from the hub",
        toy,
    ),
    Case(
        "model-is-a-file",
        ["extract", "-m", "{model}/config.json", "-t", TOY, "-o", OUT],
        "expected a checkpoint folder",
        toy,
    ),
    # ---- devices and number options
    Case("device-tpu", [*EXTRACT, "--device", "tpu"], "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps", toy),
    Case("device-cuda-x", [*EXTRACT, "--device", "cuda:x"], "--device: unknown device 'cuda:x'", toy),
    Case("probe-device-tpu", ["probe", "{tmp}", "-o", OUT, "--device", "tpu"], "unknown device 'tpu'", toy),
    Case("max-length-1", [*EXTRACT, "--max-length", "1"], "--max-length: must be >= 2, got 1", toy),
    Case("batch-size-0", [*EXTRACT, "--batch-size", "0"], "--batch-size", toy),
    Case("pool-unknown", [*EXTRACT, "--pool", "maxx"], "unknown pooling", toy),
    Case("unseen-labels-unknown", [*EXTRACT, "--unseen-labels", "keep"], "--unseen-labels", toy),
    Case(
        "mlm-max-length-2",
        ["mlm-probe", "-m", "{model}", "-c", TOY, "-o", OUT, "--max-length", "2"],
        "--max-length: must be >= 3",
        toy,
    ),
    Case(
        "mlm-mask-ratio-above-1",
        ["mlm-probe", "-m", "{model}", "-c", TOY, "-o", OUT, "--mask-ratio", "1.5"],
        "--mask-ratio: must be in (0, 1], got 1.5",
        toy,
    ),
    Case(
        "mlm-seed-negative",
        ["mlm-probe", "-m", "{model}", "-c", TOY, "-o", OUT, "--seed", "-1"],
        "--seed: must be >= 0",
        toy,
    ),
    Case(
        "offramp-seed-negative",
        ["offramp", "-m", "{model}", "-t", TOY, "-o", OUT, "--seed", "-1"],
        "--seed: must be >= 0, got -1",
        toy,
    ),
    Case(
        "offramp-max-length-1",
        ["offramp", "-m", "{model}", "-t", TOY, "-o", OUT, "--max-length", "1"],
        "--max-length: must be >= 2, got 1",
        toy,
    ),
    Case(
        "offramp-holdout-1",
        ["offramp", "-m", "{model}", "-t", TOY, "-o", OUT, "--holdout", "1"],
        "--holdout: must be in [0, 1), got 1",
        toy,
    ),
    Case(
        "finetune-max-length-1",
        ["finetune", "-m", "{model}", "-t", "cola", "-o", OUT, "--max-length", "1"],
        "--max-length: must be >= 2, got 1",
    ),
    Case(
        "probe-seeds-0",
        ["probe", "{tmp}", "-o", OUT, "--seeds", "0"],
        "--seeds: must be at least 1",
    ),
    Case(
        "probe-mdl-fractions-not-ending-at-100",
        ["probe", "{tmp}", "-o", OUT, "--probe", "mdl", "--fractions", "10,50"],
        "--fractions: must be at least two increasing percentages ending at 100",
    ),
    Case(
        "mlm-validation-0",
        ["mlm-probe", "-m", "{model}", "-c", TOY, "-o", OUT, "--validation", "0"],
        "--validation: must be > 0, got 0",
        toy,
    ),
]
