"""`rlv eval` grading and pool metrics on MATH-500 answers, N = 64 samples per problem.

A synthetic pool on the real data: each response is the problem's reference solution followed by a final
`\\boxed{}` holding the gold answer (45%, some integers written as `n.0`), a wrong answer from a few other
problems' golds (45%), or no box at all (10%). Pipeline: grading once per distinct (problem, answer) in the
GraderPool (--workers, default 2, per-item time limit), answers grouped by equivalence (cached), scaling.evaluate.
Baseline, measured in the same run: a naive one-process loop that grades every sample with grade_math and
computes the metrics problem by problem with the per-problem estimators (strings as vote keys), timed on
the first --naive-problems problems. Headline: problems per second (grading + metrics), pipeline vs naive.
Usage: python benchmarks/eval_throughput.py [--samples 64] [--naive-problems 50] [--workers 2]
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlv_megatron.eval import scaling  # noqa: E402
from rlv_megatron.config import EvalConfig  # noqa: E402
from rlv_megatron.eval.equivalence import AnswerKeys  # noqa: E402
from rlv_megatron.eval.metrics import pool_report  # noqa: E402
from rlv_megatron.eval.sampling import grade_by_answer  # noqa: E402
from rlv_megatron.tasks.graders import GraderPool, extract_boxed, grade_math  # noqa: E402
from rlv_megatron.tasks.math_data import load_math, read_rows  # noqa: E402

MATH500 = "math500/test"  # the cached dataset (rlv fetch)


def synthetic_pool(samples: int, seed: int = 0) -> tuple[list, list[list[str]]]:
    rng = random.Random(seed)
    problems = load_math(MATH500)
    solutions = [r["solution"] for r in read_rows(MATH500)]
    texts = []
    for p, solution in zip(problems, solutions):
        others = rng.sample([q.answer for q in problems if q.answer != p.answer], 3)
        forms = [p.answer] + ([p.answer + ".0"] if p.answer.lstrip("-").isdigit() else [])
        row = []
        for _ in range(samples):
            r = rng.random()
            if r < 0.1:
                row.append(solution.replace("\\boxed", "\\mathbf"))
                continue
            answer = rng.choice(forms) if r < 0.55 else rng.choices(others, weights=(6, 3, 1))[0]
            row.append(f"{solution}\nTherefore the final answer is $\\boxed{{{answer}}}$.")
        texts.append(row)
    return problems, texts


def rows_of(problems, texts, correct_of, seed: int = 1) -> list[list[dict]]:
    rng = random.Random(seed)
    pool = []
    for i, (p, row) in enumerate(zip(problems, texts)):
        out = []
        for text in row:
            answer = extract_boxed(text)
            c = correct_of(i, answer, text)
            out.append({"problem_id": p.id, "answer": answer, "correct": c, "length": len(text) // 4,
                        "score": min(1.0, rng.betavariate(4, 2) if c else rng.betavariate(2, 3)),
                        "logprob_mean": -rng.random(), "task": "math"})
        pool.append(out)
    return pool


def pipeline(problems, texts, samples: int, workers: int) -> tuple[float, float, float, dict]:
    """Seconds grading, grouping (worker start-up included in both) and estimating, and the metrics."""
    t0 = time.perf_counter()
    with GraderPool("math", workers=workers, timeout_s=5.0) as grader:
        items = [(i, extract_boxed(t), t) for i, row in enumerate(texts) for t in row]
        correct = grade_by_answer(grader.grade, items, [p.answer for p in problems])
    pool = rows_of(problems, texts, lambda i, a, t: correct.get((i, a), False))
    t1 = time.perf_counter()
    with AnswerKeys(workers=workers, timeout_s=5.0) as keys:
        keys.vote_keys("math", pool)  # fills the cache that pool_report then reads
        t2 = time.perf_counter()
        report = pool_report({samples: pool}, EvalConfig(subsets=100, seed=0), keys)
    return t1 - t0, t2 - t1, time.perf_counter() - t2, report["budgets"][str(samples)]


def naive(problems, texts, samples: int) -> tuple[float, float, dict]:
    t0 = time.perf_counter()
    grades = [[grade_math(t, p.answer) == 1.0 for t in row] for p, row in zip(problems, texts)]
    pool = rows_of(problems, texts, lambda i, a, t: grades[i][texts[i].index(t)])
    t1 = time.perf_counter()
    ks = scaling.powers_of_two_up_to(samples)
    out = {f"{name}@{k}": 0.0 for k in ks for name in ("pass", "majority", "weighted", "best_of")}
    for rows in pool:
        s = [scaling.Sample(r["answer"], r["correct"], r["score"], r["logprob_mean"]) for r in rows]
        valid_scores = [x.score if x.answer is not None else 0.0 for x in s]
        right = [x.correct and x.answer is not None for x in s]
        for k in ks:
            out[f"pass@{k}"] += scaling.pass_at_k(samples, sum(right), k) / len(pool)
            out[f"majority@{k}"] += scaling.majority_at_k(s, k) / len(pool)
            out[f"weighted@{k}"] += scaling.weighted_at_k(s, k) / len(pool)
            scaling.weighted_at_k(s, k, key="likelihood")
            out[f"best_of@{k}"] += scaling.best_of_k(valid_scores, right, k) / len(pool)
            scaling.best_of_k([x.logprob_mean if x.answer is not None else -1e9 for x in s], right, k)
    scaling.within_prompt_auc([[scaling.Sample(r["answer"], r["correct"], r["score"]) for r in rows] for rows in pool])
    return t1 - t0, time.perf_counter() - t1, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--naive-problems", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2, help="grading processes of the pipeline")
    args = ap.parse_args()
    problems, texts = synthetic_pool(args.samples)
    n = len(problems)
    grade_s, group_s, estimate_s, ours = pipeline(problems, texts, args.samples, args.workers)
    metrics_s = group_s + estimate_s
    m = args.naive_problems
    naive_grade_s, naive_metrics_s, _ = naive(problems[:m], texts[:m], args.samples)
    rate = n / (grade_s + metrics_s)
    naive_rate = m / (naive_grade_s + naive_metrics_s)
    k = args.samples
    print(f"pool: {n} MATH-500 problems x {k} samples ({n * k} responses)")
    print(f"pipeline: grading {grade_s:.1f} s ({n / grade_s:.1f} problems/s), pool metrics {metrics_s:.1f} s "
          f"(equivalence grouping {group_s:.1f} s, all estimators for k = 1..{k} {estimate_s:.1f} s)")
    print(f"naive loop on {m} problems: grading {naive_grade_s:.1f} s ({m / naive_grade_s:.2f} problems/s), "
          f"metrics {naive_metrics_s:.1f} s ({naive_metrics_s / m * n:.1f} s for {n} problems)")
    print(f"pass@1 {ours['pass@1']:.3f}, majority@{k} {ours[f'majority@{k}']:.3f}, weighted@{k} "
          f"{ours[f'weighted@{k}']:.3f}, {ours['answers_per_problem']:.2f} answers and "
          f"{ours['groups_per_problem']:.2f} groups per problem")
    print(f"eval_throughput: {rate:.1f} problems/s, x{rate / naive_rate:.1f} vs baseline")


if __name__ == "__main__":
    main()
