"""DeepSeek-R1-Distill-Qwen-32B with RL^V and long chain of thought (up to 32k tokens), 2 nodes x 8 GPUs.

Layout (rlv_megatron/conf/r1_32b.yaml): TP=8 with sequence parallelism inside a node x DP=2 across nodes,
bf16, full recompute, distributed optimizer; one vLLM engine (TP=8) per node, asleep while training.
`rlv plan` on H100 80GB: 64 GiB per GPU; the KV cache holds 48 of a node's 256 sequences at 32k tokens, so
rollouts run in waves (README: "Cluster recipes"). On 4 nodes: parallel.pp=2 (TP=8 x PP=2 x DP=2).

    sbatch slurm/rlv_r1_32b.sh                                  # the cluster launch (one torchrun per node)
    python recipes/r1_32b.py --cfg job                          # print the resolved config
    ... recipes/r1_32b.py method=loo_ppo_v algo.max_tokens=16384  # overrides as usual

Environment: RLV_MODEL_DIR, RLV_DATA_DIR, RLV_OUT_DIR.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rlv_megatron.hydra_app import register_schema, run_recipe  # noqa: E402

register_schema()


@hydra.main(version_base="1.3", config_path="../rlv_megatron/conf", config_name="r1_32b")
def main(cfg: DictConfig) -> None:
    run_recipe(cfg)


if __name__ == "__main__":
    main()
