"""The output directory's manifest: one JSON line per finished or failed job, and atomic file writes.

A job counts as finished only when its latest line says ``done`` and each file it lists exists with
the recorded size. Images are written to a ``.part`` file and renamed, and the line is appended
after the rename, so a run killed at any point leaves no half-written file that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.jsonl"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so that ``path`` is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, path)


class Manifest:
    """The JSON-lines manifest of one output directory."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / MANIFEST

    def records(self) -> list[dict]:
        """Every complete record, in order; a line cut short by a kill is skipped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record:
                records.append(record)
        return records

    def latest(self) -> dict[str, dict]:
        """The last record of each job id."""
        return {record["id"]: record for record in self.records()}

    def is_complete(self, record: dict) -> bool:
        """Whether a record is ``done`` and all its files are on disk at their recorded sizes."""
        if record.get("status") != "done":
            return False
        try:
            return all((self.out / f["path"]).stat().st_size == f["bytes"] for f in record["files"])
        except (OSError, KeyError, TypeError):
            return False

    def finished(self) -> set[str]:
        """Ids of the jobs that need not run again."""
        return {job_id for job_id, record in self.latest().items() if self.is_complete(record)}

    def append(self, record: dict) -> None:
        """Add one record as one line, flushed to disk before returning."""
        self.out.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "ab+") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell():  # a kill mid-line leaves no newline: start on a fresh line
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
