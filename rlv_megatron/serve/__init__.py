"""`rlv serve`: the reasoner-verifier behind an OpenAI-compatible API, answering with its own verifier."""
