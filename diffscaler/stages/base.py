"""The stage contract, and the run a stage works in.

A stage is one object with a `name` and four methods over a `Run`:

    preflight(run)             input checks that need no stage to run; raise InputError (before Ray)
    check(run) -> StageCheck   are its outputs there and valid for this config? (cheap: reads files)
    run(run) -> dict           make them (resuming through its own library); returns what it wrote
    outputs(run) -> dict       what the outputs are, for a skipped stage whose manifest lost them

`diffscaler.pipeline` runs the registered stages (`diffscaler.stages.STAGES`) in order; the `ray_jobs/*`
programs call the same objects on a layout of their own, so both flows follow one set of rules.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffscaler import cluster
from diffscaler.artifacts import read_backbone_meta
from diffscaler.config import ExperimentConfig
from diffscaler.stages.manifest import Manifest


class InputError(ValueError):
    """Input that cannot run, found before any stage started; the message names the file or field."""


class StageFailed(RuntimeError):
    """A stage ran and failed for a reason it can name (the pipeline adds the stage's name)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class StageCheck:
    valid: bool  # outputs exist and match the config: the stage can be skipped
    reason: str  # what was found (shown on the progress line and kept in the manifest)


# ------------------------------------------------------------------------------------------------
# The run folder
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLayout:
    """Where each stage writes (all absolute). `of(DIR)` is the pipeline's run folder; a standalone
    program replaces the folder it was given (`of(OUT, adapters_dir=OUT)`).

        DIR/config.json, pipeline.json   the resolved config and the manifest of the latest run
        DIR/shards/<dataset>/            shards + index.json (data.shards_root, relative: inside DIR)
        DIR/backbone/                    backbone.safetensors + .json, metrics.jsonl; DIR/runs/ray/ checkpoints
        DIR/adapters/                    <task>.safetensors (first method), <method>/, logs/, summary.json
        DIR/sweep/                       trials.csv, best.json, the winners, Tune's tune/
        DIR/fid.json, DIR/report.md      scores; the report and its PNGs
    """

    root: Path
    backbone_dir: Path
    adapters_dir: Path
    sweep_dir: Path
    fid_json: Path
    report: Path

    @classmethod
    def of(cls, root: str | Path, **folders: str | Path) -> RunLayout:
        r = Path(root).expanduser().resolve()
        paths = {
            "backbone_dir": r / "backbone",
            "adapters_dir": r / "adapters",
            "sweep_dir": r / "sweep",
            "fid_json": r / "fid.json",
            "report": r / "report.md",
        }
        paths |= {k: Path(v).expanduser().resolve() for k, v in folders.items()}
        return cls(root=r, **paths)

    @property
    def manifest(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def config_json(self) -> Path:
        return self.root / "config.json"

    @property
    def backbone_file(self) -> Path:
        return self.backbone_dir / "backbone.safetensors"


def inside(root: Path, path: str) -> str:
    """Relative local paths go under `root`; absolute paths and URLs stay as they are."""
    if not path or "://" in path:  # empty means "the library's default"; URLs are not local paths
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else str(root / path)


def resolve_run_config(cfg: ExperimentConfig, out_dir: str | Path) -> ExperimentConfig:
    """The config with its relative storage paths placed inside the run folder."""
    root = Path(out_dir).expanduser().resolve()
    backbone = cfg.pipeline.backbone
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, shards_root=inside(root, cfg.data.shards_root)),
        pretrain=dataclasses.replace(cfg.pretrain, storage_path=inside(root, cfg.pretrain.storage_path)),
        sweep=dataclasses.replace(cfg.sweep, storage_path=inside(root, cfg.sweep.storage_path)),
        eval=dataclasses.replace(cfg.eval, cache_dir=inside(root, cfg.eval.cache_dir)),
        # a given backbone is a user file: relative to where the user runs, not to the run folder
        pipeline=dataclasses.replace(
            cfg.pipeline, backbone=str(Path(backbone).expanduser().resolve()) if backbone else ""
        ),
    ).validate()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What every stage reads: the config, the layout, the backbone file, which stages run and are forced,
    the log, the manifest of the run before (`previous`) and of this one (`manifest`), the Ray connection."""

    cfg: ExperimentConfig
    layout: RunLayout
    backbone: Path  # the backbone every stage after pretrain reads
    selected: tuple[str, ...] = ()  # the stages this run runs (a standalone program: its own)
    force: tuple[str, ...] = ()  # stages to redo although their outputs are valid
    log: Callable[[str], None] = _stderr
    previous: Manifest | None = None  # the manifest found on disk before this run
    manifest: Manifest | None = None  # this run's manifest (the report shows its stages)
    on_connect: Callable[[], None] | None = None  # called after this run started Ray (the pipeline traps SIGTERM)
    started_ray: bool = field(default=False, init=False)

    @classmethod
    def in_folder(cls, cfg: ExperimentConfig, out_dir: str | Path, **kw: Any) -> Run:
        """The pipeline's run: a given .safetensors backbone is read in place, else DIR/backbone/ is."""
        layout = RunLayout.of(out_dir)
        cfg = resolve_run_config(cfg, layout.root)
        given = cfg.pipeline.backbone
        backbone = Path(given) if given.endswith(".safetensors") else layout.backbone_file
        return cls(cfg=cfg, layout=layout, backbone=backbone, **kw)

    @classmethod
    def for_program(
        cls,
        cfg: ExperimentConfig,
        stage: str,
        out: str | Path = ".",
        *,
        backbone: str | Path = "",
        force: bool = False,
        **folders: str | Path,
    ) -> Run:
        """A standalone program's run of one stage: its --out is the folder it names (`adapters_dir=OUT`)."""
        layout = RunLayout.of(out, **folders)
        return cls(
            cfg=cfg,
            layout=layout,
            backbone=Path(backbone) if backbone else layout.backbone_file,
            selected=(stage,),
            force=(stage,) if force else (),
        )

    @property
    def given_backbone(self) -> str:
        return self.cfg.pipeline.backbone

    def backbone_hash(self) -> str:
        return read_backbone_meta(self.backbone)["content_hash"]

    def previous_outputs(self, stage: str) -> dict[str, Any] | None:
        """The outputs `stage` recorded in the run before, if it finished there (done or skipped)."""
        record = self.previous.stages.get(stage) if self.previous is not None else None
        return record.outputs if record is not None and record.status in ("done", "skipped") else None

    def connect(self) -> None:
        """Join the cluster once for every stage (diffscaler.cluster decides which: pipeline.ray_address, else
        RAY_ADDRESS as set by `ray job submit`, else a new local cluster)."""
        if cluster.connect_ray(self.cfg):
            self.started_ray = True
            if self.on_connect is not None:
                self.on_connect()

    def disconnect(self) -> None:
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False


class Stage:
    """One pipeline stage; see the module docstring. Subclasses set `name` and override the methods."""

    name: str = ""

    def needs_ray(self, run: Run) -> bool:
        return True  # the pipeline joins the cluster before run() (once, for every stage)

    def preflight(self, run: Run) -> None:
        """Raise InputError for input this stage cannot run on (called only when the stage is selected)."""

    def check(self, run: Run) -> StageCheck:
        return StageCheck(False, "no check: always run")

    def run(self, run: Run) -> dict[str, Any]:
        raise NotImplementedError

    def outputs(self, run: Run) -> dict[str, Any]:
        return {}
