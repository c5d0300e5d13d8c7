"""The whole pipeline as one program: the registered stages in order, with a manifest (DIR/pipeline.json).

    manifest = run_pipeline(cfg, "runs/demo")   # what `python -m ray_jobs.pipeline` runs; joins or starts Ray

Each stage owns its rules (`diffscaler/stages/`); this loop only locks DIR, preflights every selected stage
before the first runs (bad input never reaches Ray), skips stages whose outputs are valid unless forced, and
records each in the manifest, so a rerun after a failure, Ctrl-C or SIGTERM continues where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from diffscaler.atomic import write_text_atomic
from diffscaler.config import ExperimentConfig
from diffscaler.errors import no_space_message
from diffscaler.interrupts import SigtermAsInterrupt, sigint_handler_kept
from diffscaler.runlock import RunFolderError, RunLock
from diffscaler.stages import STAGES, Run, RunLayout, Stage, StageCheck, StageFailed, resolve_run_config, stage_order
from diffscaler.stages.base import InputError as PipelineInputError
from diffscaler.stages.inputs import check_run_inputs
from diffscaler.stages.manifest import Manifest, now

__all__ = [
    "Pipeline",
    "PipelineInputError",
    "PipelineStageError",
    "RunLayout",
    "StageCheck",
    "resolve_run_config",
    "run_pipeline",
    "stage_order",
]


class PipelineStageError(RuntimeError):
    """A stage ran and failed; the message names the stage and why. Finished stages are kept."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"stage {stage!r} failed: {reason}")
        self.stage, self.reason = stage, reason


class Pipeline:
    """One run folder, one resolved config, the registered stages. `preflight()` then `run()`."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: str | Path,
        *,
        force: Sequence[str] = (),
        log: Callable[[str], None] | None = None,
        stages: Sequence[Stage] = STAGES,
    ):
        self.stages = {s.name: s for s in stages}  # the registry is the one list of stage names (config has none)
        for what, names in (("force", force), ("pipeline.stages", cfg.pipeline.stages)):
            if unknown := [s for s in names if s not in self.stages]:
                raise PipelineInputError(f"{what}: unknown stage(s) {unknown}; stages are {list(self.stages)}")
        self.ctx = Run.in_folder(cfg, out_dir, force=tuple(force), **({"log": log} if log else {}))
        self.sigterm = SigtermAsInterrupt()  # the manifest then says "interrupted"
        self.ctx.on_connect = self.sigterm.install  # ray.init installs Ray's own SIGTERM handler, which aborts
        self.cfg, self.layout, self.log = self.ctx.cfg, self.ctx.layout, self.ctx.log
        self.order = stage_order(self.cfg, stages)
        wanted = self.cfg.pipeline.stages or self.order  # none named: every stage
        self.selected = self.ctx.selected = tuple(s for s in self.order if s in wanted)
        self.manifest = Manifest(str(self.layout.root))  # replaced by run()
        self._unsaved = False  # a manifest write failed while an error was reported (said once)

    def preflight(self) -> None:
        """Every check that needs no stage to run; raises PipelineInputError naming the problem."""
        stages = list(self.cfg.pipeline.stages)  # known and distinct (checked in __init__ and by config)
        if stages and stages != list(self.selected):
            raise PipelineInputError(
                f"pipeline.stages {stages} is out of order; stages run as {list(self.order)}, "
                f"write them in that order: {list(self.selected)}"
            )
        check_run_inputs(self.ctx)
        for name in self.selected:
            self.stages[name].preflight(self.ctx)

    def run(self) -> Manifest:
        """Lock the run folder, preflight, then every selected stage in order (manifest saved after each change)."""
        try:  # a second pipeline on this folder would silently replace the first one's files
            lock = RunLock(self.layout.root, "ray_jobs.pipeline", log=self.log)
            lock.acquire()
        except RunFolderError as err:
            raise PipelineInputError(str(err)) from None
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> Manifest:
        self.preflight()
        t0 = time.perf_counter()
        self.ctx.previous = previous = Manifest.load(self.layout.manifest)
        self.ctx.manifest = self.manifest = Manifest.start(str(self.layout.root), self.stages, self.selected, previous)
        self.sigterm.install()
        try:
            write_text_atomic(self.layout.config_json, self.cfg.to_json() + "\n")
            self.manifest.save(self.layout.manifest)
            for number, name in enumerate(self.selected, 1):
                self._run_stage(self.stages[name], f"[pipeline] ({number}/{len(self.selected)}) {name}")
            self.manifest.status = "done"
        except KeyboardInterrupt:
            self.manifest.status = "interrupted"
            self.manifest.error = "interrupted (Ctrl-C or SIGTERM); finished stages are kept"
            raise
        except Exception as err:
            self.manifest.status, self.manifest.error = "failed", no_space_message(err) or str(err)
            raise
        finally:
            self.manifest.finished_at, self.manifest.wall_s = now(), time.perf_counter() - t0
            try:
                self._save_manifest(reporting=self.manifest.status != "done")
            finally:
                self.ctx.disconnect()
                self.sigterm.restore()
        where = self.layout.report if "report" in self.selected else self.layout.root
        self.log(f"[pipeline] done in {self.manifest.wall_s:.1f} s: {where}")
        return self.manifest

    def _run_stage(self, stage: Stage, label: str) -> None:
        record, run = self.manifest.stages[stage.name], self.ctx
        try:
            check = stage.check(run)
        except Exception as err:  # outputs that cannot even be inspected are not valid: run the stage
            check = StageCheck(False, f"outputs cannot be checked ({type(err).__name__}: {err})")
        if check.valid and stage.name not in run.force:
            record.status, record.reason = "skipped", check.reason
            record.outputs = record.outputs or stage.outputs(run)
            self.manifest.save(self.layout.manifest)
            self.log(f"{label}: skipped, {check.reason}")
            return
        self.log(f"{label}: started ({check.reason})")
        record.status, record.reason, record.started_at, record.finished_at = "running", check.reason, now(), ""
        record.wall_s = None
        self.manifest.save(self.layout.manifest)
        t0 = time.perf_counter()
        try:
            with sigint_handler_kept():  # Ctrl-C keeps interrupting the later stages
                if stage.needs_ray(run):
                    run.connect()  # one connection for every stage
                record.outputs = stage.run(run)
        except KeyboardInterrupt:
            record.status, record.reason = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
            raise
        except Exception as err:
            failed = isinstance(err, StageFailed)
            # a full disk is named once, with its file, not as the chain of errors it set off
            reason = no_space_message(err) or (err.reason if failed else f"{type(err).__name__}: {err}")
            record.status, record.reason = "failed", reason
            raise PipelineStageError(stage.name, record.reason) from err
        finally:
            record.wall_s, record.finished_at = time.perf_counter() - t0, now()
            self._save_manifest(reporting=record.status != "running")
            if record.status != "running":
                self.log(f"{label}: {record.status.upper()} after {record.wall_s:.1f} s: {record.reason}")
        record.status = "done"
        self.manifest.save(self.layout.manifest)
        self.log(f"{label}: done in {record.wall_s:.1f} s")

    def _save_manifest(self, reporting: bool) -> None:
        """Write pipeline.json. While an error is being reported (`reporting`), a write that fails too (the same
        full disk) is one log line, not a second error in place of the first."""
        try:
            self.manifest.save(self.layout.manifest)
        except OSError as err:
            if not reporting:
                raise
            if not self._unsaved:
                self.log(f"[pipeline] cannot update {self.layout.manifest}: {no_space_message(err) or err}")
            self._unsaved = True


def run_pipeline(
    cfg: ExperimentConfig, out_dir: str | Path, *, force: Sequence[str] = (), log: Callable[[str], None] | None = None
) -> Manifest:
    """Run the selected stages of `cfg.pipeline.stages` into `out_dir`; returns the manifest.

    Raises PipelineInputError (before any stage), PipelineStageError (a stage failed; the manifest
    says which), KeyboardInterrupt (the manifest says "interrupted"; finished stages are kept).
    """
    return Pipeline(cfg, out_dir, force=force, log=log).run()
