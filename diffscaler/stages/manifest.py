"""DIR/pipeline.json: the record of a pipeline run, per stage its status, wall time, outputs and reason.

The pipeline writes it after every change; the stages read it (a stage's outputs from the run before,
the report's table of stages), so a rerun knows what is done and a reader what happened.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffscaler.atomic import write_text_atomic
from diffscaler.errors import NO_SPACE

MANIFEST_FORMAT = "diffscaler-pipeline"
MANIFEST_FORMAT_VERSION = 1


def now() -> str:
    """Local time, ISO 8601 to the second (the manifest's timestamps)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class StageRecord:
    name: str
    status: str = "pending"  # pending | running | done | skipped | failed | interrupted | not selected
    reason: str = ""  # why skipped, or the error
    wall_s: float | None = None  # seconds this stage ran in its latest run (None = never ran)
    started_at: str = ""  # local time, ISO 8601
    finished_at: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)  # files and numbers the stage produced


@dataclass
class Manifest:
    """DIR/pipeline.json, rewritten atomically after every change."""

    out_dir: str
    status: str = "running"  # running | done | failed | interrupted
    started_at: str = ""
    finished_at: str = ""
    wall_s: float = 0.0  # seconds of the latest run of the whole pipeline
    error: str = ""
    stages: dict[str, StageRecord] = field(default_factory=dict)

    @classmethod
    def start(cls, out_dir: str, stages: Iterable[str], selected: Iterable[str], previous: Manifest | None) -> Manifest:
        """A new run's manifest: the selected stages pending, every other one keeping its last known record
        (an unselected stage shows what it made; one left "running" by a killed run is "interrupted")."""
        manifest, selected = cls(out_dir, started_at=now()), set(selected)
        for name in stages:
            old = previous.stages.get(name) if previous is not None else None
            status = "interrupted" if old and old.status == "running" else old.status if old else "not selected"
            status = "pending" if name in selected else status
            manifest.stages[name] = dataclasses.replace(old or StageRecord(name), status=status)
        return manifest

    def save(self, path: Path) -> None:
        d = dataclasses.asdict(self) | {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_FORMAT_VERSION,
            "units": {"wall_s": "seconds (wall clock)"},
        }
        text = json.dumps(d, indent=2, sort_keys=True, default=str) + "\n"
        try:
            write_text_atomic(path, text)
        except OSError as err:
            if err.errno not in NO_SPACE or not path.is_file():
                raise
            # A full disk: the atomic write needs room for a second copy. Overwriting the old file reuses its
            # blocks, so the record still says what happened ("failed", not "running"); a crash in the middle
            # would leave broken JSON, which `load` treats as no manifest.
            with open(path, "r+") as f:
                f.truncate(0)
                f.write(text)

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        """The manifest at `path`, or None when there is none (a broken one is replaced)."""
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("format") != MANIFEST_FORMAT:
            return None
        stages = {k: StageRecord(**v) for k, v in data.get("stages", {}).items()}
        keep = ("out_dir", "status", "started_at", "finished_at", "wall_s")
        return cls(**{k: data[k] for k in keep}, error=data.get("error", ""), stages=stages)
