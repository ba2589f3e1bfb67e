"""The HTTP side of `rlv serve`: OpenAI-compatible routes over serve/worker.py, health and Prometheus metrics.

    POST /v1/chat/completions   messages -> the chat template; the reply is the chosen sample
    POST /v1/completions        prompt text as it is (no template); the same strategies
    GET  /v1/models, /health, /metrics
A reply carries one choice, the winning answer's solution, and an `rlv` field: the strategy, the answers
with their votes and verifier scores, the confidence, the samples drawn and the seed (the same seed and
fields give the same reply). `n` is the number of samples voted over, not of choices returned.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from rlv_megatron.serve.params import BadRequest, Params, parse
from rlv_megatron.serve.worker import EngineFailure

ROLES = ("system", "user", "assistant")


class Metrics:
    def __init__(self):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("rlv_requests", "requests answered, by route and HTTP status",
                                     ["route", "status"], registry=self.registry)
        self.samples = prom.Counter("rlv_samples", "samples drawn", registry=self.registry)
        self.verifier_calls = prom.Counter("rlv_verifier_calls", "samples scored by the verifier",
                                           registry=self.registry)
        self.errors = prom.Counter("rlv_errors", "failed requests, by kind", ["kind"], registry=self.registry)
        self.latency = prom.Histogram("rlv_request_latency_seconds", "time to answer a completion request",
                                      ["route"], registry=self.registry,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    def text(self) -> tuple[bytes, str]:
        import prometheus_client as prom

        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


def _text(content, field: str) -> str:
    """A message's content: a string, or OpenAI's list of {type: text, text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(field, "must be a string or a list of text parts")


def chat_prompt(fmt, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "a non-empty list of {role, content} is required")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
        clean.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content")})
    if clean[-1]["role"] != "user":
        raise BadRequest("messages", "the last message must be the user's (the model answers it)")
    if fmt.raw:  # task.prompt_format=raw: the model never saw a chat template
        if len(clean) != 1:
            raise BadRequest("messages", "task.prompt_format=raw: one user message (the problem) only")
        return fmt.prompt_ids(clean[0]["content"])
    try:
        return fmt.conversation_ids(clean)
    except Exception as e:  # noqa: BLE001 - jinja's errors (e.g. a role the template refuses) are the client's
        raise BadRequest("messages", f"the model's chat template refused them: {e}") from None


def completion_prompt(fmt, body: dict) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt", "one non-empty string is required")
    return fmt.tokenizer.encode(prompt)


def check_length(fmt, prompt: list[int], params: Params, max_model_len: int, prompt_field: str) -> None:
    """Prompt, response and the verification turn must fit in the engine's context."""
    turn = fmt.verify_turn_tokens
    if len(prompt) + 1 + turn > max_model_len:
        raise BadRequest(prompt_field, f"{len(prompt)} tokens: with the verification turn ({turn}) it does not "
                         f"fit the context of {max_model_len} tokens (rollout.max_model_len)")
    if len(prompt) + params.max_tokens + turn > max_model_len:
        raise BadRequest("max_tokens", f"{params.max_tokens}: the prompt ({len(prompt)} tokens), the response and "
                         f"the verification turn ({turn}) exceed the context of {max_model_len} tokens; at most "
                         f"{max_model_len - len(prompt) - turn}")


def reply(kind: str, model: str, job, decision, prompt_tokens: int) -> dict:
    chosen = job.samples[decision.index]
    finish = job.finish[decision.index]
    choice = ({"index": 0, "message": {"role": "assistant", "content": chosen.text}, "finish_reason": finish,
               "logprobs": None} if kind == "chat" else
              {"index": 0, "text": chosen.text, "finish_reason": finish, "logprobs": None})
    completion_tokens = sum(s.tokens for s in job.samples)
    p = job.params
    return {
        "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()), "model": model, "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "rlv": {"strategy": p.strategy, "adaptive": p.adaptive, "answer": decision.answer,
                "confidence": decision.confidence, "score": chosen.score, "samples": len(job.samples),
                "rounds": job.rounds, "verifier_calls": len(job.samples), "seed": p.seed,
                "answers": decision.answers, "sample_scores": [s.score for s in job.samples],
                "sample_answers": [s.answer for s in job.samples]},
    }


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def make_app(worker, fmt, model_name: str, serve, max_model_len: int, metrics: Metrics):
    app = FastAPI(title="rlv serve")

    async def complete(request: Request, kind: str):
        route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        start = time.perf_counter()
        status, response = await _complete(request, kind)
        metrics.requests.labels(route, str(status)).inc()
        if status == 200:
            metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    async def _complete(request: Request, kind: str):
        try:
            body = await request.json()
        except ValueError:
            metrics.errors.labels("bad_request").inc()
            return 400, error(400, "the body is not JSON")
        try:
            if not isinstance(body, dict):
                raise BadRequest("body", "must be a JSON object")
            if body.get("model") not in (None, model_name):
                metrics.errors.labels("unknown_model").inc()
                return 404, error(404, f"model {body.get('model')!r} is not served here; this server serves "
                                  f"{model_name!r}", "model", "not_found_error")
            params = parse(body, serve)
            prompt = chat_prompt(fmt, body) if kind == "chat" else completion_prompt(fmt, body)
            check_length(fmt, prompt, params, max_model_len, "messages" if kind == "chat" else "prompt")
        except BadRequest as e:
            metrics.errors.labels("bad_request").inc()
            return 400, error(400, str(e), e.field)
        job = worker.submit(prompt, params)
        try:
            decision = await asyncio.wait_for(asyncio.wrap_future(job.future), serve.request_timeout_s)
        except asyncio.TimeoutError:
            job.future.cancel()
            metrics.errors.labels("timeout").inc()
            return 504, error(504, f"no answer within serve.request_timeout_s={serve.request_timeout_s} s",
                              kind="timeout_error")
        except EngineFailure as e:
            metrics.errors.labels("engine").inc()
            return 503, error(503, f"the engine failed: {e}; restart the server", kind="engine_error")
        return 200, JSONResponse(reply(kind, model_name, job, decision, len(prompt)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completion")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "rlv-megatron"}]}

    @app.get("/health")
    async def health():
        if worker.failure is not None:
            return JSONResponse({"status": "failed", "error": worker.failure}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.text()
        return Response(data, media_type=content_type)

    return app
