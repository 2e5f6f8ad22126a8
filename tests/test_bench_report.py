"""bench/report.py: docs/benchmarks.md's tables are the committed JSON rendered, and a benchmark's
--json output renders into a table naming its command and machine."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_page_matches_the_committed_results(report):
    assert report.main(["--check"]) == 0, "run: python bench/report.py"


def test_the_page_has_measured_tables_and_says_what_is_not_measured(report):
    text = report.PAGE.read_text()
    files = [m["file"] for m in report.BLOCK.finditer(text)]
    measured = [name for name in files if (report.PAGE.parent / "benchmarks" / name).is_file()]
    assert measured, "docs/benchmarks.md has no table generated from a committed JSON"
    assert text.count("*Not yet measured*") == len(files) - len(measured)


def test_catalog_scale_json_renders_with_its_command(report, tmp_path):
    out = tmp_path / "catalog_scale.json"
    command = [sys.executable, str(BENCH / "catalog_scale.py"), "--rows", "3000", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    text = report.render(out)
    assert "3,000 synthetic header rows" in text
    assert "| label (7/30/68) |" in text
    assert f"python bench/catalog_scale.py --rows 3000 --json {out}" in text


def test_a_stale_table_is_reported(report, tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    out = tmp_path / "benchmarks" / "results" / "catalog_scale.json"
    subprocess.run(
        [sys.executable, str(BENCH / "catalog_scale.py"), "--rows", "2000", "--json", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    page = tmp_path / "page.md"
    page.write_text("# t\n<!-- table: results/catalog_scale.json -->\nold\n<!-- end table -->\n")
    assert report.main(["--page", str(page), "--check"]) == 1
    assert report.main(["--page", str(page)]) == 0
    assert report.main(["--page", str(page), "--check"]) == 0
    assert "2,000 synthetic header rows" in page.read_text()
