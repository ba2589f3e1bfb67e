"""The image's pins (docker/pins.txt), checked on CPU without network against the requirement metadata recorded
with them (docker/metadata.json, by docker/record_pins.py): one consistent resolution for the image's Python and
platform, the Dockerfile built from it. What this cannot show (that `docker build` succeeds, that TE's extension
compiles against torch 2.13.0, that the binaries load on a GPU) is said in docker/record_pins.py."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
NGC_TORCH = "2.10.0a0+b4e4ee81d3.nv25.10"  # the shape of an NGC PyTorch image's torch (the earlier base's)


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("record_pins", ROOT / "docker" / "record_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lock(rp):
    return rp.read_pins(rp.PINS.read_text()), json.loads(rp.METADATA.read_text())


def test_the_pins_are_one_consistent_resolution_of_the_requirements(rp, lock):
    pins, meta = lock
    assert set(meta) == set(pins)  # metadata recorded for every pin, none without one
    assert rp.check(rp.roots(), pins, meta) == []
    for name, version in (("vllm", "0.32.0"), ("torch", "2.13.0"), ("megatron-core", "0.16.1"),
                          ("transformer-engine-torch", "2.11.0"), ("transformers", "5.19.0")):
        assert pins[name] == Version(version), name


def test_the_check_refuses_an_ngc_torch_a_missing_pin_and_a_stray_one(rp, lock):
    pins, meta = lock
    ngc = {**pins, "torch": Version(NGC_TORCH)}
    problems = rp.check(rp.roots(), ngc, meta)
    assert f"vllm==0.32.0 requires torch==2.13.0, pinned torch=={NGC_TORCH}" in problems  # the old image's conflict
    missing = {k: v for k, v in pins.items() if k != "six"}  # six: only for Python > 3.11 (vllm's marker)
    assert any(p.endswith("requires six>=1.16.0; python_version > \"3.11\": nothing pinned") for p in
               rp.check(rp.roots(), missing, meta))
    stray = rp.check(rp.roots(), {**pins, "flask": Version("3.0.0")}, meta)
    assert stray == ["flask==3.0.0 is pinned but nothing requires it"]


def test_megatron_cores_dev_extra_would_conflict_with_vllm(rp, lock):
    """Why requirements.in installs megatron-core without extras."""
    pins, meta = lock
    problems = rp.check(rp.roots() + ["megatron-core[dev]==0.16.1"], pins, meta)
    assert any(p.startswith("megatron-core==0.16.1[dev] requires flashinfer-python~=0.5.0")
               and p.endswith("pinned flashinfer-python==0.7.0.post1") for p in problems), problems


def test_the_dockerfile_builds_from_the_pins(rp, lock):
    pins, _ = lock
    text = (ROOT / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu(\S+)$", code, re.M)
    assert base and re.search(r"^FROM \$\{CUDA_IMAGE\}$", code, re.M)
    runtime = pins["nvidia-cuda-runtime"]  # the CUDA torch's wheels were built for
    assert (int(base.group(1)), int(base.group(2))) == (runtime.major, runtime.minor)
    assert base.group(3) == "24.04" and rp.TARGET["python_version"] == "3.12"  # Ubuntu 24.04's Python is 3.12
    installs = re.findall(r"pip install [^\n]*", code)
    assert len(installs) == 3 and all("-c docker/pins.txt" in i for i in installs), installs
    assert "-r docker/requirements.in" in installs[0] and '-e ".[gpu]"' in installs[2]
    te_torch = re.search(r"transformer-engine-torch==(\S+)", code).group(1)
    assert Version(te_torch) == pins["transformer-engine-torch"] and "--no-build-isolation" in installs[1]
    for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", code, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path


def test_every_root_requirement_is_an_exact_pin_the_lock_holds(rp, lock):
    pins, _ = lock
    for line in rp.roots():
        req = Requirement(line)
        exact = [s for s in req.specifier if s.operator == "=="]
        if exact:
            assert pins[canonicalize_name(req.name)] == Version(exact[0].version), line
    assert "megatron-core==0.16.1" in rp.roots() and "vllm==0.32.0" in rp.roots()
