"""Hydra glue: the typed schema as the `base` config, so YAML and CLI overrides are checked against it
(an unknown key or a wrong type fails at start-up naming the field)."""

import contextlib

from hydra.core.config_store import ConfigStore

from rlv_megatron.config import Config


def register_schema() -> None:
    ConfigStore.instance().store(name="base", node=Config)


def compose(config_name: str, overrides: list[str]) -> Config:
    """A typed Config from rlv_megatron/conf/<config_name>.yaml and Hydra overrides, outside a Hydra app."""
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    register_schema()
    with initialize_config_dir(config_dir=str(Path(__file__).parent / "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name=config_name, overrides=list(overrides)))


def self_launch_command(environ, gpus: int, argv: list[str], python: str, engine_gpus: int = 0) -> list[str] | None:
    """`python recipes/X.py ...` on a machine with several GPUs and no launcher around it: the torchrun
    command that starts one rank per trainer GPU (all but rollout.engine_gpus) with the same arguments; None
    when already launched (torchrun or Slurm variables present) or with fewer than two GPUs."""
    if gpus < 2 or "RANK" in environ or "SLURM_PROCID" in environ:
        return None
    if engine_gpus >= gpus:
        from rlv_megatron.config import ConfigError

        raise ConfigError(f"rollout.engine_gpus={engine_gpus}: this machine has {gpus} GPUs, none left to train")
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus - engine_gpus}", *argv]


def run_recipe(cfg) -> None:
    """A recipe's body: the typed config -> one RL^V run; global rank 0 prints the metrics path last.
    Started by plain `python` on a multi-GPU node, it re-executes itself under torchrun (one rank per GPU)."""
    import os
    import sys

    import torch
    from omegaconf import OmegaConf

    from rlv_megatron.run import run

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    command = self_launch_command(os.environ, gpus, sys.argv, sys.executable, cfg.rollout.engine_gpus)
    if command is not None:
        print(f"{gpus} GPUs: relaunching as {' '.join(command)}", flush=True)
        os.execv(command[0], command)

    with user_errors_as_one_line():
        path = run(OmegaConf.to_object(cfg))
    if path is not None:
        print(path)


@contextlib.contextmanager
def user_errors_as_one_line(*more: type[BaseException]):
    """A config, data, model or checkpoint error (they name the field or file:line) ends a recipe with one line
    on stderr and exit status 2, as the `rlv` commands do; RLV_TRACEBACK=1 shows the traceback instead. A stop
    the same command resumes from (SIGTERM, the engine dead for good) is one line too, with its own status.
    `more`: further error classes of a command that name the problem (`rlv` wraps every command in this)."""
    import os
    import sys

    from rlv_megatron.assets import AssetError
    from rlv_megatron.config import ConfigError
    from rlv_megatron.models.hf_config import UnsupportedConfig
    from rlv_megatron.rollout.restart import EngineDied
    from rlv_megatron.tasks.math_data import DataError
    from rlv_megatron.train.checkpoint import CheckpointError
    from rlv_megatron.train.preempt import Preempted, PreemptedMidStep

    try:
        yield
    except (ConfigError, DataError, CheckpointError, AssetError, UnsupportedConfig, *more) as e:
        if os.environ.get("RLV_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (EngineDied, Preempted, PreemptedMidStep) as e:  # stops the same command resumes from
        if os.environ.get("RLV_TRACEBACK") == "1" and e.exit_code:
            raise
        print(f"rlv: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
