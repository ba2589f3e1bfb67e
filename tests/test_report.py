"""A run's human-facing outputs: the scaling table, the headline line and the plot."""

from rlv_megatron.eval import report

FINAL = {"pass@1": 0.38, "pass@2": 0.5, "majority@1": 0.38, "majority@2": 0.41, "weighted@1": 0.38,
         "weighted@2": 0.47, "verifier_auc_within_prompt": 0.8, "num_problems": 500}


def test_table_has_a_row_per_k_and_the_other_metrics():
    lines = report.table(FINAL).splitlines()
    assert lines[0] == "| k | pass | majority | weighted |"
    assert lines[3] == "| 2 | 0.500 | 0.410 | 0.470 |"
    assert "verifier_auc_within_prompt: 0.800" in lines and "num_problems: 500" in lines


def test_headline_states_the_gain_at_the_largest_k():
    line = report.headline(FINAL)
    assert "majority@2 0.410" in line and "weighted@2 0.470 (+6.0 points" in line and "prompt 0.800" in line
    assert report.headline({"num_problems": 0}) == ""


def test_plot_writes_a_png(tmp_path):
    history = [{"step": s, "reward/mean": 0.1 * s, "verifier/auc_within_prompt": None} for s in range(3)]
    report.plot(history, FINAL, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
