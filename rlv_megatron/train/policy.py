"""The trainable policy: megatron-core GPTModel chunks under megatron DDP, megatron's (distributed) optimizer,
the train step through the pipeline schedules, and HF-format views of the weights for the engine."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from rlv_megatron.config import Config, ConfigError
from rlv_megatron.models import verifier_head
from rlv_megatron.models.builder import build_model, padded_vocab_size, resolve_impl, shares_prompts
from rlv_megatron.models.convert import iter_hf_tensors
from rlv_megatron.models.hf_config import ModelArch, load_arch
from rlv_megatron.models.hf_io import export_hf, load_hf_weights
from rlv_megatron.plan import settle
from rlv_megatron.train import offload
from rlv_megatron.train.heads import FusedSpec, emit_hidden_states
from rlv_megatron.train.host_memory import release_free_memory
from rlv_megatron.train.packing import micro_batches
from rlv_megatron.train.step import Groups, Objective, batch_layout, reduce_stats, run_schedule
from rlv_megatron.train.batch import SequenceBatch


def cpu_threads(setting: int) -> int:
    """train.cpu_threads, where 0 means: OMP_NUM_THREADS when set, else the usable cores shared evenly by
    the ranks on this node (torchrun's LOCAL_WORLD_SIZE)."""
    from rlv_megatron.config import usable_cores

    if setting:
        return setting
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(int(os.environ["OMP_NUM_THREADS"]), 1)
    return max(len(usable_cores()) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


class Policy:
    def __init__(self, cfg: Config, arch: ModelArch | None = None):
        from megatron.core import parallel_state as ps

        from rlv_megatron.config import validate
        from rlv_megatron.dist import init_megatron

        if arch is None:
            if cfg.model.path is None:
                raise ConfigError("model.path: a Hugging Face model directory is required (or pass an arch)")
            arch = load_arch(cfg.model.path)
        validate(cfg, arch)
        if cfg.train.share_prompts and not shares_prompts(cfg.train, resolve_impl(cfg.model)):
            cfg.train.share_prompts = False
            if int(os.environ.get("RANK", "0")) == 0:
                print("rlv: train.share_prompts: off under model.impl=te (TransformerEngine's THD attention has no "
                      "form for a prompt shared by several samples); each sample is trained with its own copy of "
                      "the prompt (the same gradients, more tokens)", file=sys.stderr, flush=True)
        self.plan = settle(cfg, arch)  # train.micro_batch_tokens=auto chosen; a config that cannot fit refused
        if not torch.cuda.is_available():
            torch.set_num_threads(cpu_threads(cfg.train.cpu_threads))
        init_megatron(cfg.parallel, seed=cfg.model.seed)
        self.cfg, self.arch = cfg, arch
        self.model_chunks = build_model(arch, cfg.parallel, cfg.model)
        if cfg.model.path is not None:
            load_hf_weights(self.model_chunks, cfg.model.path, arch,
                            padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by,
                                              cfg.parallel.tp))
        if cfg.verifier.kind == "head":
            verifier_head.attach(self.model_chunks, cfg.model.path)  # before DDP: its buffers include the head
        self.vocab = arch.vocab_size
        self._use_head(self.model_chunks)
        self.groups = Groups.current(cfg.parallel.sequence_parallel, cfg.model.fp8, cfg.model.fp8_recipe)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.chunks = self._wrap_ddp(self.model_chunks)
        self.optimizer = self._make_optimizer(cfg.optim.lr)
        self.reference = None  # frozen chunks for the KL term; see freeze_reference

    def _use_head(self, chunks) -> None:
        if self.cfg.train.logprob_impl == "fused":
            for c in chunks:
                emit_hidden_states(c, FusedSpec(self.cfg.train.logprob_chunk_mb, use_triton=None))

    @property
    def model(self) -> torch.nn.Module:
        """The first (unwrapped) chunk: the whole model when PP = 1."""
        return self.model_chunks[0]

    def _wrap_ddp(self, chunks):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=self.cfg.parallel.distributed_optimizer)
        wrapped = [DistributedDataParallel(c.config, ddp, c, disable_bucketing=i > 0)
                   for i, c in enumerate(chunks)]
        config = chunks[0].config
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        return wrapped

    def _make_optimizer(self, lr: float):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o = self.cfg.optim
        bf16 = self.cfg.model.params_dtype == "bfloat16"
        oc = OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=o.weight_decay,
                             adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip, bf16=bf16,
                             params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             use_distributed_optimizer=self.cfg.parallel.distributed_optimizer)
        opt = get_megatron_optimizer(oc, self.chunks)
        self.chunks[0].config.grad_scale_func = opt.scale_loss
        return opt

    def reset_optimizer(self, lr: float) -> None:
        """Fresh optimizer states (RL after the warm start)."""
        self.optimizer = self._make_optimizer(lr)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def train_step(self, batch: SequenceBatch, objective: Objective, timer=None, outputs: dict | None = None
                   ) -> dict[str, float]:
        """One optimizer step on `batch` (this data-parallel rank's share); returns the mini-batch's summed
        statistics and the grad norm before clipping. `timer(phase)`: a context timing forward_backward and
        optimizer (Metrics.timer). `outputs`: filled with the objective's per-token outputs, [B, L] each."""
        from megatron.core import parallel_state as ps

        mbs = micro_batches(batch, objective.fields, self.cfg.train, self.groups.seq_multiple,
                            min_count=self.groups.pp_size)
        scale = len(mbs) * ps.get_data_parallel_world_size()  # undo megatron's mean over both

        def on_head(head, mb):
            loss, stats, per_token = objective.loss(head, mb)
            if objective.outputs:
                stats = {**stats, **{f"out/{k}": per_token.get(k, torch.zeros_like(mb.tokens, dtype=torch.float32))
                                     for k in objective.outputs}}
            return loss * scale, stats

        offload.ensure_resident(self)  # its state on the GPU again (it was off while the engine was awake)
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        timer = timer or (lambda phase: contextlib.nullcontext())
        with timer("forward_backward"):
            out = run_schedule(self.chunks, mbs, on_head, forward_only=False, vocab=objective.vocab)
        with timer("optimizer"):
            ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped: non-finite gradients")
        if outputs is not None and objective.outputs:
            values = None if out is None else [[o[f"out/{k}"] for k in objective.outputs] for o in out]
            outputs.update(zip(objective.outputs, batch_layout(mbs, values, len(objective.outputs),
                                                               tuple(batch.targets.shape), self.groups.pp)))
        stats = reduce_stats(out, objective.stats, self.groups.dp, self.groups.pp)
        if not torch.cuda.is_available():
            release_free_memory()  # the step's freed activations, kept resident by malloc otherwise
        stats["grad_norm"] = float(grad_norm)
        stats["train/micro_batches"] = float(len(mbs))
        return stats

    def score_yes(self, prompts: list[list[int]], yes_id: int, no_id: int | None = None, batch_size: int = 512
                  ) -> list[float]:
        """The verifier's score of each verification input by this model's own forward, as an engine's
        score_yes: a classification head's sigmoid (verifier.kind=head, which vLLM cannot run), else P("Yes")
        (over {Yes, No} with `no_id`). Collective over the model-parallel group."""
        from rlv_megatron.train.batch import verification_batch
        from rlv_megatron.train.step import score

        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            batch = verification_batch(prompts[i:i + batch_size], yes_id, pad_id=0)
            out += score(self.chunks, batch, self.vocab, 1.0, yes_id, no_id, self.cfg.train, self.groups)[1].tolist()
        return out

    def freeze_reference(self) -> None:
        """Snapshot the current weights as the KL reference (after the warm start; only when kl_beta > 0)."""
        # a second build, not deepcopy: megatron modules hold process groups, which cannot be copied
        self.reference = build_model(self.arch, self.cfg.parallel, self.cfg.model)
        for ref, cur in zip(self.reference, self.model_chunks):
            ref.load_state_dict(cur.state_dict())
            ref.eval().requires_grad_(False)
        self._use_head(self.reference)

    def hf_tensors(self):
        """HF-named full tensors of this rank's pipeline stage(s) (TP shards gathered: collective over TP)."""
        return iter_hf_tensors(self.model_chunks, self.arch, self.tp_group)

    def export(self, out_dir: str | Path, tokenizer=None, dtype=torch.float32) -> Path:
        import tempfile

        with tempfile.TemporaryDirectory() as tok_dir:
            if tokenizer is not None:
                tokenizer.save_pretrained(tok_dir)
            return export_hf(self.model_chunks, self.arch, out_dir, dtype=dtype,
                             tokenizer_from=tok_dir if tokenizer is not None else None)
