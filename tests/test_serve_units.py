"""`rlv serve` without an engine: the strategies by hand, request fields and their errors, the worker's rounds
(adaptive stopping, seeds, batching, engine failure) over a scripted engine."""

import dataclasses
import threading

import pytest

from rlv_megatron.config import ConfigError, Config, validate
from rlv_megatron.eval.equivalence import AnswerKeys
from rlv_megatron.rollout.engine import Sample
from rlv_megatron.serve.params import BadRequest, parse, server_defaults
from rlv_megatron.serve.strategy import Candidate, decide
from rlv_megatron.serve.worker import EngineFailure, Worker

SERVE = server_defaults(Config())


def cands(*rows):
    return [Candidate(f"text {i}", a, a, s, 3) for i, (a, s) in enumerate(rows)]


# ------------------------------------------------------------------ strategies


def test_strategies_by_hand():
    pool = cands(("7", 0.2), ("7", 0.3), ("7", 0.1), ("9", 0.9), (None, 1.0), ("9", 0.5))
    majority = decide(pool, "majority")  # 7: 3 votes, 9: 2
    assert (majority.answer, majority.index) == ("7", 1)  # the winner's best-scored sample answers
    assert majority.confidence == pytest.approx(3 / 5)  # the answerless sample does not vote
    weighted = decide(pool, "weighted")  # 7: 0.6, 9: 1.4
    assert (weighted.answer, weighted.index) == ("9", 3)
    assert weighted.confidence == pytest.approx(1.4 / 2.0)
    assert [(a["answer"], a["samples"], round(a["weight"], 6)) for a in weighted.answers] == [("9", 2, 1.4), ("7", 3, 0.6)]
    best = decide(pool, "best_of")
    assert (best.answer, best.index, best.confidence) == ("9", 3, 0.9)
    single = decide(pool, "single")
    assert (single.answer, single.index, single.confidence) == ("7", 0, 0.2)


def test_ties_and_no_answers():
    tie = decide(cands(("1", 0.5), ("2", 0.7)), "majority")  # one vote each: the higher score wins
    assert tie.answer == "2" and tie.confidence == 0.5
    same = decide(cands(("1", 0.5), ("2", 0.5)), "weighted")  # all equal: the earlier sample
    assert same.answer == "1"
    none = decide(cands((None, 0.1), (None, 0.6)), "weighted")
    assert (none.answer, none.index, none.confidence, none.answers) == (None, 1, 0.0, [])
    zero = decide(cands(("1", 0.0), ("2", 0.0)), "weighted")
    assert zero.confidence == 0.0


# ------------------------------------------------------------------ request fields


def test_defaults_and_overrides():
    p = parse({"seed": 3}, SERVE)
    assert (p.strategy, p.n, p.adaptive, p.seed) == ("weighted", 8, False, 3)
    assert p.max_tokens == Config().algo.max_tokens and p.temperature == Config().eval.temperature
    p = parse({"strategy": "majority", "n": 5, "max_completion_tokens": 7, "temperature": 0}, SERVE)
    assert (p.strategy, p.n, p.max_tokens, p.temperature) == ("majority", 5, 7, 0.0)
    assert len({parse({}, SERVE).seed for _ in range(5)}) > 1  # picked by the server when absent
    a = parse({"adaptive": True}, SERVE)
    assert a.n == SERVE.round_size and a.max_samples == SERVE.max_samples


@pytest.mark.parametrize("body, field", [
    ({"strategy": "best"}, "strategy"), ({"n": 0}, "n"), ({"n": 65}, "n"), ({"n": 2.5}, "n"), ({"n": "4"}, "n"),
    ({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"min_confidence": 0}, "min_confidence"),
    ({"min_confidence": 1.5}, "min_confidence"), ({"adaptive": "yes"}, "adaptive"),
    ({"adaptive": True, "strategy": "single"}, "adaptive"), ({"n": 8, "max_samples": 4}, "max_samples"),
    ({"seed": -1}, "seed"), ({"stream": True}, "stream"), ({"round_size": 0}, "round_size"),
])
def test_bad_fields_are_named(body, field):
    with pytest.raises(BadRequest) as e:
        parse(body, SERVE)
    assert e.value.field == field and field in str(e.value)


def test_server_defaults_are_checked_as_config():
    cfg = Config()
    cfg.serve.strategy = "vote"
    with pytest.raises(ConfigError, match="serve.strategy"):
        validate(cfg)
    cfg = Config()
    cfg.serve.max_samples = 1000
    with pytest.raises(ConfigError, match="serve.max_samples"):
        validate(cfg)


def test_round_samples():
    fixed = parse({"n": 6}, SERVE)
    assert [fixed.round_samples(d) for d in (0, 6)] == [6, 0]
    assert [parse({"strategy": "single"}, SERVE).round_samples(d) for d in (0, 1)] == [1, 0]
    adaptive = parse({"adaptive": True, "n": 2, "round_size": 3, "max_samples": 7}, SERVE)
    assert [adaptive.round_samples(d) for d in (0, 2, 5, 7)] == [2, 3, 2, 0]


# ------------------------------------------------------------------ the worker over a scripted engine


class Fmt:
    eos_id, yes_id, score_no_id = 0, 1, None
    verify_suffix_ids = [9]
    verify_turn_tokens = 2  # the stop token and the suffix, as ChatFormat counts them

    def verify_ids(self, prompt, response):
        return list(prompt) + list(response) + [0, 9]

    def decode(self, ids):
        return "".join(chr(ord("A") + i - 10) for i in ids if i)


class ScriptedEngine:
    """A prompt's samples are `script` flattened (sample j = seed + j - the prompt's first id, its seed);
    P("Yes") by answer. Records the calls."""

    def __init__(self, script, scores, fail=False):
        self.script, self.scores, self.fail, self.calls = script, scores, fail, []

    def generate(self, prompts, n, temperature, top_p, max_tokens, stop_token_ids, seeds):
        if self.fail:
            raise RuntimeError("EngineCore died")
        self.calls.append((len(prompts), n, list(seeds)))
        out = []
        for prompt, seed in zip(prompts, seeds):
            flat = [a for rnd in self.script for a in rnd]
            answers = flat[seed - prompt[0]:][:n]
            out.append([Sample([10 + "ABCDEFG".index(a)], [-0.1], "stop") for a in answers])
        return out

    def score_yes(self, prompts, yes, no):
        return [self.scores[chr(ord("A") + p[-3] - 10)] for p in prompts]


def run_jobs(engine, bodies):
    with AnswerKeys(workers=1) as keys:
        worker = Worker(engine, engine, Fmt(), "subset_sum", lambda t: t or None, keys, SERVE)
        jobs = [worker.submit([b["seed"]], parse(b, SERVE)) for b in bodies]
        worker.active, _ = jobs, [worker.inbox.get_nowait() for _ in jobs]
        while worker.active:
            worker.step(worker.active)
            worker.active = [j for j in worker.active if not j.future.done()]
        return jobs


def test_adaptive_stops_at_the_confidence_by_hand():
    script = [["A", "B"], ["A", "A"], ["A", "A"], ["B", "B"]]
    engine = ScriptedEngine(script, {"A": 0.9, "B": 0.8})
    (job,) = run_jobs(engine, [{"seed": 5, "adaptive": True, "n": 2, "round_size": 2, "min_confidence": 0.8}])
    d = job.future.result()
    # weighted shares of A: .9/1.7 = .53, 2.7/3.5 = .77, 4.5/5.3 = .85 -> stops after the third round
    assert (len(job.samples), job.rounds, d.answer) == (6, 3, "A")
    assert d.confidence == pytest.approx(4.5 / 5.3)
    assert [c[2] for c in engine.calls] == [[5], [7], [9]]  # sample j has seed 5 + j


def test_adaptive_stops_at_max_samples_and_fixed_n_draws_once():
    engine = ScriptedEngine([["A", "B"], ["B", "A"], ["A", "B"]], {"A": 0.5, "B": 0.5})
    capped, fixed = run_jobs(engine, [
        {"seed": 1, "adaptive": True, "n": 2, "round_size": 2, "max_samples": 4, "min_confidence": 0.9},
        {"seed": 2, "n": 2, "strategy": "majority"}])
    assert (len(capped.samples), capped.rounds) == (4, 2)
    assert (len(fixed.samples), fixed.rounds) == (2, 1)
    assert engine.calls[0][:2] == (2, 2)  # both requests' first rounds in one engine call


def test_engine_failure_fails_every_open_request():
    with AnswerKeys(workers=1) as keys:
        worker = Worker(ScriptedEngine([], {}, fail=True), None, Fmt(), "subset_sum", str, keys, SERVE)
        job = worker.submit([1], parse({"seed": 1}, SERVE))
        stop = threading.Event()
        threading.Timer(1.0, stop.set).start()
        worker.run(stop)
        with pytest.raises(EngineFailure, match="EngineCore died"):
            job.future.result(timeout=0)
        later = worker.submit([1], parse({"seed": 1}, SERVE))  # refused at once from then on
        with pytest.raises(EngineFailure):
            later.future.result(timeout=0)


def test_a_dead_engine_fails_the_requests_blocked_on_it():
    """vLLM can block for good on a request sent as its engine process dies: the watcher fails it."""
    entered, release = threading.Event(), threading.Event()

    class Blocked(ScriptedEngine):
        is_dead = False

        def generate(self, *a, **k):
            entered.set()
            release.wait(10)
            return [[]]

        def dead(self):
            return self.is_dead

    engine = Blocked([], {})
    with AnswerKeys(workers=1) as keys:
        worker = Worker(engine, engine, Fmt(), "subset_sum", str, keys, SERVE)
        job = worker.submit([1], parse({"seed": 1}, SERVE))
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        assert entered.wait(10)
        worker.check_engine()
        assert not job.future.done()  # alive: the request waits
        engine.is_dead = True
        worker.check_engine()
        with pytest.raises(EngineFailure, match="process died"):
            job.future.result(timeout=1)
        release.set()
        stop.set()
        thread.join(10)


def test_check_length_names_the_field():
    from rlv_megatron.serve.app import check_length

    p = dataclasses.replace(parse({"max_tokens": 10}, SERVE))
    check_length(Fmt(), [1] * 10, p, 22, "messages")  # 10 + 10 + the turn (2) fits 22
    with pytest.raises(BadRequest, match="max_tokens.*at most 9") as e:
        check_length(Fmt(), [1] * 10, p, 21, "messages")
    assert e.value.field == "max_tokens"
    with pytest.raises(BadRequest) as e:
        check_length(Fmt(), [1] * 20, p, 22, "messages")
    assert e.value.field == "messages"


# ------------------------------------------------------------------ the HTTP layer over a scripted engine


@pytest.fixture
def client_for():
    """A TestClient over make_app with a worker thread on `engine`; stopped after the test."""
    from fastapi.testclient import TestClient

    from rlv_megatron.serve.app import Metrics, make_app

    stops = []

    def make(engine, **serve):
        cfg = dataclasses.replace(SERVE, **serve)
        keys = AnswerKeys(workers=1)
        metrics = Metrics()
        worker = Worker(engine, engine, Fmt(), "subset_sum", lambda t: t or None, keys, cfg, metrics)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        stops.append((stop, thread, keys))
        fmt = Fmt()
        fmt.raw, fmt.prompt_ids = True, lambda text: [int(text)]  # the prompt is the request's seed
        return TestClient(make_app(worker, fmt, "m", cfg, 64, metrics)), worker

    yield make
    for stop, thread, keys in stops:
        stop.set()
        thread.join(5)
        keys.close()


def chat(client, seed, **fields):
    return client.post("/v1/chat/completions",
                       json={"model": "m", "messages": [{"role": "user", "content": str(seed)}], "seed": seed,
                             **fields})


def test_http_reply_errors_and_metrics(client_for):
    client, _ = client_for(ScriptedEngine([["A", "B", "A"]], {"A": 0.5, "B": 0.9}))
    r = chat(client, 4, n=3, strategy="weighted")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "A" and body["rlv"]["answer"] == "A"  # 1.0 against 0.9
    assert body["rlv"]["sample_answers"] == ["A", "B", "A"] and body["usage"]["completion_tokens"] == 3
    assert chat(client, 4, n=3, strategy="best_of").json()["rlv"]["answer"] == "B"
    bad = chat(client, 4, strategy="vote")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy"
    assert chat(client, 4, max_tokens=100).json()["error"]["param"] == "max_tokens"
    assert client.post("/v1/chat/completions", content=b"{").status_code == 400
    assert client.post("/v1/chat/completions", json={"messages": []}).json()["error"]["param"] == "messages"
    assert chat(client, 4, model="other").status_code == 404
    assert client.get("/v1/models").json()["data"][0]["id"] == "m"
    text = client.get("/metrics").text
    assert 'rlv_requests_total{route="/v1/chat/completions",status="200"} 2.0' in text
    assert 'rlv_requests_total{route="/v1/chat/completions",status="400"} 4.0' in text
    assert "rlv_samples_total 6.0" in text and "rlv_verifier_calls_total 6.0" in text
    assert 'rlv_request_latency_seconds_count{route="/v1/chat/completions"} 2.0' in text


def test_http_timeout_and_engine_failure(client_for):
    release = threading.Event()

    class Hanging(ScriptedEngine):
        def generate(self, *a, **k):
            release.wait(10)
            raise RuntimeError("EngineCore died")

    client, worker = client_for(Hanging([], {}), request_timeout_s=0.5)
    r = chat(client, 1)
    assert r.status_code == 504 and "serve.request_timeout_s" in r.json()["error"]["message"]
    release.set()
    for _ in range(100):  # the engine call that hung now fails
        if worker.failure:
            break
        threading.Event().wait(0.05)
    r = chat(client, 1)
    assert r.status_code == 503 and "EngineCore died" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 503


def test_chat_messages_are_checked():
    from rlv_megatron.serve.app import chat_prompt

    class Refusing(Fmt):
        raw = False

        def conversation_ids(self, messages):
            raise ValueError("Conversation roles must alternate user/assistant")

    for messages, field in (([{"role": "robot", "content": "x"}], "messages[0].role"),
                            ([{"role": "user", "content": 3}], "messages[0].content"),
                            ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages")):
        with pytest.raises(BadRequest) as e:
            chat_prompt(Refusing(), {"messages": messages})
        assert e.value.field == field
    with pytest.raises(BadRequest, match="chat template refused them: Conversation roles"):
        chat_prompt(Refusing(), {"messages": [{"role": "user", "content": "x"}]})
    parts = [{"type": "text", "text": "1,2"}, {"type": "text", "text": ":3"}]
    fmt = Refusing()
    fmt.conversation_ids = lambda messages: messages
    assert chat_prompt(fmt, {"messages": [{"role": "user", "content": parts}]}) == [{"role": "user", "content": "1,2:3"}]


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    from tests.cli import rlv

    for args, message in ((["serve", str(tmp_path)], "neither a Hugging Face model directory"),
                          (["serve", str(tmp_path), "serve.strategy=vote"], "serve.strategy='vote'"),
                          (["serve", str(tmp_path), "--port", "70000"], "serve.port=70000")):
        done = rlv(*args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
