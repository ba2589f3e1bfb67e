"""`rlv serve` live: a briefly warm-started tiny model behind the server on localhost, called with the official
`openai` client: every strategy, adaptive stopping, seeds, 8 concurrent clients, errors, /metrics, the engine
killed (503) and SIGTERM leaving no process behind."""

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from chaos import ShmWatch, leftovers, shm  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = ["10,13,5,1:15", "3,9,4,12:16", "7,2,11,6:13", "14,5,8,3:22", "6,1,9,15:10", "12,4,2,7:19",
            "5,11,3,8:16", "9,6,13,2:15"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny recipe's warm start after 50 SFT steps (enough to write answers in the task's format; 20 are not)."""
    out = tmp_path_factory.mktemp("sft")
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "tiny_cpu.py"), f"train.out_dir={out}",
                           "sft.steps=50", "sft.warmup_steps=5", "train.steps=0", "eval.final=false",
                           "train.resume=false"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "start"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def server(model_dir):
    import httpx

    port = free_port()
    before = shm()
    proc = subprocess.Popen([sys.executable, "-m", "rlv_megatron.cli", "serve", str(model_dir), "--config-name",
                             "tiny_cpu", "--port", str(port), "serve.model_name=tiny", "serve.batch_wait_s=0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: what it leaves is findable
    proc.shm_watch = ShmWatch(proc.pid, before)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the server did not come up:\n{proc.stdout.read()[-3000:]}")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=120)


def ask(client, problem, **extra):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": problem}],
                                       seed=extra.pop("seed", 7), extra_body=extra)
    return r, r.model_extra["rlv"]


def test_models_and_every_strategy(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for strategy in ("single", "majority", "weighted", "best_of"):
        r, rlv = ask(client, PROBLEMS[0], strategy=strategy, n=8)
        assert rlv["strategy"] == strategy and rlv["samples"] == (1 if strategy == "single" else 8)
        answers, scores = rlv["sample_answers"], rlv["sample_scores"]
        assert len(answers) == len(scores) == rlv["samples"] == rlv["verifier_calls"]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert r.choices[0].message.content  # the chosen sample's full solution
        if strategy == "single":
            assert rlv["answer"] == answers[0] and rlv["confidence"] == pytest.approx(scores[0])
            continue
        # the reply's votes recomputed from its own samples (subset-sum answers are canonical strings)
        votes = {}
        for a, s in zip(answers, scores):
            if a is not None:
                votes.setdefault(a, []).append(s)
        weight = {"majority": len, "weighted": sum, "best_of": max}[strategy]
        expected = {a: weight(s) for a, s in votes.items()}
        assert {row["answer"]: row["weight"] for row in rlv["answers"]} == pytest.approx(expected)
        assert rlv["answer"] == rlv["answers"][0]["answer"]
        assert expected[rlv["answer"]] == pytest.approx(max(expected.values()))
        assert rlv["score"] == pytest.approx(max(votes[rlv["answer"]]))


def test_adaptive_stops_by_confidence(client):
    low, rlv_low = ask(client, PROBLEMS[1], adaptive=True, n=4, round_size=4, max_samples=16, min_confidence=0.01)
    assert rlv_low["samples"] == 4 and rlv_low["rounds"] == 1  # the first round's winner clears 0.01
    for problem in PROBLEMS[:4]:
        _, rlv = ask(client, problem, adaptive=True, n=4, round_size=4, max_samples=16, min_confidence=0.9)
        _, fixed = ask(client, problem, n=16)  # sample j is seeded seed + j: adaptive draws fixed n's first ones
        assert rlv["sample_answers"] == fixed["sample_answers"][:rlv["samples"]]
        assert rlv["samples"] == 4 * rlv["rounds"] and rlv["samples"] <= 16
        assert rlv["samples"] == 16 or rlv["confidence"] >= 0.9  # stopped early only once confident
        total = sum(s for a, s in zip(rlv["sample_answers"], rlv["sample_scores"]) if a is not None)
        if rlv["answer"] is not None:
            assert rlv["confidence"] == pytest.approx(rlv["answers"][0]["weight"] / total)


def test_seeded_and_reproducible_under_concurrency(client):
    """8 clients at once: every reply equals the same request made alone (samples seeded per request)."""
    alone = {i: ask(client, p, seed=100 + i, n=6)[1] for i, p in enumerate(PROBLEMS)}
    together, errors = {}, []

    def call(i):
        try:
            together[i] = ask(client, PROBLEMS[i], seed=100 + i, n=6)[1]
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROBLEMS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(together) == len(PROBLEMS)
    for i in alone:
        assert together[i]["sample_answers"] == alone[i]["sample_answers"]
        assert together[i]["sample_scores"] == pytest.approx(alone[i]["sample_scores"], abs=1e-6)


def test_completions_route(client):
    r = client.completions.create(model="tiny", prompt=PROBLEMS[2], seed=3, max_tokens=20,
                                  extra_body={"strategy": "majority", "n": 4})
    assert r.object == "text_completion" and r.model_extra["rlv"]["samples"] == 4
    assert r.choices[0].text and 0 < r.usage.completion_tokens <= 4 * 20


def test_errors_name_the_field(client):
    import openai

    for extra, field in (({"strategy": "vote"}, "strategy"), ({"n": 0}, "n"), ({"min_confidence": 2}, "min_confidence"),
                         ({"max_tokens": 10_000}, "max_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, PROBLEMS[0], **extra)
        assert e.value.status_code == 400 and e.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "1," * 200 + "2:3")
    assert e.value.body["param"] == "messages" and "rollout.max_model_len" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": PROBLEMS[0]}])


def test_metrics_count_what_was_served(server, client):
    import httpx

    before = httpx.get(server[1] + "/metrics").text
    ask(client, PROBLEMS[3], n=5)
    after = httpx.get(server[1] + "/metrics").text

    def value(text, name):
        line = next(line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value(after, "rlv_samples_total") - value(before, "rlv_samples_total") == 5
    assert value(after, "rlv_verifier_calls_total") - value(before, "rlv_verifier_calls_total") == 5
    assert 'rlv_requests_total{route="/v1/chat/completions",status="400"}' in after
    assert "rlv_request_latency_seconds_bucket" in after


def test_zz_engine_killed_then_sigterm(server, client):
    """Last in the module: the engine's process killed -> 503 and /health 503; SIGTERM -> exit 0, no child left."""
    import httpx
    import openai

    proc, url = server
    engine = [p for p in children(proc.pid) if "EngineCore" in p.name()]
    assert engine, [p.name() for p in children(proc.pid)]
    everyone = children(proc.pid)
    engine[0].kill()
    with pytest.raises(openai.InternalServerError) as e:
        ask(client, PROBLEMS[0])
    assert e.value.status_code == 503 and "restart the server" in e.value.body["message"]
    assert httpx.get(url + "/health").status_code == 503
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    time.sleep(1)
    assert not [p for p in everyone if p.is_running() and p.status() != "zombie"]
    # the engine's shared memory (psm_*, sem.mp-*): unlinked by the server's resource tracker as it exits
    assert not leftovers(proc.pid, proc.shm_watch.before, proc.shm_watch.stop())
