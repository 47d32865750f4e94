"""The reproduction's report (experiments/report.py): tables and the settling line on synthetic runs; the
verdicts judged again from a recorded results.json (``fdpg-scale reproduce --rejudge``)."""

from __future__ import annotations

import json
from pathlib import Path

from fdpg_scale.apps.cli import main as cli_main
from fdpg_scale.experiments.grid import Grid
from fdpg_scale.experiments.report import (_settling, _size_table, _table, closeness_table, verdict_lines,
                                          write_results)
from fdpg_scale.experiments.stats import METRICS, summarize
from fdpg_scale.experiments.verdicts import claim_verdicts
from fdpg_scale.models.base_config import PretrainConfig
from tests.experiments.synthetic import HIGH, LOW, WIDE, synthetic_cells


def test_settling_line_compares_last_change_with_the_interval():
    cells = synthetic_cells({("a", "small"): {"kl": LOW, "js": HIGH}})
    for c in cells:   # kl moves by -0.01 over its last interval (within its ±0.25), js by -1.0 (beyond its ±0.50)
        last = c["policy"]["kl_p_pi"]
        c["curve"] = [{"kl_p_pi": 9.0}, {"kl_p_pi": last + (0.01 if c["divergence"] == "kl" else 1.0)},
                      {"kl_p_pi": last}]
    line = _settling(cells, summarize(cells)["a"]["small"])
    assert "kl -0.010 (within ±0.248)" in line and "js -1.000 (beyond ±0.497)" in line


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


def test_closeness_table_counts_seeds_closer_to_p_than_their_own_base():
    cells = synthetic_cells({("a", "small"): {"kl": LOW, "js": HIGH}})
    for c in cells:   # each seed's base on its own draws: 2.0, 1.0, 3.0
        c["base"]["kl_p_pi"] = [2.0, 1.0, 3.0][c["seed"]]
        c["policy"]["kl_p_pi_draws"] = 100 + c["seed"]
    lines = closeness_table(cells).splitlines()
    assert lines[0].startswith("| task | size | divergence | seeds closer to p |")
    # kl (1.0, 1.1, 0.9): gains +1.0, -0.1, +2.1 -> 2 of 3; js (3.0, 3.2, 2.8): -1.0, -2.2, +0.2 -> 1 of 3
    assert lines[2] == "| a | small | kl | 2/3 | +1.000, -0.100, +2.100 | -0.100 | 100, 101, 102 |"
    assert lines[3] == "| a | small | js | 1/3 | -1.000, -2.200, +0.200 | -2.200 | 100, 101, 102 |"


def test_verdict_lines_give_each_test_with_its_interval_and_holm_p():
    cells = synthetic_cells({("a", "small"): {"kl": HIGH, "js": LOW}, ("b", "small"): {"kl": WIDE, "js": LOW}})
    verdicts = claim_verdicts(cells, ["small"], {"small": 1000})
    text = "\n".join(verdict_lines(verdicts))
    assert "**Claim 2: " in text and "| cell | comparison | metric | test | n | difference [95% CI] |" in text
    two = verdicts[1]["tests"]
    row = next(line for line in text.splitlines() if line.startswith("| a/small | kl − js | kl_p_pi | paired | 3 |"))
    assert f"{two[0]['diff']:+.3f} [{two[0]['lo']:+.3f}, {two[0]['hi']:+.3f}]" in row
    assert row.endswith(f"{two[0]['p_holm']:.3g} * |")                        # significant after Holm


def _recorded(tmp_path, spec: dict, parameters: dict):
    """A results.json as ``reproduce`` writes it, reduced to what --rejudge reads."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": synthetic_cells(spec),
                                "bases": {s: {"parameters": n} for s, n in parameters.items()}}))
    return path


def test_cli_rejudge_recomputes_verdicts_from_a_results_file(tmp_path, capsys):
    spec = {("a", "large"): {"kl": LOW, "js": HIGH}, ("a", "small"): {"kl": LOW, "js": HIGH}}
    results = _recorded(tmp_path, spec, {"large": 2_000_000, "small": 100_000})
    out = tmp_path / "judged"
    assert cli_main(["reproduce", "--rejudge", str(results), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"verdicts: {out / 'verdicts.md'}"
    judged = json.loads((out / "verdicts.json").read_text())
    # the sizes ordered by parameter count (small first), whatever the order of the file
    expected = claim_verdicts(synthetic_cells(spec), ["small", "large"], {"small": 100_000, "large": 2_000_000})
    assert judged["verdicts"] == json.loads(json.dumps(expected)) and judged["alpha"] == 0.05
    assert judged["verdicts"][2]["tests"][0]["cell"] == "a/large"
    assert "**Claim 3: holds.**" in (out / "verdicts.md").read_text()


def test_cli_rejudge_rejects_a_file_that_is_not_results_json(tmp_path, capsys):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"runs": []}))
    assert cli_main(["reproduce", "--rejudge", str(bad), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"fdpg-scale: config error: {bad}: no 'bases' key: not the results.json of "
                                       f"fdpg-scale reproduce\n")
    assert cli_main(["reproduce", "--rejudge", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "results file not found" in capsys.readouterr().err


def test_write_results_judges_the_runs_and_renders_the_tests(tmp_path):
    spec = {("a", "small"): {"kl": LOW, "js": HIGH}, ("a", "large"): {"kl": LOW, "js": HIGH}}
    cells = synthetic_cells(spec)
    for c in cells:
        c["seconds"] = {"train": 1.0, "eval": 1.0}
        c["curve"] = [{"samples": 0, "alignment": 0.5, "kl_p_pi": 2.0},
                      {"samples": 8, "alignment": 0.5, "kl_p_pi": c["policy"]["kl_p_pi"]}]
    grid = Grid(name="t", sizes={"small": PretrainConfig(), "large": PretrainConfig()},
                cells=((Path("a.yaml"), "small"), (Path("a.yaml"), "large")), divergences=("kl", "js"))
    bases = {"small": {"parameters": 1000, "model_ppl": 9.0, "unigram_ppl": 99.0},
             "large": {"parameters": 8000, "model_ppl": 8.0, "unigram_ppl": 99.0}}
    report = write_results(tmp_path, grid, bases, cells, command="test", seconds=None)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["verdicts"] == json.loads(json.dumps(claim_verdicts(cells, ["small", "large"],
                                                                       {"small": 1000, "large": 8000})))
    assert results["verdicts"][2]["verdict"] == "holds"
    text = report.read_text()
    assert "## Closer to p than the base, seed by seed" in text and "| a | large | js | 0/3 |" in text
    assert "**Claim 3: holds.**" in text and "| a | slope of (js − kl) per ln(parameters) | kl_p_pi | slope | 6 |" in text
