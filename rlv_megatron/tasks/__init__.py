"""Tasks: prompts, answers and graders (registry)."""
