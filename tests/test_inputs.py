"""Inputs as users hand them over: text files as editors save them, binary files given as text, devices,
token limits longer than the model's positions, checkpoints probekit cannot probe, and the bounds of every
number option."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from transformers import BertConfig, GPT2Config, RobertaConfig, T5Config
from typer.testing import CliRunner

import probekit
from probekit.backbone import Backbone, check_encoder, position_limit, resolve_device, usable_length
from probekit.cli import app
from probekit.config import Config, fields_of
from probekit.data import load_task
from probekit.data.corpus import read_corpus
from probekit.encoding import encode
from probekit.errors import DataError, ParamError, ProbekitError, ProbekitWarning
from probekit.suite import load_suite
from tests.helpers import tiny_tokenizer, toy_senteval
from tests.test_finetune import write_cola
from tests.test_suite import SUITE, write_suite

EDITORS: dict[str, Callable[[str], bytes]] = {
    "bom": lambda text: b"\xef\xbb\xbf" + text.encode(),
    "crlf": lambda text: text.replace("\n", "\r\n").encode(),
    "bom+crlf": lambda text: b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode(),
    "trailing blank lines": lambda text: (text + "\n\n  \n").encode(),
    "no final newline": lambda text: text.rstrip("\n").encode(),
}
"""How an editor or a Windows tool may save the same text."""


def same_data(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.label_names == b.label_names
    assert a.splits.keys() == b.splits.keys()
    for name in a.splits:
        assert a.splits[name].texts == b.splits[name].texts
        assert a.splits[name].text_pairs == b.splits[name].text_pairs
        np.testing.assert_array_equal(a.splits[name].labels, b.splits[name].labels)


@pytest.mark.parametrize("editor", EDITORS)
def test_senteval_file_as_editors_save_it(tmp_path: Path, editor: str) -> None:
    plain = toy_senteval(tmp_path / "plain.txt")
    saved = tmp_path / "saved.txt"
    saved.write_bytes(EDITORS[editor](plain.read_text(encoding="utf-8")))
    assert saved.read_bytes() != plain.read_bytes()
    same_data(load_task(plain), load_task(saved))


def test_senteval_reads_as_senteval_does(tmp_path: Path) -> None:
    """SentEval: ``line.rstrip().split('\\t')``, label = field 1, sentence = the last field."""
    rows = [("tr", "O", "the cat sat"), ("tr", "I", "she saw"), ("va", "O", "a dog"), ("te", "I", "he ran")]
    three = tmp_path / "three.txt"
    three.write_text("".join(f"{s}\t{y}\t{x}\n" for s, y, x in rows), encoding="utf-8")
    extra = tmp_path / "extra.txt"  # SentEval's own files carry more fields; trailing tabs are stripped too
    extra.write_text("".join(f"{s}\t{y}\tignored\t7\t{x}\t\n" for s, y, x in rows), encoding="utf-8")
    same_data(load_task(three), load_task(extra))
    assert load_task(extra).splits["train"].texts == ["the cat sat", "she saw"]
    short = tmp_path / "short.txt"
    short.write_text("tr\tO\tthe cat\ntr\tO\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected 3 tab-separated columns .*found 2") as info:
        load_task(short)
    assert info.value.line == 2 and str(short) in str(info.value)


GLUE_SST2 = {
    "train.tsv": "sentence\tlabel\na charming journey \t1\nunflinchingly bleak \t0\nit works \t1\n",
    "dev.tsv": "sentence\tlabel\nboring \t0\nfun \t1\n",
}


@pytest.mark.parametrize("editor", EDITORS)
def test_glue_files_as_editors_save_them(tmp_path: Path, editor: str) -> None:
    for root, save in (("plain", str.encode), ("saved", EDITORS[editor])):
        for name, text in GLUE_SST2.items():
            path = tmp_path / root / "glue" / "SST-2" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(save(text))
    same_data(load_task("sst2", tmp_path / "plain"), load_task("sst2", tmp_path / "saved"))


@pytest.mark.parametrize("editor", EDITORS)
def test_corpus_files_as_editors_save_them(tmp_path: Path, editor: str) -> None:
    text = "the first passage\nthe second passage\n"
    squad = '{"data": [{"paragraphs": [{"context": "one passage"}, {"context": "two"}]}]}\n'
    for suffix, body in ((".txt", text), (".json", squad)):
        plain, saved = tmp_path / f"plain{suffix}", tmp_path / f"saved{suffix}"
        plain.write_text(body, encoding="utf-8")
        saved.write_bytes(EDITORS[editor](body))
        assert read_corpus(saved).passages == read_corpus(plain).passages


@pytest.mark.parametrize("editor", ["bom", "crlf", "bom+crlf", "no final newline"])
def test_suite_file_as_editors_save_it(tiny_model: Path, tmp_path: Path, editor: str) -> None:
    path = write_suite(tmp_path, tiny_model)
    plain = load_suite(path)
    path.write_bytes(EDITORS[editor](SUITE.format(model=tiny_model)))
    saved = load_suite(path)
    assert dataclasses.replace(saved, steps={}) == dataclasses.replace(plain, steps={})
    assert {k: (type(s), s.config, s.options) for k, s in saved.steps.items()} == {
        k: (type(s), s.config, s.options) for k, s in plain.steps.items()
    }
    assert len(plain.steps) == 4


def test_binary_file_given_as_text_is_one_line(tmp_path: Path, tiny_model: Path) -> None:
    weights = tiny_model / "model.safetensors"
    with pytest.raises(DataError, match="a binary file, not text") as info:
        load_task(weights)
    assert str(weights) in str(info.value)
    blob = tmp_path / "blob.txt"
    blob.write_bytes(b"tr\tO\tthe cat\n\x00\x01\x02")
    with pytest.raises(DataError, match="binary file"):
        load_task(blob)
    with pytest.raises(DataError, match="binary file"):
        read_corpus(blob)
    suite = tmp_path / "study.toml"
    suite.write_bytes(b'name = "x"\x00')
    with pytest.raises(DataError, match="binary file"):
        load_suite(suite)


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "cpu:0", "mps:1", "CUDA", ""])
def test_unknown_device_names_the_accepted_forms(device: str) -> None:
    with pytest.raises(ParamError, match="use auto, cpu, cuda, cuda:N or mps") as info:
        resolve_device(device)
    assert info.value.param == "device"


def test_known_devices() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")


# ---------------------------------------------------------------- the model's positions


def test_position_limit_of_configs() -> None:
    assert position_limit(BertConfig(max_position_embeddings=512)) == 512
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # ids start at 2
    assert position_limit(GPT2Config(n_positions=64)) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert usable_length(128, BertConfig(max_position_embeddings=512)) == 128  # no warning
    warning = r"max_length 100000 is more than the model takes \(512 positions\); using 512"
    with pytest.warns(ProbekitWarning, match=warning):
        assert usable_length(100000, BertConfig(max_position_embeddings=512)) == 512


def test_max_length_beyond_the_positions_is_truncated_with_a_warning(tiny_model: Path) -> None:
    from transformers import AutoModel

    backbone = Backbone(AutoModel.from_pretrained(tiny_model), tiny_tokenizer(), name="tiny")
    limit = backbone.config.max_position_embeddings
    long = " ".join(["the cat sat"] * 400)  # far more tokens than the model has positions
    assert len(backbone.tokenizer(long)["input_ids"]) > 4 * limit
    with pytest.warns(ProbekitWarning, match=f"using {limit}"):
        got = encode(backbone, [long, "a dog"], max_length=100000)
    want = encode(backbone, [long, "a dog"], max_length=limit)
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (T5Config(d_model=16, num_layers=1, num_heads=2), "an encoder-decoder model \\(t5\\)"),
        (GPT2Config(n_embd=16, n_layer=1, n_head=2), "a decoder-only model \\(gpt2\\)"),
    ],
)
def test_non_encoders_are_refused_in_one_line(config: object, kind: str) -> None:
    with pytest.raises(ProbekitError, match=f"some/model is {kind}; probekit probes encoder-only models") as info:
        check_encoder(config, "some/model")
    assert "\n" not in str(info.value)


def test_encoders_pass() -> None:
    check_encoder(BertConfig(), "bert")
    check_encoder(RobertaConfig(), "roberta")


# ---------------------------------------------------------------- the bounds of number options

BOUNDS: list[tuple[Callable[[str], bool], str, float]] = [
    (lambda n: n == "seed", "ge", 0),
    (lambda n: n == "max_length", "ge", 2),
    (lambda n: n.endswith("batch_size") or n == "batch_sizes", "ge", 1),
    (lambda n: n.endswith("epochs") or n in ("max_epoch", "steps", "max_steps", "sweep_steps"), "ge", 1),
    (lambda n: n.endswith(("_ratio", "_ratios")) or n in ("warmup", "warmup_ratio"), "le", 1),
]
"""Option name -> the bound it must carry, whatever the component (checked on every config dataclass)."""


def all_configs() -> list[type[Config]]:
    for mod in pkgutil.walk_packages(probekit.__path__, "probekit."):
        importlib.import_module(mod.name)
    seen: list[type[Config]] = []
    todo = list(Config.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return [c for c in seen if dataclasses.is_dataclass(c) and c.__module__.startswith("probekit.")]


def test_every_number_option_has_its_bounds() -> None:
    configs = all_configs()
    assert len(configs) >= 15
    missing = []
    checked = 0
    for cls in configs:
        for f in fields_of(cls):
            for matches, bound, value in BOUNDS:
                if not matches(f.name) or f.type is str:  # the extraction's batch_size: "auto" or a number
                    continue
                checked += 1
                b = f.bounds
                if bound == "ge":  # an integer's gt=0 is ge=1
                    ok = b.get("ge", -np.inf) >= value or b.get("gt", -np.inf) >= value - 1
                else:
                    ok = min(b.get("le", np.inf), b.get("lt", np.inf)) <= value
                if not ok:
                    missing.append(f"{cls.__name__}.{f.name} ({bound} {value}, has {f.bounds})")
    assert checked >= 20
    assert not missing, missing


@pytest.mark.parametrize(
    ("cls_path", "field", "value", "message"),
    [
        ("probekit.offramp.run:OffRampConfig", "seed", -1, "must be >= 0, got -1"),
        ("probekit.offramp.run:OffRampConfig", "max_length", 1, "must be >= 2, got 1"),
        ("probekit.finetune.train:TrainOptions", "max_length", 1, "must be >= 2, got 1"),
        ("probekit.offramp.train:TrainConfig", "seed", -3, "must be >= 0, got -3"),
        ("probekit.offramp.policies:PolicyConfig", "seed", -1, "must be >= 0, got -1"),
    ],
)
def test_new_bounds_refuse_with_the_range(cls_path: str, field: str, value: int, message: str) -> None:
    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ParamError, match=message) as info:
        cls(**{field: value})
    assert info.value.param == field


def test_cli_extract_of_a_very_long_sentence_with_max_length_100000(tiny_model: Path, tmp_path: Path) -> None:
    task = tmp_path / "long.txt"
    long = " ".join(["the cat sat on the mat"] * 300)
    task.write_text(f"tr\ta\t{long}\ntr\tb\ta dog\nva\ta\tthe cat\nte\tb\tit ran\n", encoding="utf-8")
    args = ["extract", "-m", str(tiny_model), "-t", str(task), "-q"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "long"), "--max-length", "100000"])
    assert result.exit_code == 0, result.output
    assert "warning: max_length 100000 is more than 'tiny-bert" in result.output
    assert "using 128" in result.output
    capped = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "capped"), "--max-length", "128"])
    assert capped.exit_code == 0 and "warning" not in capped.output
    (got,) = (tmp_path / "long").rglob("train.features.npy")
    (want,) = (tmp_path / "capped").rglob("train.features.npy")
    np.testing.assert_array_equal(np.load(got), np.load(want))  # truncated to the model's 128 positions


def test_finetune_caps_max_length_at_the_positions(tiny_model: Path, tmp_path: Path) -> None:
    from probekit.finetune.train import TrainOptions, _job, load_tokenizer

    data = load_task("cola", write_cola(tmp_path))
    long = " ".join(["the cat sat"] * 200)
    data.splits["train"].texts[0] = long
    with pytest.warns(ProbekitWarning, match="max_length 100000 is more than .*using 128"):
        job = _job(str(tiny_model), data, None, TrainOptions(max_length=100000), load_tokenizer(str(tiny_model)))  # type: ignore[arg-type]
    assert int(job.train_tok.lengths.max()) == 128
