"""The Hydra recipe: resolved config printing and start-up validation (no training)."""

import os
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.py"


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, timeout=timeout)


def test_cfg_job_prints_the_resolved_config():
    out = _run("--cfg", "job", "verifier.lam=0.5", "algo.advantage=rloo")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lam: 0.5" in out.stdout and "advantage: rloo" in out.stdout and "group_size: 8" in out.stdout


def _rejected_at_composition(out) -> str:
    """Hydra refused the config before the job ran: its exit status 1 and its short message, no traceback
    and no 'Error executing job' (what a crash inside the recipe prints, echoing the overrides)."""
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr, out.stderr[-2000:]
    return out.stderr


def test_unknown_field_fails_naming_it():
    err = _rejected_at_composition(_run("verifier.lamda=1"))
    # checked against the typed schema (VerifierConfig), not just absent from the YAML
    assert "Could not override 'verifier.lamda'" in err and "Key 'lamda' not in 'VerifierConfig'" in err, err
    assert "full_key: verifier.lamda" in err


def test_wrong_type_fails_naming_the_field():
    err = _rejected_at_composition(_run("algo.group_size=eight"))
    assert "Value 'eight' of type 'str' could not be converted to Integer" in err, err
    assert "full_key: algo.group_size" in err and "object_type=AlgoConfig" in err


def test_invalid_choice_fails_before_any_work(tmp_path):
    out = _run("algo.advantage=ppo", f"train.out_dir={tmp_path}")
    assert out.returncode == 2 and "error: algo.advantage='ppo'" in out.stderr
    assert "Traceback" not in out.stderr  # one line, as the rlv commands
    assert not (tmp_path / "metrics.json").exists()


def test_bad_data_is_one_line_naming_file_and_line(tmp_path):
    from rlv_megatron import assets

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "x"\n')
    args = ("task.name=math", f"task.train_path={bad}", f"task.eval_path={bad}",
            f"model.path={assets.model_dir('smollm2-135m-instruct')}", f"train.out_dir={tmp_path / 'run'}")
    out = _run(*args)
    assert out.returncode == 2 and f"error: {bad}:2: invalid JSON" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    debug = subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "RLV_TRACEBACK": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and f"{bad}:2" in debug.stderr


def test_a_config_that_cannot_fit_is_refused_before_training(tmp_path):
    """rlv plan's check on this host, before the model is built: one line naming the biggest term, and an
    earlier run's outputs in the same out_dir left as they were."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    out = _run("train.micro_batch_tokens=100000000", "algo.prompts_per_step=100000", f"train.out_dir={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: does not fit:" in out.stderr and "the biggest term is activations" in out.stderr, out.stderr
    assert "sft:" not in out.stderr and not (tmp_path / "metrics.json").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n' and "starting over" not in out.stderr
