"""Methods added to every vLLM worker (`worker_extension_cls`), called by name through collective_rpc.

A weight update is three calls, so buckets stream through bounded memory:
  rlv_begin_update()            vLLM's layerwise reload: layers go back to checkpoint format
  rlv_load_bucket(handle, m)    model.load_weights over views of the shared bucket
  rlv_finish_update()           layers not yet processed are processed (e.g. CPU prepacking)
A layer is re-processed as soon as all of its weights arrived. Layers that never complete during loading
(vocab-padded embeddings: fewer elements arrive than the kernel tensor holds) are processed in the finish
call from references vLLM kept to the bucket's views; those are copied out before the buffer is reused.
"""

from __future__ import annotations

import torch

from rlv_megatron.rollout import transport


class WeightSyncExtension:
    def _rlv_model(self):
        return self.model_runner.get_model()

    def rlv_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self._rlv_model())
        self._rlv_loaded: set[str] = set()
        self._rlv_expected = {n for n, _ in self._rlv_model().named_parameters()}

    def _rlv_buffer(self, handle: dict) -> torch.Tensor:
        if handle["kind"] == "shm":
            if not hasattr(self, "_rlv_shm"):
                self._rlv_shm = transport.ShmReader()
            return self._rlv_shm.open(handle)
        if handle["kind"] == "cuda_ipc":
            return transport.open_cuda_ipc(handle, torch.cuda.current_device())
        raise ValueError(f"unknown weight transport {handle['kind']!r}")

    @torch.no_grad()
    def rlv_load_bucket(self, handle: dict, manifest: list) -> int:
        from vllm.config import set_current_vllm_config

        buf = self._rlv_buffer(handle)
        with set_current_vllm_config(self.vllm_config):
            loaded = self._rlv_model().load_weights(transport.unpack(buf, manifest))
        self._rlv_loaded |= set(loaded or ())
        self._rlv_detach_pending(buf)
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
        missing = sorted(self._rlv_expected - self._rlv_loaded)
        del self._rlv_loaded, self._rlv_expected
        return missing
