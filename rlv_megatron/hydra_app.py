"""Hydra glue: the typed schema as the `base` config, so YAML and CLI overrides are checked against it
(an unknown key or a wrong type fails at start-up naming the field)."""

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


def run_recipe(cfg) -> None:
    """A recipe's body: the typed config -> one RL^V run; global rank 0 prints the metrics path last."""
    from omegaconf import OmegaConf

    from rlv_megatron.run import run

    path = run(OmegaConf.to_object(cfg))
    if path is not None:
        print(path)
