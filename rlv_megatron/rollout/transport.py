"""Moving HF-named tensors from the trainer into the engine's worker process, in bounded buckets.

A bucket is a flat byte buffer plus a manifest of (name, dtype, shape, offset). Only the manifest and a
handle travel through vLLM's RPC (msgpack-safe primitives: no pickled functions, no tensors as arguments,
which arrive mangled). The bytes travel by
  - `shm`: a file under /dev/shm that both processes map (CPU, or GPU without IPC),
  - `cuda_ipc`: a CUDA buffer shared by an IPC handle (GPU only; no host round trip).
The same manifest format is used by both; the worker side is `unpack`.
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

ALIGN = 64
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16,
                                                     torch.float64, torch.int64, torch.int32, torch.uint8)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


_DECODER_LAYER = re.compile(r"^(.*?layers\.\d+)\.")


def decoder_layer(name: str) -> str:
    """The group a tensor must travel with: its decoder layer (model.layers.N), else itself."""
    m = _DECODER_LAYER.match(name)
    return m.group(1) if m else name


def plan_buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 group_of: Callable[[str], str] = decoder_layer, dtype: torch.dtype | None = None
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of tensors into buckets of at most `bucket_bytes`; a group (a decoder layer) is never
    split, and a group bigger than a bucket travels alone.

    Why whole layers: vLLM re-processes a layer only once all its weights arrived and meanwhile keeps
    references to the ones that did; a reused bucket buffer would overwrite them."""
    bucket, size = [], 0
    for _, group in itertools.groupby(tensors, key=lambda item: group_of(item[0])):
        group = list(group)
        n = bucket_nbytes(group, dtype)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(group)
        size += n
    if bucket:
        yield bucket


def nbytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    return t.numel() * (t.element_size() if dtype is None else dtype.itemsize)


def pack(bucket: list[tuple[str, torch.Tensor]], buf: torch.Tensor, dtype: torch.dtype | None = None) -> list[list]:
    """Copy tensors into the uint8 buffer `buf`, cast to `dtype` on the way (one pass, no intermediate);
    return the manifest [[name, dtype, shape, offset], ...]."""
    manifest, off = [], 0
    for name, t in bucket:
        dt = t.dtype if dtype is None else dtype
        n = nbytes(t, dt)
        buf[off:off + n].view(dt).view(t.shape).copy_(t)
        manifest.append([name, dtype_name(dt), list(t.shape), off])
        off += _aligned(n)
    return manifest


def unpack(buf: torch.Tensor, manifest: list[list]) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into `buf` (no copy) for each manifest entry."""
    for name, dtype, shape, off in manifest:
        dt = _DTYPES[dtype]
        numel = 1
        for s in shape:
            numel *= s
        n = numel * dt.itemsize
        yield name, buf[off:off + n].view(dt).view(shape)


def bucket_nbytes(bucket: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> int:
    return sum(_aligned(nbytes(t, dtype)) for _, t in bucket)


# ---- shm ------------------------------------------------------------------------------------------

class ShmBuffer:
    """A file in /dev/shm mapped in both processes; grows when a bucket needs more room. Its owner holds an
    exclusive flock on it, so the files of owners that were killed (SIGKILL leaves them) can be told apart
    from live ones, whatever PID namespace they ran in, and removed: `remove_orphans`, at each creation.
    Mapped by path (the worker opens it by name), so it cannot be unlinked while in use."""

    def __init__(self, directory: str = "/dev/shm", nbytes: int = 0):
        remove_orphans(directory)
        name = f"rlv-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = Path(directory) / name
        locking = Path(directory) / f".{name}"  # no orphan's name: created and locked first, then renamed
        self._lock = open(locking, "a+b")  # noqa: SIM115: held (with its flock) until close()
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        locking.rename(self.path)
        self.nbytes = 0
        self.tensor = torch.empty(0, dtype=torch.uint8)  # host: /dev/shm pages
        self.ensure(nbytes)

    def ensure(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.nbytes:
            self.nbytes = _aligned(nbytes)
            # shared=True: MAP_SHARED, so the worker sees exactly these pages
            self.tensor = torch.from_file(str(self.path), shared=True, size=self.nbytes, dtype=torch.uint8)
        return self.tensor

    def handle(self) -> dict:
        return {"kind": "shm", "path": str(self.path), "nbytes": self.nbytes}

    def close(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8)  # host
        self.path.unlink(missing_ok=True)
        self._lock.close()


def remove_orphans(directory: str) -> list[Path]:
    """Delete the weight buffers in `directory` that no process holds (their owner was killed)."""
    removed = []
    for path in Path(directory).glob("rlv-weights-*"):
        try:
            with open(path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its owner lives
                path.unlink()
                removed.append(path)
        except OSError:  # held, or gone meanwhile
            continue
    return removed


class ShmReader:
    """Worker side: map the trainer's file read-only-in-spirit (copy happens in load_weights)."""

    def __init__(self):
        self._maps: dict[str, tuple[int, mmap.mmap, torch.Tensor]] = {}

    def open(self, handle: dict) -> torch.Tensor:
        path, nbytes = handle["path"], handle["nbytes"]
        cached = self._maps.get(path)
        if cached is None or cached[0] < nbytes:
            with open(path, "r+b") as f:
                mm = mmap.mmap(f.fileno(), nbytes)
            self._maps[path] = (nbytes, mm, torch.frombuffer(mm, dtype=torch.uint8))
        return self._maps[path][2][:nbytes]


# ---- CUDA IPC (GPU only) --------------------------------------------------------------------------

@dataclass
class CudaIpcBuffer:
    tensor: torch.Tensor

    @classmethod
    def allocate(cls, nbytes: int) -> "CudaIpcBuffer":
        return cls(torch.empty(_aligned(nbytes), dtype=torch.uint8, device="cuda"))

    def ensure(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.tensor.numel():
            self.tensor = torch.empty(_aligned(nbytes), dtype=torch.uint8, device="cuda")
        return self.tensor

    def handle(self) -> dict:
        from torch.multiprocessing.reductions import reduce_tensor

        torch.cuda.synchronize()  # the packing copies must land before the worker reads
        _rebuild, args = reduce_tensor(self.tensor)
        return {"kind": "cuda_ipc", "args": encode_ipc_args(args), "device_uuid": str(
            torch.cuda.get_device_properties(self.tensor.device).uuid)}

    def close(self) -> None:
        self.tensor = torch.empty(0)  # host: drops the GPU buffer


def encode_ipc_args(args: tuple) -> list:
    """reduce_tensor's rebuild args -> msgpack-safe primitives (classes and dtypes by name)."""
    out = []
    for a in args:
        if isinstance(a, torch.dtype):
            out.append({"dtype": dtype_name(a)})
        elif isinstance(a, type):
            out.append({"type": f"{a.__module__}.{a.__qualname__}"})
        elif isinstance(a, torch.Size):
            out.append(list(a))
        else:
            out.append(a)
    return out


def decode_ipc_args(encoded: list, device_index: int) -> tuple:
    """Inverse of encode_ipc_args; the device slot is remapped to the worker's own index."""
    import importlib

    args = []
    for a in encoded:
        if isinstance(a, dict) and "dtype" in a:
            args.append(_DTYPES[a["dtype"]])
        elif isinstance(a, dict) and "type" in a:
            module, _, qual = a["type"].rpartition(".")
            args.append(getattr(importlib.import_module(module), qual))
        else:
            args.append(a)
    args[6] = device_index  # storage_device: the sender's index means nothing in this process
    return tuple(args)


def visible_gpu_uuids() -> list[str]:
    """This process's GPUs by local index, as physical identities (CUDA_VISIBLE_DEVICES renumbers them)."""
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def ipc_device_index(handle: dict, visible_uuids: list[str]) -> int:
    """This process's index of the GPU a CUDA-IPC buffer lives on (its uuid travels with the handle: the
    sender's own index means nothing under another CUDA_VISIBLE_DEVICES)."""
    uuid = handle["device_uuid"]
    if uuid not in visible_uuids:
        raise RuntimeError(f"the weight buffer lives on GPU {uuid}, which this engine worker cannot see (it sees "
                           f"{visible_uuids or 'no GPU'}): CUDA IPC needs the trainer's GPU among the engine's "
                           "(colocated engines); use rollout.transport=shm")
    return visible_uuids.index(uuid)


def on_device(t: torch.Tensor, index: int) -> torch.Tensor:
    """`t` on this process's GPU `index`: an engine worker whose GPU is not the buffer's (rollout TP > 1) makes
    one device-to-device copy of the bucket, so that every weight loader meets tensors on its own device."""
    return t.to(torch.device("cuda", index)) if t.is_cuda and t.device.index != index else t


def synchronize_reads(*tensors: torch.Tensor) -> None:
    """Wait for the work this process queued on the GPUs of `tensors` and on its current GPU (a cross-device
    copy runs on the source GPU's stream), so that their memory may be overwritten by another process."""
    for index in sorted({t.device.index for t in tensors if t.is_cuda} | {torch.cuda.current_device()}):
        torch.cuda.synchronize(index)


def open_cuda_ipc(handle: dict, device_index: int | None = None) -> torch.Tensor:
    """The buffer of `handle`, mapped on the GPU it was sent from (`device_index`: that GPU's index here,
    found by its uuid when None)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if device_index is None:
        device_index = ipc_device_index(handle, visible_gpu_uuids())
    return rebuild_cuda_tensor(*decode_ipc_args(handle["args"], device_index))
