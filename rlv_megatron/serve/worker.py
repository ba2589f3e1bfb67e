"""The engine's side of `rlv serve`: one thread owns the engine and advances every open request by a round.

A round batches the requests that are waiting: their next samples in one engine call per sampling setting,
every
new sample's verification turn scored in one call, answers extracted and keyed. A request is answered when
its strategy has its samples, or (adaptive) once its confidence reaches min_confidence or it has drawn
max_samples. A failed engine call fails the requests of that round and every later one (HTTP 503).

Seeds: a request's j-th sample is drawn with seed + j (vLLM seeds the i-th of n samples with seed + i), so
its samples do not depend on what it was batched with or how its rounds were cut: an adaptive request's
samples are the first ones of the same request with a fixed n.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field

from rlv_megatron.serve.params import Params
from rlv_megatron.serve.strategy import Candidate, Decision, decide


class EngineFailure(RuntimeError):
    """The engine (or the verifier's forward) failed; the server answers 503 from then on."""


@dataclass
class Job:
    prompt: list[int]
    params: Params
    samples: list[Candidate] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)  # each sample's finish reason
    rounds: int = 0
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def answer(self, decision: Decision) -> None:
        self._settle(lambda f: f.set_result(decision))

    def refuse(self, error: Exception) -> None:
        self._settle(lambda f: f.set_exception(error))

    def _settle(self, set_outcome) -> None:
        if not self.future.done():
            try:
                set_outcome(self.future)
            except concurrent.futures.InvalidStateError:  # the client gave up in between
                pass


class Worker:
    def __init__(self, engine, scorer, fmt, task: str, extract, keys, serve, metrics=None):
        """engine: generates; scorer: its score_yes gives P("Yes") (the engine, or a classification head's
        Policy); fmt: ChatFormat; task: the equivalence used for grouping; extract: text -> answer or None;
        keys: eval.equivalence.AnswerKeys; serve: ServeConfig; metrics: serve.app.Metrics or None."""
        self.engine, self.scorer, self.fmt, self.task, self.extract, self.keys = engine, scorer, fmt, task, extract, keys
        self.serve, self.metrics = serve, metrics
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.active: list[Job] = []
        self.failure: str | None = None

    def submit(self, prompt: list[int], params: Params) -> Job:
        job = Job(list(prompt), params)
        if self.failure is not None:
            job.refuse(EngineFailure(self.failure))
        else:
            self.inbox.put(job)
        return job

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set (the caller's thread owns the engine from here on)."""
        while not stop.is_set():
            self._admit(wait=0.1 if not self.active else 0.0)
            self.active = [j for j in self.active if not j.future.done()]  # timed-out clients dropped
            if not self.active:
                continue
            try:
                self.step(self.active)
            except Exception as e:  # noqa: BLE001 - whatever the engine raised, the clients get a 503
                self.fail(f"{type(e).__name__}: {e}")
        self.fail("the server is shutting down")

    def _admit(self, wait: float) -> None:
        try:
            self.active.append(self.inbox.get(timeout=wait) if wait else self.inbox.get_nowait())
        except queue.Empty:
            return
        deadline = time.monotonic() + self.serve.batch_wait_s  # let concurrent clients join this round
        while True:
            left = deadline - time.monotonic()
            try:
                self.active.append(self.inbox.get(timeout=left) if left > 0 else self.inbox.get_nowait())
            except queue.Empty:
                return

    def check_engine(self) -> None:
        """From another thread: fail every open request once the engine's process is dead (the engine
        thread may be blocked for good in a call to it)."""
        dead = getattr(self.engine, "dead", None)
        if self.failure is None and dead is not None and dead():
            self.fail("the engine's process died")

    def fail(self, why: str) -> None:
        self.failure = self.failure or why
        pending = list(self.active) + _drain(self.inbox)
        self.active = []
        for job in pending:
            job.refuse(EngineFailure(self.failure))

    def step(self, jobs: list[Job]) -> None:
        """One round for each of `jobs`; answers those that are done."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            k = job.params.round_samples(len(job.samples))
            groups.setdefault((k, job.params.temperature, job.params.top_p), []).append(job)
        new: list[tuple[Job, object]] = []
        for (k, temperature, top_p), group in groups.items():
            outs = self.engine.generate([j.prompt for j in group], n=k, temperature=temperature, top_p=top_p,
                                        max_tokens=[j.params.max_tokens for j in group],
                                        stop_token_ids=[self.fmt.eos_id],
                                        seeds=[j.params.seed + len(j.samples) for j in group])
            for job, samples in zip(group, outs):
                job.rounds += 1
                new += [(job, s) for s in samples]
        scores = self.scorer.score_yes([self.fmt.verify_ids(j.prompt, s.token_ids) for j, s in new],
                                       self.fmt.yes_id, self.fmt.score_no_id)
        texts = [self.fmt.decode(s.token_ids) for _, s in new]
        answers = [self.extract(t) for t in texts]
        keys = self.keys.keys(self.task, sorted({a for a in answers if a is not None}))
        for (job, s), text, answer, score in zip(new, texts, answers, scores):
            job.samples.append(Candidate(text, answer, None if answer is None else keys[answer], score,
                                         len(s.token_ids)))
            job.finish.append(s.finish_reason)
        if self.metrics is not None:
            self.metrics.samples.inc(len(new))
            self.metrics.verifier_calls.inc(len(new))
        for job in jobs:
            decision = decide(job.samples, job.params.strategy)
            enough = job.params.adaptive and decision.confidence >= job.params.min_confidence
            if enough or job.params.round_samples(len(job.samples)) == 0:
                job.answer(decision)


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
