"""Weight-sync transport: buckets, packing, the shared-memory mapping, IPC handle encoding."""

import torch

from rlv_megatron.rollout import transport


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [("a", torch.randn(10, 7, generator=g)), ("b", torch.randn(3, generator=g).to(torch.bfloat16)),
            ("c", torch.randn(100, 50, generator=g)), ("d", torch.arange(5)), ("e", torch.randn(2, 2, generator=g))]


def test_buckets_respect_the_size_and_keep_order():
    tensors = _tensors()
    buckets = list(transport.plan_buckets(tensors, bucket_bytes=1024))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    for b in buckets:
        assert len(b) == 1 or transport.bucket_nbytes(b) <= 1024
    assert any(len(b) == 1 and transport.bucket_nbytes(b) > 1024 for b in buckets)  # "c" goes alone


def test_buckets_never_split_a_decoder_layer():
    layer = lambda i: [(f"model.layers.{i}.{w}", torch.zeros(64)) for w in ("q", "k", "v")]  # noqa: E731
    tensors = [("model.embed_tokens.weight", torch.zeros(64))] + layer(0) + layer(1) + [("model.norm.weight", torch.zeros(64))]
    buckets = list(transport.plan_buckets(tensors, bucket_bytes=2 * 256))
    for b in buckets:
        for i in (0, 1):
            names = {n for n, _ in b if n.startswith(f"model.layers.{i}.")}
            assert names in (set(), {f"model.layers.{i}.{w}" for w in "qkv"})
    assert len(buckets) == 4 and sum(len(b) for b in buckets) == len(tensors)


def test_pack_unpack_roundtrip_exact_across_dtypes():
    tensors = _tensors()
    buf = torch.empty(transport.bucket_nbytes(tensors), dtype=torch.uint8)
    manifest = transport.pack(tensors, buf)
    assert all(entry[3] % transport.ALIGN == 0 for entry in manifest)
    out = dict(transport.unpack(buf, manifest))
    for name, t in tensors:
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)


def test_shm_buffer_is_seen_through_an_independent_mapping(tmp_path):
    tensors = _tensors()
    writer = transport.ShmBuffer(str(tmp_path), 16)
    try:
        buf = writer.ensure(transport.bucket_nbytes(tensors))  # grows past its first size
        manifest = transport.pack(tensors, buf)
        reader = transport.ShmReader()
        out = dict(transport.unpack(reader.open(writer.handle()), manifest))
        for name, t in tensors:
            assert torch.equal(out[name], t)
        # the next bucket reuses the file; the reader's mapping sees the new bytes
        transport.pack([("a", torch.zeros(10, 7))], buf)
        assert torch.equal(dict(transport.unpack(reader.open(writer.handle()), manifest[:1]))["a"], torch.zeros(10, 7))
    finally:
        writer.close()
    assert not writer.path.exists()


def test_ipc_args_encode_to_primitives_and_back():
    # the shape of torch's CUDA rebuild args: (cls, size, stride, offset, storage_cls, dtype, device, handle, ...)
    args = (torch.Tensor, torch.Size([4]), (1,), 0, torch.UntypedStorage, torch.bfloat16, 3, b"\x01handle", 8,
            0, False, b"ref", 0, b"event", True)
    encoded = transport.encode_ipc_args(args)
    assert all(isinstance(a, (int, bool, bytes, list, dict, tuple)) for a in encoded)
    decoded = transport.decode_ipc_args(encoded, device_index=0)
    assert decoded[0] is torch.Tensor and decoded[4] is torch.UntypedStorage and decoded[5] is torch.bfloat16
    assert decoded[6] == 0 and decoded[7] == b"\x01handle" and list(decoded[1]) == [4]


def test_buffers_of_killed_owners_are_removed_live_ones_kept(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    live = transport.ShmBuffer(str(tmp_path), 64)
    code = (f"import os, signal; from rlv_megatron.rollout.transport import ShmBuffer; "
            f"b = ShmBuffer({str(tmp_path)!r}, 64); print(b.path, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    orphan = Path(done.stdout.strip())
    assert orphan.exists() and live.path.exists()  # SIGKILL runs no cleanup
    assert transport.remove_orphans(str(tmp_path)) == [orphan]
    assert live.path.exists()
    live.close()
    assert not live.path.exists()
