"""docs/RESULTS.md is generated from the metrics JSON, and the committed page matches the committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

from toolvlm.evaluation.results import render

ROOT = Path(__file__).resolve().parents[1]


def test_render_tables_every_scalar_and_skips_turns(tmp_path):
    path = tmp_path / "metrics_x.json"
    path.write_text(
        json.dumps({"n": 3, "SR": 0.123456, "turns": [1, 2], "shifted": {"describe_f1": 0.5, "ood": None}})
    )
    page = render([path])
    assert "| SR | 0.1235 |" in page and "| n | 3 |" in page
    assert "## metrics_x / shifted" in page or "### metrics_x / shifted" in page
    assert "| ood | null |" in page and "turns" not in page


def test_the_experiment_log_becomes_the_last_section(tmp_path):
    metrics, log = tmp_path / "metrics_x.json", tmp_path / "experiments.json"
    metrics.write_text(json.dumps({"n": 3}))
    log.write_text(
        json.dumps({"about": "runs", "records": [{"part": "detector", "figures": "AP 0.9", "command": "c"}]})
    )
    page = render([metrics], log)
    assert page.index("## metrics_x") < page.index("## Experiments")
    assert "| detector | AP 0.9 | c |" in page and "experiments.json" in page.splitlines()[2]


def test_committed_results_page_is_up_to_date():
    files = sorted((ROOT / "bundle").glob("metrics_*.json"))
    page = render(files, ROOT / "docs" / "experiments.json")
    assert (ROOT / "docs" / "RESULTS.md").read_text() == page
