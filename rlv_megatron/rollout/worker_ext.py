"""Methods added to every vLLM worker (`worker_extension_cls`), called by name through collective_rpc.

`rlv_process()` says where a rank runs. A weight update is three calls, so buckets stream through bounded memory:
  rlv_begin_update()            vLLM's layerwise reload: layers go back to checkpoint format
  rlv_load_bucket(handle, m)    model.load_weights over views of the shared bucket (CUDA IPC: mapped on the GPU it
                                was sent from, by uuid; the reads finished before it returns)
  rlv_finish_update()           layers not yet processed are processed (e.g. CPU prepacking)
A layer is re-processed as soon as all of its weights arrived. Layers that never complete during loading
(vocab-padded embeddings: fewer elements arrive than the kernel tensor holds) are processed in the finish
call from references vLLM kept to the bucket's views; those are copied out before the buffer is reused.
"""

from __future__ import annotations

import torch

from rlv_megatron.rollout import transport


class WeightSyncExtension:
    def rlv_process(self) -> dict:
        """Where this rank runs: its process and its intra-op thread count (rollout/cpu_executor.py)."""
        import os

        return {"pid": os.getpid(), "threads": torch.get_num_threads()}

    def _rlv_model(self):
        return self.model_runner.get_model()

    def rlv_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        # before the reload splits tied parameters (lm_head/embed_tokens) into per-layer placeholders
        self._rlv_expected = {n for n, _ in self._rlv_model().named_parameters()}
        self._rlv_loaded: set[str] = set()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._rlv_model())

    def _rlv_buffer(self, handle: dict) -> torch.Tensor:
        if handle["kind"] == "shm":
            if not hasattr(self, "_rlv_shm"):
                self._rlv_shm = transport.ShmReader()
            return self._rlv_shm.open(handle)
        if handle["kind"] == "cuda_ipc":  # on the trainer's GPU (one of the engine's): found by its uuid
            self._rlv_sent = transport.open_cuda_ipc(handle)
            return transport.on_device(self._rlv_sent, torch.cuda.current_device())
        raise ValueError(f"unknown weight transport {handle['kind']!r}")

    @torch.no_grad()
    def rlv_load_bucket(self, handle: dict, manifest: list) -> int:
        from vllm.config import set_current_vllm_config

        buf = self._rlv_buffer(handle)
        with set_current_vllm_config(self.vllm_config):
            loaded = self._rlv_model().load_weights(transport.unpack(buf, manifest))
        self._rlv_loaded |= set(loaded or ())
        self._rlv_detach_pending(buf)
        if handle["kind"] == "cuda_ipc":
            # the copies out of the trainer's buffer are queued, not done: the trainer packs the next bucket into
            # it as soon as this call returns (vLLM's RLHF example synchronizes here too)
            transport.synchronize_reads(self._rlv_sent, buf)
        return len(manifest)

    def _rlv_detach_pending(self, buf: torch.Tensor) -> None:
        """Clone the tensors that vLLM still holds for not-yet-processed layers if they view `buf`."""
        from vllm.model_executor.model_loader.reload import layerwise

        storage = buf.untyped_storage().data_ptr()
        for layer in self._rlv_model().modules():
            info = layerwise.LAYERWISE_INFO.get(layer)
            for _name, bound in (info.loaded_weights if info is not None else ()):
                for key, value in bound.arguments.items():
                    if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == storage:
                        bound.arguments[key] = value.clone()

    def rlv_finish_update(self) -> list[str]:
        """Finish the reload; return the parameters that no bucket provided (empty when all did)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self._rlv_model(), self.vllm_config.model_config)
            self._rlv_reprocess_tied()
        missing = sorted(self._rlv_expected - self._rlv_loaded)
        del self._rlv_loaded, self._rlv_expected
        return missing

    def _rlv_reprocess_tied(self) -> None:
        """A tied lm_head receives no weights of its own, so the reload never re-processes it; on CPU its
        prepacked GEMM would keep the old embedding. Re-process every module that shares a parameter."""
        owners: dict[int, list] = {}
        for module in self._rlv_model().modules():
            if getattr(module, "quant_method", None) is None:
                continue
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(module)
        for modules in owners.values():
            if len(modules) > 1:
                for module in modules:
                    module.quant_method.process_weights_after_loading(module)
