"""`rlv serve` on held-out subset-sum problems: fixed-n verifier-weighted voting against adaptive sampling, and
latency at 1 and 8 concurrent clients. Everything goes through a live server and the `openai` client.

- Fixed n: weighted voting over n in 1, 2, 4, 8, 16 samples (the accuracy-vs-samples curve).
- Adaptive: rounds of 2 samples up to 16, stopping once the winner's verifier-weighted share reaches tau.
  Sample j of a request is seeded seed + j, so an adaptive request's samples are the first ones of the fixed
  n=16 request with the same seed: the comparison is paired.
- Saving at tau: the samples fixed n needs to reach the adaptive accuracy (linear in log2 n between measured
  n, as eval's compute efficiency) over the adaptive mean samples per question. The headline is the server's
  default tau (serve.min_confidence), not the best one.
- Latency: the default request (weighted, n=8) from 1 client, then from 8 at once; p50/p95 per request.
Accuracy is the task's grader on the reply's solution. Needs a trained model: `python recipes/tiny_cpu.py`
writes runs/tiny_cpu/model.
Usage: python benchmarks/serve.py [--model runs/tiny_cpu/model] [--problems 200]   (about 5 minutes)
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXED_N = (1, 2, 4, 8, 16)
TAUS = (0.5, 0.7, 0.8, 0.9, 0.95)


def start_server(model: Path, port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "rlv_megatron.cli", "serve", str(model), "--config-name",
                             "tiny_cpu", "--port", str(port), "serve.model_name=bench", "serve.batch_wait_s=0.02"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up in 5 minutes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/tiny_cpu/model", help="HF directory or checkpoint of a tiny run")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", default="runs/bench_serve.json")
    args = ap.parse_args()
    model = Path(args.model)
    if not model.exists():
        raise SystemExit(f"{model}: no model; train one first with `python recipes/tiny_cpu.py`")
    import openai

    from rlv_megatron.config import validate
    from rlv_megatron.eval.metrics import samples_to_reach
    from rlv_megatron.hydra_app import compose
    from rlv_megatron.tasks.registry import make_task

    cfg = compose("tiny_cpu", [])
    validate(cfg)
    task = make_task(cfg.task, cfg.verifier.question, args.problems)
    problems = task.eval
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(model, port)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    pool = ThreadPoolExecutor(args.clients)

    def ask(i: int, **extra) -> tuple[bool, dict, float]:
        t0 = time.perf_counter()
        r = client.chat.completions.create(model="bench", seed=1000 * i,
                                           messages=[{"role": "user", "content": problems[i].prompt}],
                                           extra_body=extra)
        seconds = time.perf_counter() - t0
        scores, _ = task.grade([r.choices[0].message.content], [problems[i].answer])
        return scores[0] >= 1.0, r.model_extra["rlv"], seconds

    def sweep(**extra) -> dict:
        rows = list(pool.map(lambda i: ask(i, **extra), range(len(problems))))
        return {"accuracy": sum(c for c, _, _ in rows) / len(rows),
                "samples": sum(r["samples"] for _, r, _ in rows) / len(rows)}

    try:
        fixed = {n: sweep(strategy="weighted", n=n) for n in FIXED_N}
        adaptive = {tau: sweep(strategy="weighted", adaptive=True, n=2, round_size=2, max_samples=16,
                               min_confidence=tau) for tau in TAUS}
        latency = {}
        for clients in (1, args.clients):
            with ThreadPoolExecutor(clients) as lp:
                t0 = time.perf_counter()
                secs = [s for _, _, s in lp.map(lambda i: ask(i), range(min(len(problems), 8 * clients)))]
                wall = time.perf_counter() - t0
            q = statistics.quantiles(secs, n=20)
            latency[clients] = {"p50_s": statistics.median(secs), "p95_s": q[18], "requests_per_s": len(secs) / wall}
    finally:
        proc.terminate()
        proc.wait(60)
    curve = {n: r["accuracy"] for n, r in fixed.items()}
    for r in adaptive.values():
        need = samples_to_reach(curve, r["accuracy"])
        r["fixed_n_needed"] = need
        r["saving"] = None if need is None else need / r["samples"]
    result = {"model": str(model), "problems": len(problems), "fixed": fixed, "adaptive": adaptive,
              "latency": latency, "default_tau": cfg.serve.min_confidence}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"{len(problems)} held-out problems, model {model}")
    print("| fixed n | accuracy | samples/question |\n|---:|---:|---:|")
    for n, r in fixed.items():
        print(f"| {n} | {r['accuracy']:.3f} | {r['samples']:.2f} |")
    print("\n| adaptive tau | accuracy | samples/question | fixed n for that accuracy | saving |\n|---:|---:|---:|---:|---:|")
    for tau, r in adaptive.items():
        need = "> 16" if r["fixed_n_needed"] is None else f"{r['fixed_n_needed']:.1f}"
        saving = f"> x{16 / r['samples']:.1f}" if r["saving"] is None else f"x{r['saving']:.2f}"
        print(f"| {tau} | {r['accuracy']:.3f} | {r['samples']:.2f} | {need} | {saving} |")
    print("\n| clients | p50 latency (s) | p95 latency (s) | requests/s |\n|---:|---:|---:|---:|")
    for c, r in latency.items():
        print(f"| {c} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['requests_per_s']:.2f} |")
    head = adaptive[cfg.serve.min_confidence]
    saving = (f"> x{16 / head['samples']:.1f}" if head["saving"] is None else f"x{head['saving']:.2f}")
    print(f"serve: accuracy {head['accuracy']:.3f} at {head['samples']:.2f} samples/question, {saving} fewer "
          f"samples than fixed n at equal accuracy")


if __name__ == "__main__":
    main()
