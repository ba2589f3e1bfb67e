"""Test-time scaling on held-out problems: N samples each, graded, scored by the model's own P("Yes")."""

from __future__ import annotations

from rlv_megatron import scaling
from rlv_megatron.config import EvalConfig
from rlv_megatron.tasks.chat import ChatFormat


def sample_pool(engine, fmt: ChatFormat, task, problems, cfg: EvalConfig, max_tokens: int) -> list[list[dict]]:
    """Per problem, N samples as rows: answer, correct, score (P(Yes)), mean token log-prob, length."""
    prompts = [fmt.prompt_ids(p.prompt) for p in problems]
    outs = engine.generate(prompts, n=cfg.samples, temperature=cfg.temperature, max_tokens=max_tokens,
                           stop_token_ids=[fmt.eos_id], seeds=[cfg.seed + i for i in range(len(problems))])
    flat = [(i, s) for i, group in enumerate(outs) for s in group]
    texts = [fmt.decode(s.token_ids) for _, s in flat]
    correct, _ = task.grade(texts, [problems[i].answer for i, _ in flat])
    p_yes = engine.score_yes([fmt.verify_ids(prompts[i], s.token_ids) for i, s in flat], fmt.yes_id,
                             fmt.score_no_id)
    pool = [[] for _ in problems]
    for (i, s), text, c, y in zip(flat, texts, correct, p_yes):
        pool[i].append({"problem_id": problems[i].id, "sample": text, "answer": task.answer_key(text),
                        "correct": bool(c >= 1.0), "score": y, "length": len(s.token_ids),
                        "logprob_mean": sum(s.logprobs) / max(len(s.logprobs), 1)})
    return pool


def pool_metrics(pool: list[list[dict]], cfg: EvalConfig) -> dict[str, float]:
    problems = [[scaling.Sample(r["answer"], r["correct"], r["score"], r["logprob_mean"]) for r in rows]
                for rows in pool]
    return scaling.evaluate(problems, scaling.powers_of_two_up_to(cfg.samples), subsets=cfg.subsets, seed=cfg.seed)


def evaluate(engine, fmt, task, problems, cfg: EvalConfig, max_tokens: int) -> tuple[dict, list]:
    pool = sample_pool(engine, fmt, task, problems, cfg, max_tokens)
    return pool_metrics(pool, cfg), pool
