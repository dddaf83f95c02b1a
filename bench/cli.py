"""What every section's ``python -m`` entry point does with its result: print the summary, and write
the figures as JSON and the section as Markdown when asked."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def report(res: dict[str, Any], summary: Callable[[dict[str, Any]], str], markdown: Callable[[dict[str, Any]], str],
           json_path: Path | None, markdown_path: Path | None) -> int:
    print(summary(res))
    if "elapsed_s" in res:
        print(f"  (run took {res['elapsed_s']:.0f} s)")
    if json_path:
        json_path.write_text(json.dumps(res, indent=1, default=str))
    if markdown_path:
        markdown_path.write_text(markdown(res))
    return 0
