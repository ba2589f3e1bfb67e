"""Evaluation pools: N samples of each held-out problem, graded, scored by the model's own P("Yes")."""

from __future__ import annotations

from rlv_megatron.config import EvalConfig
from rlv_megatron.tasks.chat import ChatFormat


def sample_pools(engine, fmt: ChatFormat, task, problems, cfg: EvalConfig, budgets: list[int], scorer=None
                 ) -> dict[int, list[list[dict]]]:
    """Per budget (max tokens) and problem, N samples as rows: problem_id, sample, answer, correct, score
    (P(Yes)), length, logprob_mean, max_tokens, task. `scorer`: what scores them (its score_yes), default
    the engine; the trainer's Policy for a classification head (verifier.kind=head).

    Samples are drawn once at the largest budget; a smaller budget's pool is the same samples cut to it (a
    sample of max_tokens=b is exactly a sample cut at b). Each distinct (problem, answer) is graded once
    (grade_by_answer) and each distinct cut scored once.
    """
    budgets = sorted(set(budgets))
    prompts = [fmt.prompt_ids(p.prompt) for p in problems]
    outs = engine.generate(prompts, n=cfg.samples, temperature=cfg.temperature, max_tokens=budgets[-1],
                           stop_token_ids=[fmt.eos_id], seeds=[cfg.seed + i for i in range(len(problems))])
    flat = [(i, s) for i, group in enumerate(outs) for s in group]
    cuts = sorted({(j, min(len(s.token_ids), b)) for b in budgets for j, (_, s) in enumerate(flat)})
    text = {c: fmt.decode(flat[c[0]][1].token_ids[:c[1]]) for c in cuts}
    answer = {c: task.answer_key(text[c]) for c in cuts}
    correct = grade_by_answer(task.grade, [(flat[c[0]][0], answer[c], text[c]) for c in cuts],
                              [p.answer for p in problems])
    p_yes = dict(zip(cuts, (scorer or engine).score_yes([fmt.verify_ids(prompts[flat[j][0]], flat[j][1].token_ids[:n])
                                             for j, n in cuts], fmt.yes_id, fmt.score_no_id)))
    pools = {}
    for b in budgets:
        pool = [[] for _ in problems]
        for j, (i, s) in enumerate(flat):
            c = (j, min(len(s.token_ids), b))
            pool[i].append({"problem_id": problems[i].id, "sample": text[c], "answer": answer[c],
                            "correct": correct.get((i, answer[c]), False), "score": p_yes[c], "length": c[1],
                            "logprob_mean": sum(s.logprobs[:c[1]]) / max(c[1], 1), "max_tokens": b,
                            "task": task.name})
        pools[b] = pool
    return pools


def grade_by_answer(grade, items: list[tuple[int, str | None, str]], golds: list[str]) -> dict[tuple, bool]:
    """Correctness of each distinct (problem index, answer) among `items` (problem index, answer, response):
    `grade(responses, golds)` sees the first response with that answer only, since a task grades a response
    through its answer_key alone. Samples without an answer are wrong and are not graded."""
    first: dict = {}
    for i, answer, text in items:
        if answer is not None:
            first.setdefault((i, answer), text)
    scores, _ = grade(list(first.values()), [golds[i] for i, _ in first])
    return {key: s >= 1.0 for key, s in zip(first, scores)}


def sample_pool(engine, fmt: ChatFormat, task, problems, cfg: EvalConfig, max_tokens: int, scorer=None
                ) -> list[list[dict]]:
    """The pool at one budget (see sample_pools)."""
    return sample_pools(engine, fmt, task, problems, cfg, [max_tokens], scorer)[max_tokens]


def evaluate(engine, fmt, task, problems, cfg: EvalConfig, max_tokens: int, keys, scorer=None
             ) -> tuple[dict, list]:
    """A pool at `max_tokens` and its metrics (eval.metrics.pool_metrics, as `rlv eval` computes them; `keys`:
    an eval.equivalence.AnswerKeys grouping the answers; `scorer`: as sample_pools)."""
    from rlv_megatron.eval.metrics import pool_metrics

    pool = sample_pool(engine, fmt, task, problems, cfg, max_tokens, scorer)
    return pool_metrics(pool, cfg, keys), pool
