"""The image's last build step: every package of docker/pins.txt installed at its pinned version, and the
stack imports together (torch with CUDA, TransformerEngine's PyTorch extension, megatron-core, vLLM)."""

from importlib.metadata import distributions
from pathlib import Path

from packaging.utils import canonicalize_name

pins = dict(line.split("==") for line in (Path(__file__).parent / "pins.txt").read_text().splitlines()
            if line and not line.startswith("#"))
got = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
bad = {name: (want, got.get(name)) for name, want in pins.items() if got.get(name) != want}
assert not bad, f"installed versions differ from docker/pins.txt (pinned, installed): {bad}"

import megatron.core  # noqa: E402,F401
import torch  # noqa: E402
import transformer_engine.pytorch  # noqa: E402,F401
import vllm  # noqa: E402

print(f"image ok: {len(pins)} pins; torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}")
