"""The reproduction's report (experiments/report.py): tables and the settling line on synthetic runs."""

from __future__ import annotations

from fdpg_scale.experiments.report import _settling, _size_table, _table
from fdpg_scale.experiments.stats import METRICS, summarize
from tests.experiments.synthetic import HIGH, LOW, synthetic_cells


def test_settling_line_compares_last_change_with_the_interval():
    cells = synthetic_cells({("a", "small"): {"kl": LOW, "js": HIGH}})
    for c in cells:   # kl moves by -0.01 over its last interval (within its ±0.25), js by -1.0 (beyond ±0.25)
        last = c["policy"]["kl_p_pi"]
        c["curve"] = [{"kl_p_pi": 9.0}, {"kl_p_pi": last + (0.01 if c["divergence"] == "kl" else 1.0)},
                      {"kl_p_pi": last}]
    line = _settling(cells, summarize(cells)["a"]["small"])
    assert "kl -0.010 (within ±0.248)" in line and "js -1.000 (beyond ±0.248)" in line


def test_size_table_puts_sizes_in_order_with_their_parameters():
    summary = summarize(synthetic_cells({("a", "large"): {"kl": LOW, "js": HIGH},
                                         ("a", "small"): {"kl": HIGH, "js": LOW}}))
    bases = {"small": {"parameters": 100_000}, "large": {"parameters": 2_000_000}}
    lines = _size_table(summary["a"], ["small", "large"], bases).splitlines()
    assert lines[0] == "| model | small (0.10 M) | large (2.00 M) |"
    kl_row = next(line for line in lines if line.startswith("| f-DPG kl |"))
    assert kl_row.index("3.000") < kl_row.index("1.000")        # small's mean (HIGH) first, then large's (LOW)


def test_cell_table_has_a_column_per_metric_and_a_row_per_model():
    row = summarize(synthetic_cells({("a", "small"): {"kl": LOW, "js": HIGH}}))["a"]["small"]
    lines = _table(row).splitlines()
    assert lines[0] == "| model | " + " | ".join(label for _, label in METRICS) + " |"
    assert [line.split(" |")[0] for line in lines[2:]] == ["| base model a", "| f-DPG kl", "| f-DPG js"]
    assert "1.000 ± 0.248" in lines[3] and "0.500 |" in lines[2]          # the base: one evaluation, no ±
