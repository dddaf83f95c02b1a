"""`make bench` keeps working: the quick profile runs end to end and writes its page."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_bench_quick_writes_its_page(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    run = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    page = out.read_text()
    assert "## Targets" in page and "dispatch+complete" in page and "10,000" in page


def test_one_command_writes_the_page(tmp_path: Path) -> None:
    """`python -m bench` (what `make bench` runs) composes its page; the store section alone is fast."""
    out = tmp_path / "page.md"
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--sections", "store", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    page = out.read_text()
    assert page.startswith("# Benchmarks") and "python -m bench --quick --sections store" in page
    assert "## Store level" in page and "### Targets" in page and "Raw numbers" not in page


def test_the_baseline_section_runs_both_trees(tmp_path: Path) -> None:
    """`python -m bench.baseline` runs the pair loop with this code and with the earlier commit's (a git
    worktree of it), and reports both side by side."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: the earlier commit cannot be read")
    out = tmp_path / "baseline.json"
    run = subprocess.run([sys.executable, "-m", "bench.baseline", "--rounds", "1", "--window", "0.5", "--e2e-rounds", "0",
                          "--instr-pairs", "32", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    for tree in ("before", "now"):
        assert res["median"][tree]["pairs_per_s"] > 0
        # dispatch and complete, one call each (calls in flight at the window's edges aside)
        assert res["median"][tree]["script_calls_per_pair"] == pytest.approx(2.0, abs=0.1)
        assert res["median"][tree]["commands_per_pair"] > 0
    if shutil.which("valgrind"):  # the server's instructions, counted under callgrind
        assert res["instructions"]["now"] > 0 and res["instructions"]["before"] > 0
        assert "| server instructions (callgrind: 32 pairs" in run.stdout
    assert res["base_commit"].startswith("03bc8cc")
    assert "| Redis commands the scripts issue |" in run.stdout
    assert not any("dragoman-baseline-" in line for line in
                   subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, cwd=root).stdout.splitlines())
