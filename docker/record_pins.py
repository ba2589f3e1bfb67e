"""Record the image's pins: pip's resolution of docker/requirements.in + pyproject.toml's dependencies and `gpu`
extra for the image's platform (CPython 3.12, manylinux x86_64), written to docker/pins.txt (every package ==
its version) and docker/metadata.json (each locked package's Requires-Dist, as its index served it). Needs
network (PyPI, metadata only: pip's --dry-run fetches no wheels where the index serves PEP 658 metadata) and a
Python 3.12 (markers such as `python_version > "3.11"` are evaluated by the interpreter that resolves).

`check` is the offline test of that record (tests/test_docker.py runs it): walking the requirements from the
roots, with markers evaluated for the image and extras carried along, every requirement is met by its pin and
every pin is reached. That is the consistency pip's resolver established, re-checked from committed metadata
without network. It does not prove that the image builds or runs: that the wheels exist for its glibc, that
TransformerEngine's extension compiles against torch 2.13.0 with the image's nvcc, that vLLM's and TE's
binaries load beside each other, or anything about a GPU. Only `docker build` (and scripts/gpu_check.sh in the
image) shows those.

Usage: python docker/record_pins.py [--python /path/to/python3.12]      (then commit pins.txt, metadata.json)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import urllib.request
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PINS, METADATA, REQUIREMENTS = HERE / "pins.txt", HERE / "metadata.json", HERE / "requirements.in"
TE_TORCH = "transformer-engine-torch"  # an sdist built in the image; its metadata comes from its PKG-INFO
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "implementation_version": "3.12.3", "os_name": "posix", "platform_machine": "x86_64",
          "platform_system": "Linux", "sys_platform": "linux", "platform_python_implementation": "CPython",
          "platform_release": "", "platform_version": ""}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(17, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]


def roots() -> list[str]:
    """The top-level requirements: requirements.in, the package's own (pyproject: dependencies + gpu), and TE's
    PyTorch extension at TE's version."""
    lines = [re.sub(r"\s+#.*", "", line).strip() for line in REQUIREMENTS.read_text().splitlines()]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [x for x in lines if x and not x.startswith("#")] + project["dependencies"] + \
        project["optional-dependencies"]["gpu"]
    te = next(Requirement(r) for r in reqs if canonicalize_name(Requirement(r).name) == "transformer-engine")
    return reqs + [f"{TE_TORCH}=={next(iter(te.specifier)).version}"]


def read_pins(text: str) -> dict[str, Version]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def check(root_reqs: list[str], pins: dict[str, Version], metadata: dict[str, list[str]]) -> list[str]:
    """Problems of the lock: a requirement its pin does not meet (or with no pin), a pin nothing requires."""
    problems, done = [], {}  # done: package -> extras whose requirements were walked
    todo = [("requirements", Requirement(r)) for r in root_reqs]
    while todo:
        by, req = todo.pop()
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{by} requires {req}: nothing pinned")
            continue
        if not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{by} requires {req}, pinned {name}=={pins[name]}")
        extras = {canonicalize_name(e) for e in req.extras}
        new = extras - done.get(name, set()) if name in done else extras | {""}
        if not new:
            continue
        done[name] = done.get(name, set()) | new
        for line in metadata.get(name, []):
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({**TARGET, "extra": e}) for e in new):
                todo.append((f"{name}=={pins[name]}" + (f"[{','.join(sorted(new - {''}))}]" if new - {""} else ""),
                             dep))
    problems += [f"{name}=={v} is pinned but nothing requires it" for name, v in pins.items() if name not in done]
    return problems


def _te_torch_metadata(version: str, cuda_major: int) -> list[str]:
    """Requires-Dist of TE's PyTorch extension from its sdist's PKG-INFO. Its setup.py names the TE core for
    the CUDA major of the torch it is built against (PKG-INFO says what the sdist's build machine had)."""
    index = urllib.request.urlopen(f"https://pypi.org/simple/{TE_TORCH}/", timeout=60).read().decode()
    url = re.search(rf'href="([^"]*transformer_engine_torch-{re.escape(version)}\.tar\.gz[^"]*)"', index).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sdist.tar.gz"
        path.write_bytes(urllib.request.urlopen(url, timeout=120).read())
        with tarfile.open(path) as tar:
            info = tar.extractfile(f"transformer_engine_torch-{version}/PKG-INFO").read().decode()
    reqs = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Requires-Dist:")]
    return [re.sub(r"transformer_engine_cu\d+", f"transformer_engine_cu{cuda_major}", r) for r in reqs]


def record(python: str) -> None:
    reqs = roots()
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp) / "wheels"
        env = {**os.environ, "PIP_CONSTRAINT": ""}  # a machine-wide constraint file must not shape the image
        # antlr4-python3-runtime 4.9.3 (omegaconf pins 4.9.*) exists only as an sdist: a pure-Python wheel of it
        subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                        "antlr4-python3-runtime==4.9.3"], check=True, env=env)
        (Path(tmp) / "req.txt").write_text("\n".join(r for r in reqs if not r.startswith(TE_TORCH)))
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
               f"{tmp}/report.json", "--target", f"{tmp}/target", "--only-binary=:all:", "--find-links", str(wheels),
               "--implementation", "cp", "--python-version", "3.12", "-r", f"{tmp}/req.txt"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd, check=True, env=env)
        report = json.loads(Path(tmp, "report.json").read_text())
    if report["environment"]["python_version"] != "3.12":
        raise SystemExit(f"markers were evaluated for Python {report['environment']['python_version']}: "
                         "pass --python a Python 3.12")
    meta = {canonicalize_name(i["metadata"]["name"]): (i["metadata"]["version"], i["metadata"].get("requires_dist", []))
            for i in report["install"]}
    te_version = reqs[-1].split("==")[1]
    cuda_major = Version(meta["nvidia-cuda-runtime"][0]).major
    meta[TE_TORCH] = (te_version, _te_torch_metadata(te_version, cuda_major))
    PINS.write_text("# pip's resolution for the image (CPython 3.12, manylinux x86_64), by docker/record_pins.py;\n"
                    "# tests/test_docker.py checks it against docker/metadata.json. Do not edit by hand.\n" +
                    "".join(f"{n}=={v}\n" for n, (v, _) in sorted(meta.items())))
    METADATA.write_text("{\n" + ",\n".join(f"{json.dumps(n)}: {json.dumps(d)}" for n, (_, d) in sorted(meta.items()))
                        + "\n}\n")
    problems = check(reqs, read_pins(PINS.read_text()), json.loads(METADATA.read_text()))
    print(f"{len(meta)} packages pinned; " + ("consistent" if not problems else "PROBLEMS:\n" + "\n".join(problems)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # pyenv's own interpreter first: its shim answers `which` even where 3.12 is not selected
    found = next(iter(sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))), None) \
        or shutil.which("python3.12")
    ap.add_argument("--python", default=found, help="a Python 3.12 with pip (default: %(default)s)")
    args = ap.parse_args()
    if not args.python:
        sys.exit("no Python 3.12 found: pass --python")
    record(args.python)


if __name__ == "__main__":
    main()
