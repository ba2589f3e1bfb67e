import os
import sys
from pathlib import Path

import pytest

from tests.cores import every_core, pin_worker

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Triton kernels run interpreted in a child pytest started with TRITON_INTERPRET=1 (tests/test_kernels.py)
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["interpreted"]

# Under pytest-xdist (scripts/test.sh): the files that take longest go first, so that neither worker is left
# with a long file at the end. Order only; a file not named here keeps its place after these.
# (Not --dist loadgroup: xdist 3.8 marks groups in Node._nodeid, which pytest 9.2 no longer reads.)
# (scripts/test.sh passes --no-loadscope-reorder, without which xdist orders files by their number of tests.)
# Measured 2026-12-07: each file's total in seconds on one worker.
LONGEST_FIRST = ["test_slurm.py",  # 177; first, so that the other worker overlaps its waits for Slurm
                 "test_parallel_sync.py", "test_faults.py", "test_real_model.py", "test_resume.py",  # 250..145
                 "test_serve.py", "test_checkpoint.py", "test_engine.py", "test_parallel_step.py",  # 140..55
                 "test_eval_e2e.py", "test_run_options.py", "test_grader_robustness.py", "test_kernels.py",
                 "test_trainer.py", "test_plan.py", "test_verifier_head.py", "test_eval.py"]


def pytest_configure(config):
    pin_worker()


@pytest.fixture(autouse=True)
def _cores(request):
    """A `two_cores` test gets every core for its duration (under xdist: tests/cores.py)."""
    if request.node.get_closest_marker("two_cores") is None:
        yield
        return
    with every_core():
        yield


def pytest_collection_modifyitems(config, items):
    """The quick tier: every test not marked slow. The longest files first (scripts/test.sh sends each file to
    one xdist worker, --dist loadfile, so that a file's module fixtures are computed once)."""
    for item in items:
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.quick)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.fspath).name, len(rank)))  # stable: the rest in order


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Random tiny HF models written by transformers: the independent reference for conversion tests."""
    from rlv_megatron.models.tiny import make_hf_model

    root = tmp_path_factory.mktemp("hf")
    return {
        "qwen2": make_hf_model("qwen2", root / "qwen2", seed=1),
        "llama": make_hf_model("llama", root / "llama", seed=2, rope_theta=500000.0),
        "qwen2_tied": make_hf_model("qwen2", root / "qwen2_tied", seed=3, tie_word_embeddings=True),
        "llama_tied": make_hf_model("llama", root / "llama_tied", seed=4, tie_word_embeddings=True),
    }


@pytest.fixture(scope="session")
def clean_tiny_run(tmp_path_factory) -> Path:
    """tests/shared_runs.TINY_SHORT run once with no fault, in sync mode: what the resume and fault tests compare
    with. It leaves no process and no /dev/shm file behind after a normal exit."""
    from tests.shared_runs import TINY_SHORT, shared

    def make(out):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from chaos import finish, start

        rc, err, left = finish(start(out, run=TINY_SHORT))
        assert rc == 0, err[-3000:]
        assert not left, f"left behind: {left}"

    return shared(tmp_path_factory, "clean_tiny_run", make)


@pytest.fixture(scope="session")
def dp_reference_run(tmp_path_factory) -> Path:
    """tests/shared_runs.DP_SHORT in one process: what the data-parallel run and the Slurm job must repeat."""
    from tests.shared_runs import DP_SHORT, run_tiny, shared

    return shared(tmp_path_factory, "dp_reference_run", lambda out: run_tiny(out, DP_SHORT))
