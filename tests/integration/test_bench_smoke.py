"""`make bench` keeps working: the quick profile runs end to end and writes its page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


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
