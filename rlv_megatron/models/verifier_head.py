"""The classification-head verifier (verifier.kind=head), the discriminative baseline of RL^V's generative one.

A linear layer [hidden -> 1] on the final hidden state at the verification position (where the generative
verifier reads its Yes/No token), trained with binary cross-entropy on the same examples and weights
(train/step.py); its score is the sigmoid. It is the `verifier_head` child of the last pipeline stage's
GPTModel, so megatron's DDP, optimizer and distributed checkpoint carry it like any replicated parameter. An
exported model carries it as `verifier_head.pt` beside the Hugging Face files (a .pt file: vLLM and
transformers load every *.safetensors of a directory, and know no such weight). vLLM cannot run it, so
pools are scored by the trainer's own forward (train/step.py: PolicyScorer).
"""

from __future__ import annotations

from pathlib import Path

import torch

HEAD_FILE = "verifier_head.pt"


def attach(chunks: list[torch.nn.Module], model_dir: str | Path | None = None) -> None:
    """Give the last stage's GPTModel a verifier head: the one saved in `model_dir` when there is one, else a
    zero one (score 0.5 everywhere until it trains)."""
    saved = Path(model_dir) / HEAD_FILE if model_dir is not None else None
    for gpt in chunks:
        if not gpt.post_process:
            continue
        cfg = gpt.config
        head = torch.nn.Linear(cfg.hidden_size, 1, dtype=cfg.params_dtype, device=gpt.output_layer.weight.device)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        if saved is not None and saved.is_file():
            state = torch.load(saved, map_location="cpu", weights_only=True)
            if tuple(state["weight"].shape) != tuple(head.weight.shape):
                raise ValueError(f"{saved}: a head for hidden size {state['weight'].shape[1]}, the model has "
                                 f"{cfg.hidden_size}")
            head.load_state_dict({k: v.to(cfg.params_dtype) for k, v in state.items()})
        gpt.verifier_head = head


def find(chunks: list[torch.nn.Module]) -> torch.nn.Module | None:
    """This rank's verifier head (the last pipeline stage holds it), or None."""
    for c in chunks:
        while hasattr(c, "module"):  # megatron's DDP wrapper
            c = c.module
        if getattr(c, "verifier_head", None) is not None:
            return c.verifier_head
    return None


def logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[n] logits of P(correct) from hidden states [n, H], in fp32."""
    return torch.nn.functional.linear(hidden.float(), head.weight.float(), head.bias.float())[:, 0]


def save(head: torch.nn.Module, out_dir: Path, dtype: torch.dtype) -> None:
    torch.save({k: v.detach().to("cpu", dtype).clone() for k, v in head.state_dict().items()}, out_dir / HEAD_FILE)
