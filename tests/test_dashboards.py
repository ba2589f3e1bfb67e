"""TensorBoard dashboards: throughput numbers from known inputs, the NVML monitor against a stand-in NVML,
and a real TensorBoard server reading back a tiny run's scalars, custom-scalars layout and GPU note."""

import json
import re
import subprocess
import sys
import time
import types
import urllib.parse
import urllib.request

import pytest

from rlv_megatron import dashboards as d


def test_throughput_from_known_inputs():
    # two epochs over 2,000 computed tokens, two scoring forwards over the same tokens
    flops = d.model_flops(params=1_000_000, trained_tokens=2 * 2_000, scored_tokens=2 * 2_000)
    assert flops == 1e6 * 2e3 * (6 * 2 + 2 * 2)
    out = d.throughput(rollout_tokens=5_000, rollout_s=2.0, train_tokens=4_000, train_s=0.5, train_flops=8e12,
                       gpus=4, peak=989.0, sync_gb=3.0, sync_s=1.5)
    assert out == pytest.approx({d.ROLLOUT_TOKENS_PER_S: 2_500.0, d.TRAIN_TOKENS_PER_S: 8_000.0,
                                 d.TFLOPS_PER_GPU: 4.0, d.MFU: 4.0 / 989.0, d.SYNC_GB_PER_S: 2.0})
    # a rank that runs no rollout, an unknown peak (CPU), no bytes synced: those rates are left out
    out = d.throughput(rollout_tokens=5_000, rollout_s=0.0, train_tokens=4_000, train_s=0.5, train_flops=8e12,
                       gpus=1, peak=None, sync_gb=0.0, sync_s=0.0)
    assert out == pytest.approx({d.TRAIN_TOKENS_PER_S: 8_000.0, d.TFLOPS_PER_GPU: 16.0})


def test_peak_tflops_from_plan_devices():
    assert d.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert d.peak_tflops("NVIDIA H200") == 989
    assert d.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert d.peak_tflops("NVIDIA H100 PCIe") is None  # another peak than the SXM part's
    assert d.peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert d.peak_tflops(None) is None  # plan.DEVICES["cpu"] defines no peak: no MFU on CPU


def test_loop_logs_throughput_of_each_step(monkeypatch, tmp_path):
    """train() turns a step's token, byte and phase-time counts into the throughput scalars (rl_step and
    checkpointing stubbed: the wiring only)."""
    from rlv_megatron.config import Config
    from rlv_megatron.dashboards import Metrics
    from rlv_megatron.plan import PRESETS, total_params
    from rlv_megatron.train import loop

    def fake_step(step, policy, engine, task, fmt, cfg, metrics, place, ahead=None, pool=None):
        metrics.times.update(rollout=4.0, reward=0.5, train=2.0, sync=1.0)
        return {"throughput/rollout_tokens": 9_000, "throughput/generated_tokens": 6_000,
                "throughput/sequence_tokens": 10_000, "sync/gb": 1.5, "sync/seconds": 0.75,
                # prompts shared: 8,000 tokens computed per pass, two training passes
                "throughput/trained_tokens": 16_000, "throughput/scored_tokens": 8_000,
                "response/lengths": [3, 5]}

    monkeypatch.setattr(loop, "rl_step", fake_step)
    monkeypatch.setattr(loop.checkpoint, "save", lambda *a, **k: None)
    cfg = Config()
    cfg.train.steps, cfg.algo.ppo_epochs = 2, 2
    arch = PRESETS["qwen2.5-math-7b"]
    policy = types.SimpleNamespace(arch=arch, reference=object(), export=lambda *a, **k: None)
    metrics = Metrics(None)
    loop.train(policy, None, types.SimpleNamespace(tokenizer=None), None, cfg, metrics, tmp_path)
    assert [h["step"] for h in metrics.history] == [0, 1]
    flops = total_params(arch) * 8_000 * (6 * 2 + 2 * 2)  # 2 epochs, scoring with the policy and reference
    expected = {d.ROLLOUT_TOKENS_PER_S: 1_500.0, d.TRAIN_TOKENS_PER_S: 10_000.0, d.SYNC_GB_PER_S: 2.0,
                d.TFLOPS_PER_GPU: flops / 2.0 / 1e12, "time/train": 2.0}
    assert {k: metrics.history[-1][k] for k in expected} == pytest.approx(expected)
    assert (d.MFU in metrics.history[-1]) == (d.peak_tflops(None) is not None)  # no CPU peak in plan.DEVICES
    last = metrics.history[-1]  # peers' rates, over the wall-clock step
    assert last[d.COMPLETION_TOKENS_PER_S] == pytest.approx(6_000 / last[d.STEP_SECONDS])
    assert last[d.TOKENS_PER_S] == pytest.approx(9_000 / last[d.STEP_SECONDS])
    assert "response/lengths" not in last  # a histogram, not a scalar


def _fake_nvml(utils, used_gib, fail_init=False):
    class NVMLError(Exception):
        pass

    state = {"i": 0}

    def util(h):
        v = utils[h][min(state["i"], len(utils[h]) - 1)]
        return types.SimpleNamespace(gpu=v)

    def memory(h):
        return types.SimpleNamespace(used=int(used_gib[h][min(state["i"], len(used_gib[h]) - 1)] * 2**30))

    def init():
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    return types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: len(utils),
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUtilizationRates=util, nvmlDeviceGetMemoryInfo=memory), state


def test_gpu_monitor_mean_utilisation_and_peak_memory(monkeypatch):
    nvml, state = _fake_nvml(utils=[[100, 50], [60, 10]], used_gib=[[10, 30], [20, 5]])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monitor, note = d.open_gpu_monitor(interval_s=3600)  # the thread never samples: read() does
    assert note == "2 x NVIDIA H100 80GB HBM3"
    try:
        monitor._sample()  # devices at 100% and 60%, 10 and 20 GiB used
        state["i"] = 1
        assert monitor.read() == pytest.approx({d.GPU_UTIL: (80 + 30) / 2, d.GPU_MEMORY: 30.0})
        assert monitor.read() == pytest.approx({d.GPU_UTIL: 30.0, d.GPU_MEMORY: 30.0})  # reset by the read
    finally:
        monitor.close()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monitor, note = d.open_gpu_monitor(interval_s=3600)
    try:
        assert monitor.handles == [1] and note == "1 x NVIDIA H100 80GB HBM3"
    finally:
        monitor.close()


def test_no_gpu_note_without_nvml(monkeypatch, tmp_path):
    nvml, _ = _fake_nvml([[0]], [[0]], fail_init=True)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert d.open_gpu_monitor() == (None, "no GPU (NVMLError: NVML Shared Library Not Found)")
    from rlv_megatron.dashboards import Metrics

    m = Metrics(str(tmp_path / "tb"))
    try:
        assert m.gpu is None and m.gpu_note.startswith("no GPU")
        assert not any(k.startswith("gpu/") for k in m.log(0, {"reward/mean": 0.5}))
    finally:
        m.close()


def _tiny_run(logdir) -> tuple[dict, str, bool]:
    """Three steps of the scalars the loop logs (throughput through the real helpers) and one evaluation;
    returns {tag: {step: value}} as written, the Metrics' GPU note and whether it found a GPU."""
    from rlv_megatron.dashboards import Metrics

    metrics = Metrics(str(logdir))
    written: dict = {}
    try:
        for step in range(3):
            for phase, seconds in (("rollout", 2.0 + step), ("reward", 0.1), ("train", 1.0 + step / 4),
                                   ("sync", 0.25)):
                metrics.times[phase] = seconds
            tokens = 3_000 + 100 * step
            values = {"reward/mean": 0.2 + 0.1 * step, "verifier/auc_pooled": 0.6 + 0.05 * step,
                      "verifier/auc_within_prompt": 0.55 + 0.05 * step, "sync/seconds": 0.2, "sync/gb": 0.4,
                      "throughput/generated_tokens": 2_000 + 50 * step, "throughput/sequence_tokens": tokens}
            values.update(d.throughput(
                rollout_tokens=values["throughput/generated_tokens"], rollout_s=metrics.times["rollout"],
                train_tokens=tokens, train_s=metrics.times["train"], gpus=1, peak=989.0,
                train_flops=d.model_flops(800_000, tokens, tokens), sync_gb=0.4, sync_s=0.2,
                step_s=sum(metrics.times.values()), step_tokens=tokens + 500))
            for k, v in metrics.log(step, values).items():
                written.setdefault(k, {})[step] = v
        ks = (1, 2, 4)
        evals = {**{f"eval/weighted@{k}": 0.3 + 0.05 * k for k in ks},
                 **{f"eval/majority@{k}": 0.3 + 0.03 * k for k in ks},
                 **{f"eval/pass@{k}": 0.25 + 0.1 * k for k in ks}, "eval/weighted_likelihood@4": 0.4,
                 "eval/verifier_auc_within_prompt": 0.7, "eval/verifier_auc_pooled": 0.75}
        metrics.times["eval"] = 5.0
        for k, v in metrics.log(2, evals).items():
            written.setdefault(k, {})[2] = v
        return written, metrics.gpu_note, metrics.gpu is not None
    finally:
        metrics.close()


def _get(port: int, route: str, **params):
    url = f"http://127.0.0.1:{port}{route}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_serves_the_run_scalars_and_layout(tmp_path):
    from rlv_megatron.dist import free_port

    logdir = tmp_path / "tb"
    written, note, has_gpu = _tiny_run(logdir)
    port = free_port()
    log = open(tmp_path / "tensorboard.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                             "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, tags = time.monotonic() + 60, {}
        while not set(written) <= set(tags):  # the server answers, then loads the event file in a thread
            assert proc.poll() is None, (tmp_path / "tensorboard.log").read_text()
            assert time.monotonic() < deadline, f"tensorboard served {sorted(tags)} after 60 s"
            time.sleep(0.5)
            try:
                tags = _get(port, "/data/plugin/scalars/tags").get(".", {})
            except OSError:  # not listening yet (URLError, connection reset, timeout)
                pass
        for tag, by_step in written.items():  # (wall time, step, value) per point, values stored as float32
            points = _get(port, "/data/plugin/scalars/scalars", run=".", tag=tag)
            assert {s: v for _, s, v in points} == pytest.approx(by_step, rel=1e-6), tag

        layout = _get(port, "/data/plugin/custom_scalars/layout")
        charts = {c["title"]: {ch["title"]: ch["multiline"]["tag"] for ch in c["chart"]} for c in layout["category"]}
        assert charts == {cat: {t: spec[1] for t, spec in ch.items()} for cat, ch in d.layout().items()}
        assert set(charts) == {"throughput", "RL^V quality"}
        for cat in charts.values():  # every chart shows something (GPU charts only where NVML sees a GPU)
            for title, regexes in cat.items():
                if title.startswith("GPU") and not has_gpu:
                    continue
                assert any(re.match(r, t) for r in regexes for t in written), title
        vs = _get(port, "/data/plugin/custom_scalars/scalars", run=".",
                  tag=charts["RL^V quality"]["eval: weighted@k vs majority@k"][0])
        assert sorted(vs["tag_to_events"]) == ["eval/weighted@1", "eval/weighted@2", "eval/weighted@4"]
        time_tags = _get(port, "/data/plugin/custom_scalars/scalars", run=".", tag=r"time/")["tag_to_events"]
        assert sorted(time_tags) == ["time/eval", "time/reward", "time/rollout", "time/step", "time/sync",
                                    "time/train"]

        text = _get(port, "/data/plugin/text/text", run=".", tag="gpu/text_summary")  # torch appends /text_summary
        assert note.split(" (")[0] in text[0]["text"]
        assert has_gpu or note.startswith("no GPU")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
