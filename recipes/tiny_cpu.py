"""The embedded default: GRPO^V on CPU in minutes (a Hydra app).

SFT warm start of a small Qwen2-shaped megatron-core model on synthetic subset-sum traces (with the
verification format: correct traces -> "Yes", corrupted ones -> "No"), then GRPO^V with rollouts from a
colocated vLLM engine and a weight sync every step, then evaluation on held-out problems: pass@1,
majority@k, best-of-k and weighted@k for k in 1..16. Writes TensorBoard logs, curves.png, pool.jsonl and
metrics.json, whose path is the last line printed. Overrides: `python recipes/tiny_cpu.py verifier.lam=0`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rlv_megatron.hydra_app import register_schema, run_recipe  # noqa: E402

register_schema()


@hydra.main(version_base="1.3", config_path="../rlv_megatron/conf", config_name="tiny_cpu")
def main(cfg: DictConfig) -> None:
    run_recipe(cfg)


if __name__ == "__main__":
    main()
