"""The whole pipeline as one program: shards -> pretrain -> fine-tunes -> sweep -> evaluate -> report.

    python -m ray_jobs.pipeline --config ray_jobs/configs/tiny.yaml --out runs/demo     # `make demo`
    python -m ray_jobs.pipeline --config cfg.yaml --out runs/x 'pipeline.stages=[finetune,evaluate,report]'
    python -m ray_jobs.pipeline --config cfg.yaml --out runs/x pipeline.backbone=DiT-XL-2-256x256.pt
    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".git", ".venv", "shards", "runs"]}' \
        -- python -m ray_jobs.pipeline --config ray_jobs/configs/gpu.yaml --out /shared/runs/run1

    manifest = run_pipeline(cfg, "runs/demo")         # library form; uses the connected Ray cluster or starts one

Every stage calls its own library (`diffscaler.data.build_all`, `diffscaler.train.pretrain.run_pretrain`,
`diffscaler.train.finetune.run_finetunes`, the sweep, `diffscaler.eval.FidEvaluator`,
`diffscaler.report.write_report`); this module only orders them, checks input before any of them
runs, skips what is already done, and keeps the manifest.

Run folder (DIR = --out). Relative paths in the config (`data.shards_root`, `pretrain.storage_path`,
`sweep.storage_path`, `eval.cache_dir`) are resolved inside DIR, so one run folder on shared storage holds everything a
cluster's nodes need; absolute paths and URLs (`s3://...`) are kept as given.

    DIR/config.json                 the resolved config of the latest run
    DIR/pipeline.json               the manifest: per stage status, wall time (s), outputs, reason
    DIR/shards/<dataset>/           WebDataset shards + index.json             (shards)
    DIR/backbone/backbone.safetensors + backbone.json, metrics.jsonl          (pretrain)
    DIR/runs/ray/<run_name>/        Ray Train checkpoints (pretrain.storage_path)
    DIR/adapters/<task>.safetensors first method; DIR/adapters/<method>/ the others, logs/, summary.json
    DIR/sweep/                      trials.csv, best.json, the winners in adapters/, Tune's tune/ (sweep)
    DIR/fid.json                    FID/KID per task and method                  (evaluate)
    DIR/report.md + *.png           sample grids, FID table, parameters, timings, loss curves (report)

Skipping: a stage whose outputs exist and are valid is skipped - shards whose index records the
configured build parameters and pass `shards check`; a backbone whose hash verifies, whose model
config matches and that was trained for `pretrain.steps` on the current shards; adapters with this
backbone's hash and fine-tune fingerprint (the fine-tune library's own test); a sweep result for
this backbone and search space; a fid.json computed from exactly the current adapter files. So a
rerun after a failure or Ctrl-C continues where it stopped (a stage cut off halfway resumes through
its own library: Ray Train restarts pretraining from its last checkpoint, Tune restores the sweep,
finished fine-tunes are reused). The report is always rewritten (it reads the others' outputs).

`force` names stages to run although their outputs are valid: shards rebuilds every dataset,
finetune retrains every adapter, evaluate rescores; pretrain re-exports the backbone from the run's
last checkpoint (a new `pretrain.run_name` trains from scratch) and sweep restores the finished Tune
experiments and chooses again.

Bad input is reported before any stage runs: stages out of order, shards missing for a stage
when `shards` is not run, a backbone file that does not match `model.*`, adapters missing for
`evaluate` when `finetune` is not run, a Ray Train checkpoint that cannot resume with this config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffscaler.config import PIPELINE_STAGES, ConfigError, ExperimentConfig, ModelConfig, from_dict

MANIFEST_FORMAT = "diffscaler-pipeline"
MANIFEST_FORMAT_VERSION = 1
STAGES_NEEDING_RAY = ("shards", "pretrain", "finetune", "sweep", "evaluate")
BACKBONE_USERS = ("finetune", "sweep", "evaluate", "report")  # stages that read the backbone file
REAL_LABEL = "floor (real)"  # the reference rows of fid.json: real held-out images, and the bare backbone
NO_ADAPTER_LABEL = "no adapter"


def stage_order(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The order stages run in: the sweep first when the fine-tunes take their learning rates from it."""
    if not cfg.finetune.lr_from_sweep:
        return PIPELINE_STAGES
    rest = [s for s in PIPELINE_STAGES if s != "sweep"]
    return (*rest[: rest.index("finetune")], "sweep", *rest[rest.index("finetune") :])


class PipelineInputError(ValueError):
    """Input that cannot run, found before any stage started; the message names the file or field."""


class PipelineStageError(RuntimeError):
    """A stage ran and failed; the message names the stage and why. Finished stages are kept."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"stage {stage!r} failed: {reason}")
        self.stage = stage
        self.reason = reason


# ------------------------------------------------------------------------------------------------
# The run folder
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLayout:
    """Where each stage writes inside the run folder (all absolute)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def config_json(self) -> Path:
        return self.root / "config.json"

    @property
    def backbone_dir(self) -> Path:
        return self.root / "backbone"

    @property
    def backbone_file(self) -> Path:
        return self.backbone_dir / "backbone.safetensors"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def sweep_dir(self) -> Path:
        return self.root / "sweep"

    @property
    def fid_json(self) -> Path:
        return self.root / "fid.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def _inside(root: Path, path: str) -> str:
    """Relative local paths go under `root`; absolute paths and URLs stay as they are."""
    if not path or "://" in path:  # empty means "the library's default"; URLs are not local paths
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else str(root / path)


def _user_path(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def resolve_run_config(cfg: ExperimentConfig, out_dir: str | Path) -> ExperimentConfig:
    """The config with its relative storage paths placed inside the run folder."""
    root = Path(out_dir).expanduser().resolve()
    backbone = cfg.pipeline.backbone
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, shards_root=_inside(root, cfg.data.shards_root)),
        pretrain=dataclasses.replace(cfg.pretrain, storage_path=_inside(root, cfg.pretrain.storage_path)),
        sweep=dataclasses.replace(cfg.sweep, storage_path=_inside(root, cfg.sweep.storage_path)),
        eval=dataclasses.replace(cfg.eval, cache_dir=_inside(root, cfg.eval.cache_dir)),
        # a given backbone is a user file: relative to where the user runs, not to the run folder
        pipeline=dataclasses.replace(cfg.pipeline, backbone=_user_path(backbone)),
    ).validate()


# ------------------------------------------------------------------------------------------------
# The manifest: DIR/pipeline.json, rewritten atomically after every change
# ------------------------------------------------------------------------------------------------


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
    out_dir: str
    status: str = "running"  # running | done | failed | interrupted
    started_at: str = ""
    finished_at: str = ""
    wall_s: float = 0.0  # seconds of the latest run of the whole pipeline
    error: str = ""
    stages: dict[str, StageRecord] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(format=MANIFEST_FORMAT, format_version=MANIFEST_FORMAT_VERSION,
                 units={"wall_s": "seconds (wall clock)"})  # fmt: skip
        return d

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
        tmp.replace(path)

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
        return cls(out_dir=data["out_dir"], status=data["status"], started_at=data["started_at"],
                   finished_at=data["finished_at"], wall_s=data["wall_s"], error=data.get("error", ""),
                   stages=stages)  # fmt: skip


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageCheck:
    valid: bool  # outputs exist and match the config: the stage can be skipped
    reason: str  # what was found (shown on the progress line and kept in the manifest)


class Pipeline:
    """One run folder, one resolved config. `preflight()` then `run()`; see the module docstring."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path, *, force: Sequence[str] = (),
                 log: Callable[[str], None] | None = None):  # fmt: skip
        self.layout = RunLayout(Path(out_dir).expanduser().resolve())
        self.cfg = resolve_run_config(cfg, self.layout.root)
        unknown = [s for s in force if s not in PIPELINE_STAGES]
        if unknown:
            raise PipelineInputError(f"force: unknown stage(s) {unknown}; stages are {list(PIPELINE_STAGES)}")
        self.force = tuple(force)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.selected = tuple(s for s in stage_order(self.cfg) if s in self.cfg.pipeline.stages)
        self.manifest = Manifest(str(self.layout.root))
        self.previous: Manifest | None = None  # the manifest of the run before, as found on disk
        self._started_ray = False
        self._sigterm_before: Any = None  # SIGTERM handler to restore after the run

    # -- where the backbone comes from ---------------------------------------------------------

    @property
    def given_backbone(self) -> str:
        return self.cfg.pipeline.backbone

    @property
    def backbone_path(self) -> Path:
        """The backbone every later stage reads: a given .safetensors in place, else DIR/backbone/."""
        given = self.given_backbone
        if given and given.endswith(".safetensors"):
            return Path(given)
        return self.layout.backbone_file  # trained here, or a public .pt imported here

    def backbone_hash(self) -> str:
        from diffscaler.artifacts import read_backbone_meta

        return read_backbone_meta(self.backbone_path)["content_hash"]

    # -- checks before any stage ---------------------------------------------------------------

    def preflight(self) -> None:
        """Every check that needs no stage to run; raises PipelineInputError naming the problem."""
        stages = list(self.cfg.pipeline.stages)
        if not stages:
            raise PipelineInputError(f"pipeline.stages is empty; choose from {list(PIPELINE_STAGES)}")
        if len(set(stages)) != len(stages):
            raise PipelineInputError(f"pipeline.stages repeats a stage: {stages}")
        if stages != list(self.selected):
            raise PipelineInputError(
                f"pipeline.stages {stages} is out of order; stages run as {list(stage_order(self.cfg))}, "
                f"write them in that order: {list(self.selected)}"
            )
        self._check_latent_space()
        self._check_datasets()
        self._check_backbone()
        if "evaluate" in self.selected and "finetune" not in self.selected:
            self._check_adapters_present()
        e = self.cfg.eval
        if e.feature_weights_path and not Path(e.feature_weights_path).is_file():
            raise PipelineInputError(f"eval.feature_weights_path: file not found: {e.feature_weights_path}")

    def _needed_datasets(self) -> dict[str, str]:
        """{dataset name: source} the selected stages read (the pretraining set only if we pretrain)."""
        from diffscaler.data import dataset_jobs

        try:
            jobs = dataset_jobs(self.cfg.data)
        except ValueError as err:
            raise PipelineInputError(str(err)) from None
        names = []
        if "pretrain" in self.selected and not self.given_backbone:
            names.append(next(iter(jobs)))  # the pretraining set comes first
        if {"finetune", "sweep", "evaluate"} & set(self.selected):
            names += [t.name for t in self.cfg.data.targets]
        return {n: jobs[n] for n in dict.fromkeys(names)}

    def _build_parameters(self, source: str) -> dict[str, Any]:
        from diffscaler.data.build import _parameters

        return _parameters(self.cfg.data, source)  # with data.vae: latent shards of that VAE

    def _check_latent_space(self) -> None:
        """model (and so the backbone), data.vae and data.image_size agree: latents of that VAE at that size."""
        d, m = self.cfg.data, self.cfg.model
        if not d.vae:
            if m.in_channels != 3 and "shards" in self.selected:
                raise PipelineInputError(f"model.in_channels {m.in_channels}: a latent backbone's shards are encoded "
                                         "through its VAE; set data.vae=PATH (a local diffusers AutoencoderKL)")
            return
        from diffscaler.vae import VaeError, cached_vae_identity

        try:
            ident = cached_vae_identity(d.vae, d.vae_config or None)
        except VaeError as err:
            raise PipelineInputError(f"data.vae: {err}") from None
        side = m.input_size * ident["downsample"]
        if (m.in_channels, side) != (ident["latent_channels"], d.image_size):
            raise PipelineInputError(
                f"model {m.name} takes {m.in_channels}x{m.input_size}x{m.input_size} inputs, data.vae {d.vae} makes "
                f"{ident['latent_channels']}x{d.image_size // ident['downsample']}x"
                f"{d.image_size // ident['downsample']} latents of data.image_size={d.image_size} images "
                f"(downsampling {ident['downsample']}): set data.image_size={side} or model.input_size / "
                "model.in_channels to the backbone's")

    def _check_datasets(self) -> None:
        """Without the shards stage, every dataset a stage reads must already be built as configured."""
        if "shards" in self.selected:
            from diffscaler.data.build import check_sources

            try:  # clashing names, unknown, missing or empty sources: input errors, not a Ray task's failure
                check_sources(self.cfg.data, force="shards" in self.force)
            except (ValueError, FileNotFoundError) as err:
                raise PipelineInputError(str(err)) from None
            return
        from diffscaler.data import DatasetError, dataset_dir, load_index

        for name, source in self._needed_datasets().items():
            folder = dataset_dir(self.cfg.data, name)
            try:
                index = load_index(folder)
            except DatasetError as err:
                raise PipelineInputError(
                    f"dataset {name!r} has no shards at {folder} ({err}); add 'shards' to pipeline.stages "
                    f"or point data.shards_root at built shards"
                ) from None
            wanted = self._build_parameters(source)
            diff = {k: (index.data.get(k), v) for k, v in wanted.items() if k != "tool" and index.data.get(k) != v}
            if diff:
                raise PipelineInputError(
                    f"dataset {name!r} at {folder} was built with other parameters than data.* asks for: "
                    + ", ".join(f"{k} built={a!r} config={b!r}" for k, (a, b) in diff.items())
                    + "; add 'shards' to pipeline.stages to rebuild it"
                )

    def _check_backbone(self) -> None:
        from diffscaler.artifacts import BackboneLoadError, check_model_matches, load_public_dit, read_backbone_meta

        needs_backbone = any(s in self.selected for s in BACKBONE_USERS)
        given = self.given_backbone
        try:
            if given:
                if not Path(given).is_file():
                    raise PipelineInputError(f"pipeline.backbone: file not found: {given}")
                if given.endswith(".pt"):
                    load_public_dit(given, expect=self.cfg.model)
                    imported = self.layout.backbone_file
                    done = imported.is_file() and read_backbone_meta(imported)["provenance"].get("source") == given
                    if "pretrain" not in self.selected and needs_backbone and not done:
                        raise PipelineInputError(
                            f"pipeline.backbone {given} is a DiT checkpoint that the 'pretrain' stage imports to "
                            f"{imported}; add 'pretrain' to pipeline.stages"
                        )
                elif given.endswith(".safetensors"):
                    meta = read_backbone_meta(given)
                    check_model_matches(from_dict(ModelConfig, meta["model"], "backbone.model"), self.cfg.model, given)
                else:
                    raise PipelineInputError(
                        f"pipeline.backbone: {given} is neither a DiffScaler backbone (.safetensors) nor a "
                        "facebookresearch/DiT checkpoint (.pt)"
                    )
            elif "pretrain" not in self.selected and needs_backbone:
                path = self.layout.backbone_file
                if not path.is_file():
                    raise PipelineInputError(
                        f"no backbone at {path}: add 'pretrain' to pipeline.stages or set pipeline.backbone=FILE"
                    )
                meta = read_backbone_meta(path)
                check_model_matches(from_dict(ModelConfig, meta["model"], "backbone.model"), self.cfg.model, str(path))
            elif "pretrain" in self.selected:
                self._check_resumable_checkpoint()
        except (BackboneLoadError, ConfigError) as err:
            raise PipelineInputError(str(err)) from None

    def _check_resumable_checkpoint(self) -> None:
        """A Ray Train checkpoint left in storage must resume with this config (pretrain's own rule)."""
        from diffscaler.data import storage
        from diffscaler.train.pretrain import check_resumable
        from diffscaler.train.pretrain_checkpoint import latest_checkpoint

        p = self.cfg.pretrain
        found = latest_checkpoint(storage.join(p.storage_path, p.run_name))
        if found is not None:
            check_resumable(found[1], self.cfg, found[0])

    def _check_adapters_present(self) -> None:
        files = [path for tasks in self.adapter_files().values() for path in tasks.values()]
        missing = [path for path in files if not Path(path).is_file()]
        if missing:
            raise PipelineInputError(
                f"'evaluate' needs adapters, {len(missing)} missing (first: {missing[0]}); "
                "add 'finetune' to pipeline.stages"
            )

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> Manifest:
        """Lock the run folder, preflight, then every selected stage in order (manifest saved after each change)."""
        from diffscaler.runlock import RunFolderError, RunLock

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
        self.previous = previous = Manifest.load(self.layout.manifest)
        self.manifest = Manifest(str(self.layout.root), started_at=_now())
        for name in PIPELINE_STAGES:
            record = StageRecord(name)
            if previous is not None and name in previous.stages:
                # keep the last known timing and outputs (an unselected stage still shows what it made)
                old = previous.stages[name]
                status = "interrupted" if old.status == "running" else old.status  # the run was killed
                record = dataclasses.replace(old, status="pending" if name in self.selected else status)
            elif name not in self.selected:
                record.status = "not selected"
            self.manifest.stages[name] = record
        self._write_config()
        self.manifest.save(self.layout.manifest)
        total = len(self.selected)
        self._trap_sigterm()
        try:
            for number, name in enumerate(self.selected, 1):
                self._run_stage(name, f"[pipeline] ({number}/{total}) {name}")
            self.manifest.status = "done"
        except KeyboardInterrupt:
            self.manifest.status = "interrupted"
            self.manifest.error = "interrupted (Ctrl-C or SIGTERM); finished stages are kept"
            raise
        except Exception as err:
            self.manifest.status = "failed"
            self.manifest.error = str(err)
            raise
        finally:
            self.manifest.finished_at = _now()
            self.manifest.wall_s = time.perf_counter() - t0
            self.manifest.save(self.layout.manifest)
            self._disconnect()
            self._untrap_sigterm()
        where = self.layout.report if "report" in self.selected else self.layout.root
        self.log(f"[pipeline] done in {self.manifest.wall_s:.1f} s: {where}")
        return self.manifest

    def _write_config(self) -> None:
        tmp = self.layout.config_json.with_name(".config.json.tmp")
        tmp.write_text(self.cfg.to_json() + "\n")
        tmp.replace(self.layout.config_json)

    def _run_stage(self, name: str, label: str) -> None:
        record = self.manifest.stages[name]
        try:
            check = self.check(name)
        except Exception as err:  # outputs that cannot even be inspected are not valid: run the stage
            check = StageCheck(False, f"outputs cannot be checked ({type(err).__name__}: {err})")
        if check.valid and name not in self.force:
            record.status, record.reason = "skipped", check.reason
            record.outputs = record.outputs or self.existing_outputs(name)
            self.manifest.save(self.layout.manifest)
            self.log(f"{label}: skipped, {check.reason}")
            return
        self.log(f"{label}: started ({check.reason})")
        record.status, record.reason, record.started_at, record.finished_at = "running", check.reason, _now(), ""
        record.wall_s = None
        self.manifest.save(self.layout.manifest)
        t0 = time.perf_counter()
        # Ray Train and Tune install their own SIGINT handlers inside fit() and leave them behind;
        # put ours back after the stage so Ctrl-C keeps interrupting the later stages.
        main_thread = threading.current_thread() is threading.main_thread()
        sigint_handler = signal.getsignal(signal.SIGINT) if main_thread else None
        try:
            if name in STAGES_NEEDING_RAY and not (name == "pretrain" and self.given_backbone):
                self._connect()  # one connection for every stage (importing a given backbone needs none)
            record.outputs = getattr(self, f"run_{name}")()
        except KeyboardInterrupt:
            record.status, record.reason = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
            raise
        except PipelineStageError as err:
            record.status, record.reason = "failed", err.reason
            raise
        except Exception as err:
            record.status, record.reason = "failed", f"{type(err).__name__}: {err}"
            raise PipelineStageError(name, record.reason) from err
        finally:
            if main_thread and sigint_handler is not None:
                signal.signal(signal.SIGINT, sigint_handler)
            record.wall_s = time.perf_counter() - t0
            record.finished_at = _now()
            self.manifest.save(self.layout.manifest)
            if record.status != "running":
                self.log(f"{label}: {record.status.upper()} after {record.wall_s:.1f} s: {record.reason}")
        record.status = "done"
        self.manifest.save(self.layout.manifest)
        self.log(f"{label}: done in {record.wall_s:.1f} s")

    def _connect(self) -> None:
        """Join the cluster once for every stage (diffscaler.cluster decides which: pipeline.ray_address, else
        RAY_ADDRESS as set by `ray job submit`, else a new local cluster)."""
        from diffscaler.cluster import connect_ray

        if connect_ray(self.cfg):
            self._started_ray = True
            self._trap_sigterm()  # ray.init installs Ray's own SIGTERM handler, which aborts the process

    def _trap_sigterm(self) -> None:
        """SIGTERM (`ray job stop`, a scheduler's kill) interrupts like Ctrl-C, so the manifest says so."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        if self._sigterm_before is None:
            self._sigterm_before = previous

    def _untrap_sigterm(self) -> None:
        if self._sigterm_before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._sigterm_before)
            self._sigterm_before = None

    def _disconnect(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def check(self, name: str) -> StageCheck:
        return getattr(self, f"check_{name}")()

    def existing_outputs(self, name: str) -> dict[str, Any]:
        """What a skipped stage's outputs are, for a manifest that lost them (cheap: no loading)."""
        if name == "shards":
            return self._shards_outputs()
        if name == "pretrain":
            return {"backbone": str(self.backbone_path), "content_hash": self.backbone_hash()}
        if name == "finetune":
            return {"summary": str(self.layout.adapters_dir / "summary.json"), "adapters": self.adapter_files()}
        if name == "evaluate":
            return {"fid_json": str(self.layout.fid_json)}
        return {}

    # -- shards --------------------------------------------------------------------------------

    def _dataset_state(self) -> dict[str, str]:
        """{dataset: "" if built as configured and `shards check` passes, else what is wrong}."""
        from diffscaler.data import check_dataset, dataset_dir, dataset_jobs
        from diffscaler.data.writer import is_up_to_date

        state = {}
        for name, source in dataset_jobs(self.cfg.data).items():
            folder = dataset_dir(self.cfg.data, name)
            if not is_up_to_date(folder, self._build_parameters(source)):
                state[name] = "missing or built with other parameters"
                continue
            report = check_dataset(folder)
            state[name] = "" if report.ok else f"shards check failed: {report.problems[0]}"
        return state

    def check_shards(self) -> StageCheck:
        state = self._dataset_state()
        bad = {k: v for k, v in state.items() if v}
        if not bad:
            return StageCheck(True, f"{len(state)} dataset(s) built as configured, shards check passed")
        by_reason: dict[str, list[str]] = {}
        for name, why in bad.items():
            by_reason.setdefault(why, []).append(name)
        return StageCheck(False, "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items()))

    def run_shards(self) -> dict[str, Any]:
        from diffscaler.data import build_all

        state = self._dataset_state()
        todo = list(state) if "shards" in self.force else [k for k, v in state.items() if v]
        # force=True for those: a dataset whose index is current but whose shards fail the check would
        # otherwise be kept by build_all's own up-to-date test
        build_all(self.cfg.data, todo, parallel=True, force=True)
        return self._shards_outputs()

    def _shards_outputs(self) -> dict[str, Any]:
        from diffscaler.data import dataset_dir, dataset_jobs, load_index

        out = {}
        for name in dataset_jobs(self.cfg.data):
            index = load_index(dataset_dir(self.cfg.data, name))
            out[name] = {"dir": index.url, "train": index.num_samples("train"), "eval": index.num_samples("eval"),
                         "classes": index.num_classes, "content_hash": index.content_hash}  # fmt: skip
        return out

    # -- pretrain ------------------------------------------------------------------------------

    def check_pretrain(self) -> StageCheck:
        from diffscaler.artifacts import BackboneLoadError, load_backbone

        given = self.given_backbone
        if given.endswith(".safetensors"):
            return StageCheck(True, f"pipeline.backbone given: {given}")
        path = self.layout.backbone_file
        try:
            _model, meta = load_backbone(path, expect=self.cfg.model)  # verifies the content hash
        except BackboneLoadError as err:
            return StageCheck(False, f"no valid backbone yet ({err})")
        prov = meta.get("provenance", {})
        if given:  # a public .pt imported into DIR/backbone
            if prov.get("source") != given:
                return StageCheck(False, f"{path} was not imported from {given}")
            return StageCheck(True, f"{given} already imported to {path}")
        if meta["model"].get("num_classes") != self.cfg.model.num_classes:
            return StageCheck(False, f"{path} has num_classes {meta['model'].get('num_classes')}, config "
                                     f"{self.cfg.model.num_classes}")  # fmt: skip
        if prov.get("step") != self.cfg.pretrain.steps:
            return StageCheck(False, f"{path} was trained {prov.get('step')} steps, pretrain.steps is "
                                     f"{self.cfg.pretrain.steps}")  # fmt: skip
        from diffscaler.data import load_index
        from diffscaler.data.build import pretrain_dataset_dir

        shards_hash = load_index(pretrain_dataset_dir(self.cfg.data)).content_hash
        if prov.get("shards", {}).get("content_hash") != shards_hash:
            return StageCheck(False, f"{path} was trained on other shards than {pretrain_dataset_dir(self.cfg.data)}")
        return StageCheck(True, f"{path} valid ({prov.get('step')} steps, hash {meta['content_hash'][:19]}...)")

    def run_pretrain(self) -> dict[str, Any]:
        if self.given_backbone.endswith(".pt"):
            return self._import_public_backbone()
        from diffscaler.train.pretrain import run_pretrain

        result = run_pretrain(self.cfg, self.layout.backbone_dir)
        return {"backbone": str(result.backbone), "content_hash": result.content_hash, "metrics": str(result.metrics),
                "checkpoint": str(result.checkpoint), "steps": result.step, "weights": result.weights,
                "skipped_samples": result.skipped_samples}  # fmt: skip

    def _import_public_backbone(self) -> dict[str, Any]:
        """A facebookresearch/DiT .pt becomes DIR/backbone/backbone.safetensors once (no pickle afterwards)."""
        from diffscaler.artifacts import load_public_dit, save_backbone

        model, meta = load_public_dit(self.given_backbone, expect=self.cfg.model)
        provenance = {"stage": "import", "source": self.given_backbone, "format": meta["format"]}
        digest = save_backbone(model, self.layout.backbone_file, provenance=provenance)
        return {"backbone": str(self.layout.backbone_file), "content_hash": digest, "source": self.given_backbone}

    # -- finetune ------------------------------------------------------------------------------

    def check_finetune(self) -> StageCheck:
        from diffscaler.train.finetune import FinetuneInputError, plan_finetunes

        if not self.backbone_path.is_file():
            return StageCheck(False, "no backbone yet")
        try:
            plan = plan_finetunes(self.finetune_cfg(), self.backbone_path, self.layout.adapters_dir)
        except FinetuneInputError as err:
            return StageCheck(False, str(err))
        if plan.jobs:
            return StageCheck(False, f"{len(plan.jobs)} of {len(plan.jobs) + len(plan.reused)} adapter(s) to train")
        return StageCheck(True, f"{len(plan.reused)} adapter(s) up to date for backbone {plan.backbone_hash[:19]}...")

    def run_finetune(self) -> dict[str, Any]:
        from diffscaler.train.finetune import run_finetunes

        summary = run_finetunes(self.finetune_cfg(), self.backbone_path, self.layout.adapters_dir,
                                force="finetune" in self.force,
                                log=self.log)  # fmt: skip
        failed = [r for r in summary.rows if r.status == "failed"]
        if failed:
            raise PipelineStageError(
                "finetune",
                f"{len(failed)} fine-tune(s) failed: "
                + "; ".join(f"{r.method}/{r.task}: {r.reason}" for r in failed)
                + f" (the others are kept in {self.layout.adapters_dir}; rerun to retry only these)",
            )
        return {"summary": str(Path(summary.out_dir) / "summary.json"), "banks": summary.banks,
                "adapters": self.adapter_files()}  # fmt: skip

    def adapter_files(self) -> dict[str, dict[str, str]]:
        """{method: {task: adapter file}} for every configured method and task (files may not exist yet)."""
        from diffscaler.train.finetune import finetune_variants

        methods = self.cfg.finetune.methods
        return {v.label: {t.name: str(v.out_dir(self.layout.adapters_dir, methods) / f"{t.name}.safetensors")
                          for t in self.cfg.data.targets} for v in finetune_variants(self.cfg)}  # fmt: skip

    # -- sweep ---------------------------------------------------------------------------------

    def _sweep_fingerprints(self) -> dict[str, str]:
        """{dataset: fingerprint of its Tune experiment} (the sweep library's own naming of a search)."""
        from diffscaler.train.sweep import sweep_fingerprints

        return sweep_fingerprints(self.cfg, self.backbone_path)

    def swept_entries(self) -> dict[str, dict[str, Any]]:
        """best.json rows keyed as the fingerprints are: dataset (first method), method/dataset (the others)."""
        try:
            best = json.loads((self.layout.sweep_dir / "best.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        out = dict(best.get("datasets", {}))
        methods = best.get("methods", {})
        for m, rows in list(methods.items())[1:]:
            out |= {f"{m}/{name}": row for name, row in rows.items()}
        return out

    def swept_lrs(self) -> dict[str, float]:
        """{method: lr} the sweep chose (best.json, on its first dataset), for finetune.lr_from_sweep."""
        try:
            best = json.loads((self.layout.sweep_dir / "best.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        methods = best.get("methods") or {self.cfg.adapter.method: best.get("datasets", {})}
        return {m: float(next(iter(rows.values()))["lr"]) for m, rows in methods.items() if rows}

    def finetune_cfg(self) -> ExperimentConfig:
        """The config the fine-tunes run with: with finetune.lr_from_sweep, each swept method's lr is the
        sweep's choice (finetune.method_lrs of the config win where both name a method)."""
        if not self.cfg.finetune.lr_from_sweep:
            return self.cfg
        lrs = {**self.swept_lrs(), **self.cfg.finetune.method_lrs}
        return dataclasses.replace(self.cfg, finetune=dataclasses.replace(self.cfg.finetune, method_lrs=lrs))

    def swept_adapters(self) -> dict[str, str]:
        """{dataset: winning adapter file} from DIR/sweep/best.json ({} before the sweep)."""
        try:
            best = json.loads((self.layout.sweep_dir / "best.json").read_text()).get("datasets", {})
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {name: row["adapter"] for name, row in best.items() if row.get("adapter")}

    def check_sweep(self) -> StageCheck:
        from diffscaler.artifacts import AdapterLoadError, read_trained_meta
        from diffscaler.train.finetune import FinetuneInputError

        if not self.backbone_path.is_file():
            return StageCheck(False, "no backbone yet")
        try:
            wanted = self._sweep_fingerprints()
        except FinetuneInputError as err:
            return StageCheck(False, str(err))
        # best.json does not record the search it came from; the manifest of the run that wrote it does
        record = self.previous.stages.get("sweep") if self.previous is not None else None
        if record is None or record.status not in ("done", "skipped") or record.outputs.get("fingerprints") != wanted:
            return StageCheck(False, "no finished sweep with this search space and backbone")
        winners = self.swept_entries()
        backbone_hash = self.backbone_hash()
        for name in wanted:
            try:
                meta = read_trained_meta(winners.get(name, {}).get("adapter", ""))
            except (AdapterLoadError, OSError) as err:
                return StageCheck(False, f"the best adapter of {name!r} is missing ({err})")
            if meta.get("backbone_hash") != backbone_hash:
                return StageCheck(False, f"the best adapter of {name!r} was trained on another backbone")
        return StageCheck(True, f"best (rank, lr) found for {', '.join(wanted)}")

    def run_sweep(self) -> dict[str, Any]:
        from diffscaler.train.sweep import run_sweep

        fingerprints = self._sweep_fingerprints()
        result = run_sweep(self.cfg, self.backbone_path, self.layout.sweep_dir, log=self.log)
        first = next(iter(result.by_method), "")
        found = {name if m == first else f"{m}/{name}" for m, rows in result.by_method.items() for name in rows}
        missing = [name for name in fingerprints if name not in found]
        if missing:
            trials = self.layout.sweep_dir / "trials.csv"
            raise PipelineStageError("sweep", f"no trial finished a rung for {missing}; see {trials}")
        return {"best_json": str(self.layout.sweep_dir / "best.json"), "best": result.best,
                "trials_csv": str(self.layout.sweep_dir / "trials.csv"), "fingerprints": fingerprints}  # fmt: skip

    # -- evaluate ------------------------------------------------------------------------------

    def evaluated_adapters(self) -> dict[str, dict[str, str]]:
        """{label: {task: adapter}}: every fine-tune method, plus the sweep's winners when the sweep runs."""
        from diffscaler.artifacts import AdapterLoadError, read_adapter_file

        out = self.adapter_files()
        if self.cfg.finetune.lr_from_sweep:  # the fine-tunes already use the swept lr: its winners add nothing
            return out
        winners = {}
        for task, path in self.swept_adapters().items():
            try:  # only winners for this backbone: a sweep of an earlier backbone is history, not a result
                meta, _ = read_adapter_file(path)
            except (AdapterLoadError, OSError):
                continue
            if self.backbone_path.is_file() and meta.get("backbone_hash") == self.backbone_hash():
                winners[task] = path
        if winners:
            out[f"{self.cfg.adapter.method} (swept)"] = winners
        return out

    def _eval_inputs(self) -> dict[str, Any]:
        """What fid.json was computed from: backbone, adapter file digests, the evaluation settings."""
        files = {f"{m}/{t}": file_digest(p) if Path(p).is_file() else None
                 for m, tasks in self.evaluated_adapters().items() for t, p in tasks.items()}  # fmt: skip
        d = self.cfg.diffusion
        return {"backbone_hash": self.backbone_hash() if self.backbone_path.is_file() else None,
                "adapters": files, "eval": dataclasses.asdict(self.cfg.eval),
                "sampler": [d.sampler, d.ddim_eta, d.cfg_scale]}  # fmt: skip

    def check_evaluate(self) -> StageCheck:
        path = self.layout.fid_json
        try:
            doc = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return StageCheck(False, f"no {path.name} yet")
        if doc.get("pipeline_inputs") != self._eval_inputs():
            return StageCheck(False, f"{path.name} was computed from other adapters or settings")
        failed = [r for r in doc.get("results", []) if r.get("status") != "ok"]
        if failed:
            return StageCheck(False, f"{path.name} has {len(failed)} failed request(s)")
        return StageCheck(True, f"{path.name} is current ({len(doc.get('results', []))} scores)")

    def run_evaluate(self) -> dict[str, Any]:
        from diffscaler.eval import FidEvaluator, format_table, request_for_task, write_fid_json

        requests = [request_for_task(self.cfg, task, path, label=label)
                    for label, tasks in self.evaluated_adapters().items() for task, path in tasks.items()]  # fmt: skip
        if self.cfg.eval.reference_rows:  # the rows that make the others readable: the floor and no adapter
            for t in self.cfg.data.targets:
                requests += [request_for_task(self.cfg, t.name, None, label=REAL_LABEL, source="real"),
                             request_for_task(self.cfg, t.name, None, label=NO_ADAPTER_LABEL)]  # fmt: skip
        inputs = self._eval_inputs()
        with FidEvaluator(str(self.backbone_path), self.cfg) as evaluator:
            results = evaluator.evaluate(requests)
        write_fid_json(results, self.layout.fid_json, extra={"pipeline_inputs": inputs})
        self.log(format_table(results))
        failed = [r for r in results if r.status != "ok"]
        if failed:
            raise PipelineStageError(
                "evaluate",
                "; ".join(f"{r.label}/{r.task}: {r.error}" for r in failed)
                + f" (scores that worked are in {self.layout.fid_json})",
            )
        return {"fid_json": str(self.layout.fid_json), "feature_network": self.cfg.eval.feature_network,
                "num_samples": self.cfg.eval.num_samples,
                "fid": {f"{r.label}/{r.task}": r.fid for r in results}}  # fmt: skip

    # -- report --------------------------------------------------------------------------------

    def check_report(self) -> StageCheck:
        return StageCheck(False, "always rewritten from the other stages' outputs")

    def run_report(self) -> dict[str, Any]:
        from diffscaler.report import ReportInputs, StageRow, write_report

        stages = tuple(StageRow(r.name, r.status, r.wall_s, r.reason) for r in self.manifest.stages.values()
                       if r.name != "report")  # its own time is not known while it runs  # fmt: skip
        inputs = ReportInputs(
            cfg=self.cfg, out_dir=self.layout.root, backbone=self.backbone_path, adapters=self.evaluated_adapters(),
            fid_json=self.layout.fid_json, pretrain_metrics=self.layout.backbone_dir / "metrics.jsonl",
            finetune_logs=self.layout.adapters_dir / "logs", sweep_dir=self.layout.sweep_dir, stages=stages,
        )  # fmt: skip
        if self.cfg.eval.gpus_per_actor > 0:
            # The grids sample the backbone (a DiT-XL/2 takes minutes per grid on a CPU driver): one Ray task on
            # a GPU node, shaped like an FID actor, writes the report into --out (a shared file system).
            import ray

            from diffscaler.train.finetune import check_fits

            self._connect()
            gpus, cpus = min(1.0, self.cfg.eval.gpus_per_actor), self.cfg.eval.cpus_per_actor
            check_fits(cpus, gpus, "report (eval.gpus_per_actor, eval.cpus_per_actor)")
            files = ray.get(ray.remote(num_gpus=gpus, num_cpus=cpus)(write_report).remote(inputs))
        else:
            files = write_report(inputs)
        return {"report": str(files[0]), "images": [str(p) for p in files[1:]]}


def run_pipeline(cfg: ExperimentConfig, out_dir: str | Path, *, force: Sequence[str] = (),
                 log: Callable[[str], None] | None = None) -> Manifest:  # fmt: skip
    """Run the selected stages of `cfg.pipeline.stages` into `out_dir`; returns the manifest.

    Raises PipelineInputError (before any stage), PipelineStageError (a stage failed; the manifest
    says which), KeyboardInterrupt (the manifest says "interrupted"; finished stages are kept).
    """
    return Pipeline(cfg, out_dir, force=force, log=log).run()
