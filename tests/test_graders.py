"""Graders, answer extraction, the grading process pool and the math data loaders, on the real data."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlv_megatron.eval.equivalence import math_key
from rlv_megatron.tasks.graders import GRADERS, GraderPool, extract_boxed, extract_gsm8k, register_grader
from rlv_megatron.tasks.math_data import DataError, load_gsm8k, load_math, read_rows

MATH500 = "math500/test"  # datasets by their cached names (rlv_megatron/assets.py, built by `rlv fetch`)


# Test-only grader, registered at module level so pool workers can import it by module and name.
# Its behaviour is picked by the response; anything else is an exact match.
@register_grader("_test_chaos")
def chaos_grader(response: str, gold: str) -> float:
    if response == "sleep":
        time.sleep(30)
    elif response == "raise":
        raise RuntimeError("grader bug")
    elif response == "exit":
        os._exit(1)
    elif response == "kill":  # like the OOM killer or a segfault: no Python cleanup at all
        os.kill(os.getpid(), signal.SIGKILL)
    elif response.startswith("busy:"):  # killed from outside while busy: marks it, then holds until released
        folder = Path(response.removeprefix("busy:"))
        with open(folder / "busy.log", "a") as log:  # one line per item started: the worker's pid
            log.write(f"{os.getpid()}\n")
        deadline = time.monotonic() + 60
        while not (folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return float(response == gold)


@pytest.fixture(scope="module")
def math_pool():
    with GraderPool("math", workers=2, timeout_s=10.0) as pool:
        yield pool


@pytest.fixture(scope="module")
def math500():
    problems = load_math(MATH500)
    rows = read_rows(MATH500)
    assert len(problems) == len(rows) == 500
    return problems, [r["solution"] for r in rows]


# ---------------------------------------------------------------------------------------------------------
# MATH


def test_math500_solutions_grade_correct(math_pool, math500):
    problems, solutions = math500
    assert all(p.answer == r["answer"] for p, r in zip(problems, read_rows(MATH500)))
    t0 = time.perf_counter()
    scores, stats = math_pool.grade(solutions, [p.answer for p in problems])
    elapsed = time.perf_counter() - t0
    failed = [p.id for p, s in zip(problems, scores) if s != 1.0]
    assert failed == []
    assert stats == {"graded": 500, "timeouts": 0, "errors": 0}
    assert elapsed < 30, elapsed  # ~2 s on two idle cores; generous for a loaded CI box


def test_math500_wrong_answers_grade_zero(math_pool, math500):
    problems, _ = math500
    # Integer answers shifted by one (311 of the 500).
    ints = [p for p in problems if re.fullmatch(r"-?\d+", p.answer)]
    assert len(ints) > 250
    # Non-integer answers rotated by one among themselves, skipping pairs that are the same answer.
    others = [p for p in problems if not re.fullmatch(r"-?\d+", p.answer)]
    pairs = [(a, b) for a, b in zip(others, others[1:] + others[:1]) if a.answer != b.answer]
    assert len(pairs) > 150
    responses = [f"so the answer is $\\boxed{{{int(p.answer) + 1}}}$" for p in ints]
    responses += [f"\\boxed{{{b.answer}}}" for _, b in pairs]
    golds = [p.answer for p in ints] + [a.answer for a, _ in pairs]
    scores, stats = math_pool.grade(responses, golds)
    assert stats["timeouts"] == stats["errors"] == 0
    wrong = [g for g, s in zip(golds, scores) if s != 0.0]
    assert wrong == []
    # A right answer that is not boxed scores 0: the grader never parses free text.
    scores, _ = math_pool.grade(["the answer is 5"], ["5"])
    assert scores == [0.0]


def test_math_grader_equivalences():
    g = GRADERS["math"]
    assert g(r"so $\boxed{0.5}$", r"\frac{1}{2}") == 1.0
    assert g(r"\boxed{\dfrac{1}{2}}", r"\frac12") == 1.0
    assert g(r"\boxed{x=3}", "3") == 1.0
    assert g(r"\boxed{3} then \boxed{4}", "3") == 0.0  # last box wins
    assert g(r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}") == 1.0
    assert g(r"\boxed{(1,2)}", "(2,1)") == 0.0
    assert g("no box, 1/2", r"\frac{1}{2}") == 0.0
    assert g(r"\boxed{10{,}000}", "10000") == 1.0 and g(r"\boxed{10000}", r"10{,}000") == 1.0
    assert g(r"\boxed{10,000}", "10000") == 1.0 and g(r"\boxed{10{,}001}", "10000") == 0.0


# Four real MATH train rows (train.jsonl lines 6669, 5419, 1504, 1375) whose last box is a percent.
MATH_PERCENT_ROWS = [
    {"problem": "A burger at Ricky C's weighs 120 grams, of which 30 grams are filler.  What percent of the "
                "burger is not filler?", "level": "Level 2", "type": "Prealgebra",
     "solution": r"There are $120 - 30 = 90$ grams that are not filler.  So $\frac{90}{120} = \boxed{75\%}$ is "
                 r"not filler."},
    {"problem": "What percent of the prime numbers less than 12 are divisible by 2?", "level": "Level 2",
     "type": "Number Theory",
     "solution": r"The prime numbers less than $12$ are $2,3,5,7,11$. Since $2$ is the only even prime out of "
                 r"the five primes less than $12$, the answer is $\frac{1}{5}=\frac{20}{100}=\boxed{20\%}$."},
    {"problem": r"A television's price was discounted $40\%$ and then slashed another $40\%$ during a "
                r"liquidation sale. By what percent has the original price been reduced?", "level": "Level 3",
     "type": "Algebra",
     "solution": r"Let the original price of the television be $T$. Then the price is now $0.6(0.6T)=0.36T$. "
                 r"Thus overall the price has been reduced by $1-0.36=\boxed{64\%}$."},
    {"problem": "On an algebra test, there were $5x$ problems. Lucky Lacy missed $x$ of them. What percent of "
                "the problems did she get correct?", "level": "Level 1", "type": "Algebra",
     "solution": r"If Lucky Lacy missed $x$ out of $5x$ problems, then she must have gotten $5x-x=4x$ of them "
                 r"correct. Therefore, the percentage of problems that Lacy got correct is  "
                 r"$\frac{4x}{5x}=\frac{4}{5}=\frac{80}{100}=\boxed{80 \%}$."},
]


def test_math_percent_answers_grade_as_math_practice(math_pool, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH_PERCENT_ROWS))
    golds = [p.answer for p in load_math(path)]
    assert golds == [r"75\%", r"20\%", r"64\%", r"80 \%"]
    cases = []
    for n, r, g in zip(["75", "20", "64", "80"], MATH_PERCENT_ROWS, golds):
        forms = (n, f"{n}%", f"{n} \\%", f"{n}\\text{{\\%}}", f"{n}\\\\%")
        right = [r["solution"]] + [f"so \\boxed{{{f}}}" for f in forms]
        wrong = [f"\\boxed{{{f}}}" for f in (str(int(n) / 100), f"{int(n) / 100}\\%", f"{int(n) + 1}\\%")]
        # Gold `n\%` (the row's) and the reverse, gold `n`: the bare number and every % form are right, but
        # 25% is not 0.25 (MATH practice takes the bare number as the answer).
        cases += [(resp, gold, want) for gold in (g, n) for resps, want in ((right, 1.0), (wrong, 0.0))
                  for resp in resps]
    scores, stats = math_pool.grade([c[0] for c in cases], [c[1] for c in cases])
    assert stats == {"graded": len(cases), "timeouts": 0, "errors": 0}
    assert [c for c, s in zip(cases, scores) if s != c[2]] == []


def test_math_keys_group_percent_forms():
    # Eval's voting groups by these keys: a percent and its bare number are one vote, 0.25 is another.
    forms = [r"25\%", r"25 \%", "25%", r"25\text{\%}", r"25\\%", "25"]
    assert len({math_key(a) for a in forms}) == 1
    assert len({math_key(a) for a in (r"25\%", "0.25", r"26\%", r"2.5\%")}) == 4
    assert math_key(r"10{,}000") == math_key("10000") == math_key("10,000")


def test_full_math_splits_load():
    # Two MATH train rows have an empty `\boxed{}` as their only answer: an error, or skipped on request.
    with pytest.raises(DataError, match=r"train\.jsonl:5342: missing field 'answer'"):
        load_math("math/train")
    ids = {}
    for split, n in [("train", 7498), ("test", 5000)]:
        problems = load_math(f"math/{split}", skip_invalid=True)
        ids[split] = {p.id for p in problems}
        assert len(problems) == len(ids[split]) == n
        assert all(p.answer.strip() and p.prompt.strip() for p in problems)
        assert problems[0].id == f"{split}:1" and problems[0].source == "math"
    assert {"train:5342", "train:5344"}.isdisjoint(ids["train"]) and "train:5343" in ids["train"]


# ---------------------------------------------------------------------------------------------------------
# extract_boxed


def test_extract_boxed_cases():
    assert extract_boxed(r"\boxed{\frac{a^{2}}{b_{1}}}") == r"\frac{a^{2}}{b_{1}}"
    assert extract_boxed(r"first \boxed{1}, then \boxed{2}.") == "2"
    assert extract_boxed(r"\boxed{1} and \fbox{7}") == "7"
    assert extract_boxed(r"\fbox{x+1}") == "x+1"
    assert extract_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces do not count
    assert extract_boxed(r"\boxed{1} then \boxed{\frac{1}{2}") is None  # last box unbalanced
    assert extract_boxed(r"\boxed{") is None
    assert extract_boxed(r"\boxed 5$.") == "5"  # old MATH form
    assert extract_boxed(r"\boxed{2} \fboxsep=3pt") == "2"  # a longer command is not a box
    assert extract_boxed("no box here") is None
    assert extract_boxed("") is None


def test_extract_boxed_megabyte_inputs_are_fast():
    mb = 1 << 20
    cases = [
        ("x" * mb + r"\boxed{42}", "42"),
        (r"\boxed{" + "{a}" * (mb // 3) + "}", "{a}" * (mb // 3)),
        (r"\boxed{" + "{" * mb, None),  # unbalanced
        (r"\boxed{" * (mb // 7), None),  # many boxes, last unbalanced
        (r"\boxedx" * (mb // 7) + r"\boxed{1}", "1"),  # many non-boxes
        (r"\boxed" + " " * mb, None),
    ]
    for text, want in cases:
        t0 = time.perf_counter()
        assert extract_boxed(text) == want
        assert time.perf_counter() - t0 < 1.0


# Balanced brace strings without backslashes or `$`.
_balanced = st.recursive(
    st.text(alphabet="abc123 +-^_()", max_size=5),
    lambda inner: st.builds(lambda a, b: "{" + a + "}" + b, inner, inner),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(_balanced, st.text(alphabet="xyz 12+", max_size=10))
def test_extract_boxed_roundtrip(content, prefix):
    assert extract_boxed(f"{prefix}\\boxed{{{content}}} done.") == content


# ---------------------------------------------------------------------------------------------------------
# GSM8K


def test_extract_gsm8k_cases():
    assert extract_gsm8k("She pays 3 + 4 = 7, so the answer is 1,234.") == "1234"
    assert extract_gsm8k("Total: 18.00 dollars") == "18"
    assert extract_gsm8k("It changes by -5") == "-5"
    assert extract_gsm8k("16-3-4=9") == "9"
    assert extract_gsm8k("a rate of 2.5 per hour") == "2.5"
    assert extract_gsm8k("$1,000,000 in all") == "1000000"
    assert extract_gsm8k("#### 72\nand 3 more later") == "72"  # after the last ####, not the last number
    assert extract_gsm8k("no numbers at all") is None
    assert extract_gsm8k("#### none") is None


def test_gsm8k_gold_answers_self_grade():
    problems = load_gsm8k("gsm8k/test")
    rows = read_rows("gsm8k/test")
    assert len(problems) == len(rows) == 1319
    grade = GRADERS["gsm8k"]
    for p, r in zip(problems, rows):
        assert re.fullmatch(r"-?\d+(\.\d+)?", p.answer), p
        assert p.answer == r["answer"].split("#### ")[-1].strip().replace(",", ""), p
        assert grade(r["answer"], p.answer) == 1.0, p
        assert grade(r["answer"], str(float(p.answer) + 1)) == 0.0, p
    assert problems[0].prompt == rows[0]["question"] and problems[-1].id == "test/1318"


def test_gsm8k_grader():
    g = GRADERS["gsm8k"]
    assert g("so the answer is 1,234.", "1234") == 1.0
    assert g("it is 0.5", "0.500000001") == 1.0
    assert g("it is 0.5", "0.51") == 0.0
    assert g("no idea", "3") == 0.0
    assert g("3", "three") == 0.0


# ---------------------------------------------------------------------------------------------------------
# GraderPool robustness


def test_pool_survives_timeouts_exceptions_and_dying_workers():
    with GraderPool("_test_chaos", workers=2, timeout_s=1.0) as pool:
        responses = ["a", "sleep", "b", "raise", "c", "exit", "d", "kill", "e", "wrong"]
        golds = ["a", "sleep", "b", "raise", "c", "exit", "d", "kill", "e", "right"]
        t0 = time.perf_counter()
        scores, stats = pool.grade(responses, golds)
        elapsed = time.perf_counter() - t0
        assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
        assert stats == {"graded": 10, "timeouts": 1, "errors": 3}
        assert elapsed < 15, elapsed  # not 30 s: the sleeper was killed after 1 s

        # Both workers stuck at once: both killed and replaced, the call still returns.
        t0 = time.perf_counter()
        scores, stats = pool.grade(["sleep", "x", "sleep", "y"], ["sleep", "x", "sleep", "y"])
        assert scores == [0.0, 1.0, 0.0, 1.0] and stats["timeouts"] == 2
        assert time.perf_counter() - t0 < 15

        # The pool keeps working normally afterwards.
        scores, stats = pool.grade([str(i) for i in range(50)], [str(i) for i in range(50)])
        assert scores == [1.0] * 50 and stats == {"graded": 50, "timeouts": 0, "errors": 0}
        assert pool.grade([], []) == ([], {"graded": 0, "timeouts": 0, "errors": 0})
    with pytest.raises(RuntimeError, match="closed"):
        pool.grade(["a"], ["a"])


def test_a_worker_killed_from_outside_is_replaced_and_its_item_graded_again(tmp_path):
    """The kill lands while the worker is inside its item (it has logged that, and holds the item until the
    kill is done), so the pool must grade that item again: a third "busy" item start is logged."""
    import threading

    import psutil

    busy = f"busy:{tmp_path}"
    with GraderPool("_test_chaos", workers=2, timeout_s=30.0) as pool:
        pool.grade(["warm"], ["warm"])  # both workers started
        before = {w.proc.pid for w in pool._workers}
        killed, failed = [], []
        log = tmp_path / "busy.log"

        def started() -> list[int]:
            return [int(x) for x in log.read_text().split("\n")[:-1]] if log.exists() else []  # whole lines

        def kill_a_busy_worker():
            try:
                deadline = time.monotonic() + 60
                while len(started()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert set(started()) == before, (started(), before)  # both workers are inside a "busy" item
                graders = [c for c in psutil.Process().children() if c.name() == "rlv::grader" and c.pid in before]
                assert len(graders) == 2  # found as `ps` shows them (other tests' pools may be alive too)
                graders[0].kill()
                killed.append(graders[0].pid)
                try:  # dead before the items are released: it cannot answer its item
                    while graders[0].status() != psutil.STATUS_ZOMBIE:
                        time.sleep(0.01)
                except psutil.NoSuchProcess:  # already reaped by the pool
                    pass
            except BaseException as e:
                failed.append(e)
            finally:
                (tmp_path / "release").touch()

        killer = threading.Thread(target=kill_a_busy_worker)
        killer.start()
        scores, stats = pool.grade([busy, busy, "a"], [busy, busy, "a"])
        killer.join()
        if failed:
            raise failed[0]
        now = {w.proc.pid for w in pool._workers}
        assert killed and killed[0] not in now  # replaced
        assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
        # the killed worker's item started again, on the other worker or the replacement
        starts = started()
        assert len(starts) == 3 and starts.count(killed[0]) == 1 and starts[2] in now, (starts, killed, now)
        assert scores == [1.0, 1.0, 1.0] and stats == {"graded": 3, "timeouts": 0, "errors": 0}


def test_pool_rejects_bad_graders():
    with pytest.raises(ValueError, match=r"'no_such_grader'.*'math'"):
        GraderPool("no_such_grader")
    GRADERS["_test_lambda"] = lambda r, g: 1.0
    try:
        with pytest.raises(ValueError, match="module-level"):
            GraderPool("_test_lambda")
    finally:
        del GRADERS["_test_lambda"]
    with pytest.raises(ValueError, match="already registered"):
        register_grader("math")(chaos_grader)
    with GraderPool("exact", workers=1) as pool:
        with pytest.raises(ValueError):
            pool.grade(["a"], [])


# ---------------------------------------------------------------------------------------------------------
# Data loading


def test_read_rows_jsonl_errors(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text('{"problem": "p1", "answer": "1"}\n\n{"problem": "p2", "answer": \n')
    with pytest.raises(DataError, match=r"file\.jsonl:3") as err:
        read_rows(path)
    assert isinstance(err.value, ValueError) and "Expecting value" in str(err.value)

    path.write_text('{"problem": "p1", "answer": "1"}\n\n{"problem": "p2", "solution": "\\\\boxed{2}"}\n')
    assert read_rows(path) == [{"problem": "p1", "answer": "1"}, {"problem": "p2", "solution": "\\boxed{2}"}]
    assert [(p.id, p.answer) for p in load_math(path)] == [("file:1", "1"), ("file:3", "2")]

    path.write_text('{"problem": "p1", "answer": "1"}\n{"solution": "\\\\boxed{2}"}\n')
    with pytest.raises(DataError, match=r"file\.jsonl:2.*'problem'"):
        load_math(path)
    path.write_text('{"problem": "p1", "solution": "no box"}\n')
    with pytest.raises(DataError, match=r"file\.jsonl:1.*'answer'"):
        load_math(path)
    path.write_text('{"question": "q", "answer": "just 5"}\n')
    with pytest.raises(DataError, match=r"file\.jsonl:1.*####"):
        load_gsm8k(path)
    with pytest.raises(DataError, match="missing.jsonl"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data\.csv"):
        read_rows(tmp_path / "data.csv")


def test_parquet_roundtrip(tmp_path):
    rows = read_rows(MATH500)[:20]
    rows[3] = {k: v for k, v in rows[3].items() if k not in ("answer", "unique_id")}  # answer from the box
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_rows(path) == [{**r, **{k: None for k in rows[0].keys() - r.keys()}} for r in rows]
    problems = load_math(path)
    assert [p.prompt for p in problems] == [r["problem"] for r in rows]
    assert [p.answer for p in problems] == [r["answer"] for r in read_rows(MATH500)][:20]
    assert problems[3].id == "math:4" and problems[0].id == rows[0]["unique_id"]
