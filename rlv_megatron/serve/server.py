"""`rlv serve` as a function: the engine's rounds and the HTTP server each in a thread; the main thread takes
the signals and watches the engine's process (a call to a dead engine can block its thread for good)."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path


class ServeError(RuntimeError):
    """The server could not start (e.g. its port is taken)."""


def run(cfg, model: str, model_dir: str | None = None) -> None:
    """Serve `model` (a Hugging Face directory or a checkpoint) until SIGINT or SIGTERM."""
    import uvicorn
    from transformers import AutoTokenizer

    from rlv_megatron.config import validate
    from rlv_megatron.eval.app import head_scorer, resolve_model
    from rlv_megatron.eval.equivalence import AnswerKeys
    from rlv_megatron.rollout.engine import make_engine
    from rlv_megatron.serve.app import Metrics, make_app
    from rlv_megatron.serve.params import server_defaults
    from rlv_megatron.serve.worker import Worker
    from rlv_megatron.tasks.chat import ChatFormat
    from rlv_megatron.tasks.registry import answer_extractor

    validate(cfg)
    serve = server_defaults(cfg)
    extract = answer_extractor(cfg.task.name)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    name = cfg.serve.model_name or Path(model).resolve().name
    with tempfile.TemporaryDirectory() as tmp:
        hf = resolve_model(model, tmp, model_dir, cfg.rollout.dtype)
        fmt = ChatFormat.for_config(AutoTokenizer.from_pretrained(hf), cfg)
        scorer = head_scorer(cfg, hf)
        engine = make_engine("vllm", str(hf), cfg.rollout)
        stop = threading.Event()
        server = None
        try:
            with AnswerKeys(cfg.task.grader_workers, cfg.task.grader_timeout_s) as keys:
                metrics = Metrics()
                worker = Worker(engine, scorer or engine, fmt, cfg.task.name, extract, keys, serve, metrics)
                app = make_app(worker, fmt, name, serve, cfg.rollout.max_model_len, metrics)
                server = uvicorn.Server(uvicorn.Config(app, host=serve.host, port=serve.port,
                                                       log_level="warning", timeout_graceful_shutdown=5))
                thread = threading.Thread(target=server.run, name="http", daemon=True)
                thread.start()
                while not server.started and thread.is_alive():
                    time.sleep(0.05)
                if not server.started:
                    raise ServeError(f"could not listen on {serve.host}:{serve.port} (serve.host, "
                                     "serve.port): is the port taken?")
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, lambda *_: stop.set())
                rounds = threading.Thread(target=worker.run, args=(stop,), name="engine", daemon=True)
                rounds.start()
                print(f"serving {name} at http://{serve.host}:{serve.port}/v1 (strategy {serve.strategy}, "
                      f"n {serve.n}{', adaptive' if serve.adaptive else ''})", flush=True)
                while not stop.wait(0.5):
                    worker.check_engine()
                rounds.join(10)
                print("server stopped", flush=True)
        finally:
            if server is not None:
                server.should_exit = True
            engine.close()
