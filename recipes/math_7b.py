"""Qwen2.5-Math-7B on MATH with RL^V, one 8-GPU node, inside the project's container (a Hydra app).

Layout (rlv_megatron/conf/math_7b.yaml): TP=2 x DP=4 megatron-core training in bf16 with full recompute
and the distributed optimizer; one colocated vLLM engine (TP=2) per data-parallel replica, asleep while the
trainer runs; weights streamed to it after every step. `rlv plan` for it on H100 80GB: 55 GiB per GPU,
about 52k train and 106k rollout tokens/s for the node (README: "Cluster recipes").

    torchrun --nproc-per-node 8 recipes/math_7b.py                     # GRPO^V
    torchrun --nproc-per-node 8 recipes/math_7b.py method=loo_ppo_v    # leave-one-out PPO^V
    torchrun --nproc-per-node 8 recipes/math_7b.py model.impl=te model.fp8=hybrid   # TransformerEngine FP8
    python recipes/math_7b.py --cfg job                                # print the resolved config

Environment: RLV_MODEL_DIR (the HF model directory), RLV_DATA_DIR (MATH files), RLV_OUT_DIR.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rlv_megatron.hydra_app import register_schema, run_recipe  # noqa: E402

register_schema()


@hydra.main(version_base="1.3", config_path="../rlv_megatron/conf", config_name="math_7b")
def main(cfg: DictConfig) -> None:
    run_recipe(cfg)


if __name__ == "__main__":
    main()
