"""The trainable policy: a megatron-core GPTModel, its optimizer, and its HF-format views for the engine."""

from __future__ import annotations

from pathlib import Path

import torch

from rlv_megatron.config import ConfigError, Config
from rlv_megatron.models.builder import build_model, padded_vocab_size
from rlv_megatron.models.convert import iter_hf_tensors
from rlv_megatron.models.hf_config import ModelArch, load_arch
from rlv_megatron.models.hf_io import export_hf, load_hf_weights


class Policy:
    def __init__(self, cfg: Config, arch: ModelArch | None = None):
        from rlv_megatron.config import validate
        from rlv_megatron.dist import init_megatron

        if arch is None:
            if cfg.model.path is None:
                raise ConfigError("model.path: a Hugging Face model directory is required (or pass an arch)")
            arch = load_arch(cfg.model.path)
        validate(cfg, arch)
        if cfg.parallel.tp * cfg.parallel.pp > 1:
            raise ConfigError("parallel.tp/pp > 1: the RL^V trainer runs on one model-parallel rank until the "
                              "parallel trainer lands (issue #4); conversion and sync already support TP/PP")
        init_megatron(cfg.parallel, seed=cfg.model.seed)
        self.cfg, self.arch = cfg, arch
        self.chunks = build_model(arch, cfg.parallel, cfg.model)
        self.model = self.chunks[0]
        if cfg.model.path is not None:
            load_hf_weights(self.chunks, cfg.model.path, arch,
                            padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, 1))
        self.vocab = arch.vocab_size
        self.optimizer = self.make_optimizer(cfg.optim.lr)
        self.reference = None  # frozen copy for the KL term; see freeze_reference

    def freeze_reference(self) -> None:
        """Snapshot the current weights as the KL reference (after the warm start; only when kl_beta > 0)."""
        # a second build, not deepcopy: megatron modules hold process groups, which cannot be copied
        self.reference = build_model(self.arch, self.cfg.parallel, self.cfg.model)[0].eval()
        self.reference.load_state_dict(self.model.state_dict())
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)

    def step(self, loss: torch.Tensor) -> float:
        """Backward, clip, update; returns the grad norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        return float(norm)

    def hf_tensors(self):
        return iter_hf_tensors(self.chunks, self.arch)

    def export(self, out_dir: str | Path, tokenizer=None, dtype=torch.float32) -> Path:
        import tempfile

        with tempfile.TemporaryDirectory() as tok_dir:
            if tokenizer is not None:
                tokenizer.save_pretrained(tok_dir)
            return export_hf(self.chunks, self.arch, out_dir, dtype=dtype,
                             tokenizer_from=tok_dir if tokenizer is not None else None)
