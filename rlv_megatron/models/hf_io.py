"""Read and write Hugging Face model directories (config.json + safetensors [+ index] + tokenizer files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlv_megatron.atomic import atomic_dir
from rlv_megatron.models import verifier_head
from rlv_megatron.models.convert import iter_hf_tensors, load_hf_into_chunks
from rlv_megatron.models.hf_config import ModelArch, generation_config_from_arch, hf_config_from_arch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class HFCheckpoint:
    """Lazy tensor reader over `model.safetensors` or a sharded `model.safetensors.index.json`."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self._open: dict[str, object] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} not in the checkpoint")
        file = self.weight_map[name]
        if file not in self._open:
            path = self.dir / file
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in the index but missing")
            self._open[file] = safe_open(path, framework="pt")
        return self._open[file].get_tensor(name)


def load_hf_weights(chunks, model_dir: str | Path, arch: ModelArch, padded_vocab: int) -> int:
    """Load a HF directory into this rank's model chunks (each rank reads only the tensors it needs)."""
    from megatron.core import parallel_state as ps

    ckpt = HFCheckpoint(model_dir)
    return load_hf_into_chunks(chunks, ckpt.get, arch, padded_vocab, ps.get_tensor_model_parallel_rank(),
                               ps.get_tensor_model_parallel_world_size())


def write_config(out: Path, arch: ModelArch, dtype: torch.dtype) -> None:
    (out / "config.json").write_text(json.dumps(hf_config_from_arch(arch, _DTYPE_NAMES[dtype]), indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config_from_arch(arch), indent=2))


def copy_tokenizer(src: str | Path | None, out: Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, out / name)


def host_tensors(tensors, dtype: torch.dtype, keep: bool) -> dict[str, torch.Tensor]:
    """Drive `tensors` (HF-named full tensors, gathered one at a time), each cast to `dtype` and copied to host
    memory at once where `keep` (the writing rank), dropped elsewhere: a rank holds at most one full tensor on
    its device, never the whole model (on the writer the whole model is in host memory instead)."""
    out = {}
    for name, t in tensors:
        if keep:
            out[name] = t.to(dtype).to("cpu", copy=True).contiguous()
    return out


def export_hf(chunks, arch: ModelArch, out_dir: str | Path, dtype: torch.dtype | None = None,
              tokenizer_from: str | Path | None = None) -> Path:
    """Write this (possibly TP/PP-sharded) model as a HF directory, atomically. Collective: all ranks call.
    `dtype`: of the written weights; default the model's params_dtype (its training dtype; under bfloat16
    megatron's float32 norm weights are rounded once, as a bfloat16 HF model holds them).

    Each pipeline stage's TP-rank-0 / DP-rank-0 writes one safetensors shard (the last stage also a
    verifier head, models/verifier_head.py); global rank 0 writes the index, config.json and tokenizer
    files, then publishes the directory with one rename. Tensors are gathered over TP one at a time and go
    to host memory on the writer as they come (`host_tensors`); the other TP ranks drop each one, other
    data-parallel replicas gather nothing."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out_dir = Path(out_dir).resolve()
    dtype = chunks[0].config.params_dtype if dtype is None else dtype  # (norm weights stay float32)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    tmp = out_dir.with_name(f".{out_dir.name}.export-tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier()
    tensors = host_tensors(iter_hf_tensors(chunks, arch, ps.get_tensor_model_parallel_group()), dtype, writer) \
        if ps.get_data_parallel_rank() == 0 else {}  # the other replicas hold the same weights: no gather
    file = "model.safetensors" if pp == 1 else f"model-{pp_rank + 1:05d}-of-{pp:05d}.safetensors"
    if writer:
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        head = verifier_head.find(chunks)  # verifier.kind=head: on the last stage
        if head is not None:
            verifier_head.save(head, tmp, dtype)
    mine = {name: file for name in tensors} if writer else {}
    maps = [None] * dist.get_world_size() if distributed else [mine]
    if distributed:
        dist.all_gather_object(maps, mine)
    if rank == 0:
        with atomic_dir(out_dir) as final:
            for f in tmp.iterdir():
                shutil.move(str(f), final / f.name)
            if pp > 1:
                weight_map = {k: v for m in maps for k, v in m.items()}
                total = sum((final / f).stat().st_size for f in set(weight_map.values()))
                (final / "model.safetensors.index.json").write_text(
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
            write_config(final, arch, dtype)
            copy_tokenizer(tokenizer_from, final)
        shutil.rmtree(tmp, ignore_errors=True)
    if distributed:
        dist.barrier()
    return out_dir
