"""Hydra glue: the typed schema as the `base` config, so YAML and CLI overrides are checked against it
(an unknown key or a wrong type fails at start-up naming the field)."""

from hydra.core.config_store import ConfigStore

from rlv_megatron.config import Config


def register_schema() -> None:
    ConfigStore.instance().store(name="base", node=Config)
