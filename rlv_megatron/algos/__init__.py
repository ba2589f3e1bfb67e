"""Value-free RL: advantage estimators and policy losses (registries)."""
