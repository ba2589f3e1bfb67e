"""Adversarial model answers through the grading pool (hypothesis): deep nesting, huge exponents, megabyte
strings, unbalanced braces, several boxes. Every item comes back within its time limit (plus a worker's
restart) and scores 0, and the item whose last box holds the gold answer scores 1 (graded, not timed out)."""

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlv_megatron.eval.equivalence import AnswerKeys
from rlv_megatron.tasks.graders import GraderPool

TIMEOUT_S = 2.0
RESTART_S = 20.0  # a replaced worker imports sympy before it takes the next item (loaded 2-core machine)
# gold answers of MATH-500 that none of the adversarial strings below can equal
GOLDS = [r"\frac{14}{3}", r"\left( 3, \frac{\pi}{2} \right)", r"p - q", r"\text{Evelyn}", r"6 - 5i", r"[-2,7]"]

_depth = st.integers(1, 3000)
_nested = st.one_of(
    _depth.map(lambda d: "{" * d + "7" + "}" * d),
    _depth.map(lambda d: r"\frac{" * d + "1}{2}" * d),
    _depth.map(lambda d: r"\sqrt{" * d + "2" + "}" * d),
    _depth.map(lambda d: "(" * d + "x" + ")" * d),
)
_huge = st.one_of(
    st.integers(2, 12).map(lambda n: f"2^{{10^{{{n}}}}}"),
    st.integers(2, 6).map(lambda n: "10^{" * n + "10" + "}" * n),
    st.integers(5, 9).map(lambda n: f"(1+x)^{{{10 ** n}}}"),
    st.integers(3, 7).map(lambda n: f"{9}!" * n),
    st.integers(50, 400).map(lambda n: "9^{" * n + "9" + "}" * n),
)
_megabyte = st.one_of(
    st.sampled_from(["1", "x+", r"\frac", "{", "}", "\\", "$", " ", "^{2}", r"\boxed{"]).map(
        lambda s: s * ((1 << 20) // len(s))),
    st.integers(1, 8).map(lambda k: ("x" * (1 << 20)) + "=" + "1" * k),
)
_unbalanced = st.one_of(
    st.text(alphabet="{}\\boxed frac12^_()[]$", min_size=1, max_size=60),
    st.integers(1, 500).map(lambda d: r"\boxed{" + "{" * d + "3"),
    st.integers(1, 500).map(lambda d: "3" + "}" * d),
)
_boxes = st.lists(st.sampled_from(["1", "x", r"\frac{1}{2}", "{", "}", r"\infty", ""]), min_size=2, max_size=30).map(
    lambda xs: " and ".join(rf"\boxed{{{x}}}" for x in xs))
ADVERSARIAL = st.one_of(_nested, _huge, _megabyte, _unbalanced, _boxes)
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def math_pool():
    with GraderPool("math", workers=2, timeout_s=TIMEOUT_S) as pool:
        yield pool


@pytest.fixture(scope="module")
def answer_keys():
    with AnswerKeys(workers=2, timeout_s=TIMEOUT_S) as keys:
        yield keys


@SETTINGS
@given(ADVERSARIAL, st.sampled_from(GOLDS))
def test_adversarial_answers_score_zero_or_right_within_the_limit(math_pool, answer, gold):
    responses = [rf"The answer is $\boxed{{{answer}}}$.", answer,
                 answer + rf" so the answer is $\boxed{{{gold}}}$"]  # the last box holds the gold answer
    t0 = time.perf_counter()
    scores, stats = math_pool.grade(responses, [gold] * 3)
    assert time.perf_counter() - t0 < len(responses) * TIMEOUT_S + RESTART_S
    assert scores[0] == 0.0 and scores[1] == 0.0  # graded 0, or timed out / failed (the adversarial items)
    # The gold box is last, so extraction yields the gold answer whatever precedes it: math-verify only ever
    # sees the gold string, which it parses in well under TIMEOUT_S. That item must grade cleanly to 1, so a
    # pool (or grader) where every item errors or times out fails here instead of passing on "0 and an error".
    assert scores[2] == 1.0, (scores, stats)
    assert stats["timeouts"] + stats["errors"] <= 2, stats  # only the two adversarial items may fail
    assert stats["graded"] == 3


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(ADVERSARIAL, min_size=1, max_size=3))
def test_adversarial_answers_get_canonical_keys_within_the_limit(answer_keys, answers):
    t0 = time.perf_counter()
    got = answer_keys.keys("math", answers + [r"\frac{14}{3}"])
    assert time.perf_counter() - t0 < (len(answers) + 1) * TIMEOUT_S + RESTART_S
    assert all(isinstance(k, str) for k in got.values())
    assert got[r"\frac{14}{3}"] == "4.66666666667"
    assert [a for a in answers if got[a] == got[r"\frac{14}{3}"]] == []


def test_map_returns_values_and_grade_counts_non_numbers_as_errors():
    with GraderPool("math_key", workers=1, timeout_s=10.0) as pool:
        assert pool.map([r"\frac{1}{2}", "x+1"], ["", ""]) == (["0.5", "x:1.5772156649"],
                                                               {"graded": 2, "timeouts": 0, "errors": 0})
        assert pool.grade([r"\frac{1}{2}", "x+1"], ["", ""]) == ([0.5, 0.0], {"graded": 2, "timeouts": 0, "errors": 1})
