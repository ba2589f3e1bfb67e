"""Training: the RL^V step, the SFT warm start, the loop."""
