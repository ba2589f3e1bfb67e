"""A run's options around the training itself: which outputs it keeps, whether it evaluates, what it says
when it resumes or starts over, the subset-sum tokenizer with a model directory, and error messages that
name real config fields."""

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlv_megatron import config
from rlv_megatron.config import Config, ConfigError, TaskConfig, validate
from rlv_megatron.run import announce, task_config
from rlv_megatron.tasks import subset_sum as ss
from rlv_megatron.tasks.chat import DEFAULT_QUESTION
from rlv_megatron.tasks.registry import make_task
from rlv_megatron.train.checkpoint import prune as prune_checkpoints

ROOT = Path(__file__).resolve().parents[1]

# `section.x` in messages that are Hugging Face names, not config fields
NOT_FIELDS = {"model.safetensors", "model.embed_tokens", "model.norm"}
# a field name filled in at run time, checked by hand: task.{train_path, eval_path}
# serve.{}: check_serve names serve's numeric fields and the request field parse() refused, each a ServeConfig
# field (tests/test_serve_units.py checks serve.strategy and serve.max_samples through validate)
DYNAMIC = {("rlv_megatron/tasks/registry.py", "task.{}"), ("rlv_megatron/config.py", "serve.{}")}


def _fields() -> dict[str, set[str]]:
    return {f.name: {g.name for g in dataclasses.fields(getattr(config, f.type) if isinstance(f.type, str) else f.type)}
            for f in dataclasses.fields(Config)}


def _text(node) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def test_messages_name_real_config_fields():
    """Every `section.field` in a string passed to a call (error messages, registries, prints) is a field."""
    fields = _fields()
    pattern = re.compile(r"(?<![\w./])(" + "|".join(fields) + r")\.(\{\}|\w+)")
    bad = []
    for py in sorted((ROOT / "rlv_megatron").rglob("*.py")):
        rel = str(py.relative_to(ROOT))
        for node in ast.walk(ast.parse(py.read_text())):
            if not isinstance(node, ast.Call):
                continue
            for arg in node.args:
                for m in pattern.finditer(_text(arg) or ""):
                    name = m.group(0)
                    if name in NOT_FIELDS or (rel, name) in DYNAMIC or m.group(2) in fields[m.group(1)]:
                        continue
                    bad.append(f"{rel}:{node.lineno}: {name}")
    assert not bad, "messages naming config fields that do not exist:\n" + "\n".join(bad)


def test_keep_checkpoints_is_not_negative():
    cfg = Config()
    cfg.train.keep_checkpoints = -1
    with pytest.raises(ConfigError, match=r"train\.keep_checkpoints=-1"):
        validate(cfg)


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"step": step, "layout_pp_tp_dp": [1, 1, 1], "files": {}}))
    (root / "latest").write_text(path.name + "\n")
    return path


def test_prune_keeps_the_newest_and_drops_an_abandoned_runs_later_steps(tmp_path):
    for step in (1, 2, 3, 10):  # step 10: an earlier run's, this one started over (train.resume=false)
        _fake_checkpoint(tmp_path, step)
    prune_checkpoints(tmp_path, keep=2, step=3)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    prune_checkpoints(tmp_path, keep=1, step=3)
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000003"]


def test_resume_is_announced_with_how_to_start_over(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = Config()
    assert announce(cfg, tmp_path) is None and capsys.readouterr().err == ""  # a fresh out_dir: silent
    ckpt = _fake_checkpoint(tmp_path / "checkpoints", 3)
    assert announce(cfg, tmp_path) == ckpt
    err = capsys.readouterr().err
    assert f"resuming from {ckpt} (RL step 3)" in err and f"delete {tmp_path} or pass train.resume=false" in err


def test_starting_over_says_so_and_drops_the_appended_logs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    _fake_checkpoint(tmp_path / "checkpoints", 3)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    cfg = Config()
    cfg.train.resume = False
    assert announce(cfg, tmp_path) is None
    assert "train.resume=false): starting over, this run overwrites them" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()  # appended to by a run: the new one starts it afresh


def _math(**task) -> Config:
    cfg = Config()
    cfg.task = TaskConfig(name="math", train_path="math/train", **task)
    return cfg


def test_evaluating_math_needs_an_eval_file_and_says_how_to_run_without():
    with pytest.raises(ConfigError, match=r"task\.eval_path: required .*eval\.final=false"):
        task_config(_math())
    cfg = _math()
    cfg.eval.final, cfg.train.eval_every = False, 5  # a periodic evaluation still needs it
    with pytest.raises(ConfigError, match=r"task\.eval_path"):
        task_config(cfg)


def test_no_evaluation_builds_a_math_task_without_an_eval_file(tmp_path):
    cfg = _math()
    cfg.eval.final = False
    ss.make_tokenizer().save_pretrained(tmp_path)  # any HF tokenizer directory serves
    task_cfg, num_eval = task_config(cfg)
    task = make_task(task_cfg, "q", num_eval, tokenizer_path=str(tmp_path))
    try:
        assert task.eval == [] and len(task.sample_train(3, seed=0)) == 3
    finally:
        task.close()


def test_subset_sum_uses_the_model_directorys_tokenizer(tmp_path):
    ss.make_tokenizer("Correct?").save_pretrained(tmp_path)  # e.g. an earlier run's start/ export
    tok = make_task(TaskConfig(), DEFAULT_QUESTION, 2, tokenizer_path=str(tmp_path)).tokenizer
    assert "Correct?" in tok.get_vocab() and DEFAULT_QUESTION not in tok.get_vocab()
    assert DEFAULT_QUESTION in make_task(TaskConfig(), DEFAULT_QUESTION, 2).tokenizer.get_vocab()  # scratch


def test_subset_sum_refuses_a_model_directory_without_a_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # transformers would build an empty tokenizer from this
    with pytest.raises(ConfigError, match=r"model\.path=.*no tokenizer.*task\.name=subset_sum"):
        make_task(TaskConfig(), DEFAULT_QUESTION, 2, tokenizer_path=str(tmp_path))


TINY = ["sft.steps=2", "sft.batch_size=4", "train.steps=2", "train.save_every=1", "algo.prompts_per_step=2",
        "algo.group_size=2", "algo.max_tokens=8", "train.keep_checkpoints=1", "eval.final=false",
        "train.keep_start=false", "train.export_final=false"]


@pytest.mark.slow
def test_a_run_that_keeps_one_checkpoint_no_exports_and_no_evaluation(tmp_path):
    tmp_path = tmp_path.resolve()  # as the run prints it
    cmd = [sys.executable, str(ROOT / "recipes" / "tiny_cpu.py"), *TINY, f"train.out_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000002"]  # two saved
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not any((tmp_path / name).exists() for name in ("start", "model", "pool.jsonl"))
    assert "reward/mean" in json.loads((tmp_path / "metrics.json").read_text())  # the training metrics
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "reward/mean" in r)  # RL step 0: its own phases, not the warm start's
    assert first["step"] == 0 and "time/sft" not in first
    phases = sum(first[f"time/{p}"] for p in ("rollout", "reward", "train", "sync"))
    assert phases <= first["time/step"]
    assert [r["step"] for r in records if "sft/seconds" in r] == [2]  # logged once, after the 2 SFT steps
    assert "no final evaluation (eval.final=false)" in done.stdout
    assert "rlv:" not in done.stderr  # a fresh out_dir: nothing to announce
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stderr.find(f"rlv: resuming from {tmp_path}/checkpoints/step_00000002 (RL step 2): "
                             f"delete {tmp_path} or pass train.resume=false to start over")
    assert said >= 0
    assert "Loading safetensors" not in again.stderr  # no RL step left and no evaluation: no engine starts
