"""What the run records (``<suite>/runs/<run-id>.json``) say about a suite beyond its cells:
its description and the notes its author wrote for readers (e.g. "MMLU on 57 questions is a
smoke signal"), so the report - a function of result files - can show them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def suite_notes(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """suite -> {"description", "notes"} from the latest run record under each path (a
    results root, a suite folder, or a folder holding several); unreadable records are
    skipped (they say nothing about the numbers)."""
    latest: dict[str, tuple[str, dict[str, Any]]] = {}
    for root in paths:
        root = Path(root)
        for path in sorted(root.glob("runs/*.json")) + sorted(root.glob("*/runs/*.json")):
            if path.is_symlink():
                continue
            try:
                run = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(run, dict) or not isinstance(run.get("suite"), str):
                continue
            notes = run.get("notes")
            facts = {"description": str(run.get("description") or ""),
                     "notes": [str(n) for n in notes] if isinstance(notes, list) else []}
            rid = str(run.get("run_id") or "")
            if run["suite"] not in latest or rid >= latest[run["suite"]][0]:
                latest[run["suite"]] = (rid, facts)
    return {suite: facts for suite, (_, facts) in latest.items()}
