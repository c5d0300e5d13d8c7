"""Parallel adapter fine-tunes: one frozen backbone, one small adapter per target dataset.

    python -m ray_jobs.finetune --config ray_jobs/configs/tiny.yaml --backbone runs/backbone/backbone.safetensors \
        --out runs/adapters [finetune.methods=[affiner,lora] finetune.mixed=true ...]
    ray job submit --working-dir . -- python -m ray_jobs.finetune --config ... --backbone ... --out ...

    summary = run_finetunes(cfg, "runs/backbone/backbone.safetensors", "runs/adapters")
    print(format_table(summary))

Each (task, method) is its own Ray task asking for `finetune.cpus_per_task` CPUs (and one GPU with
`finetune.use_gpu`), so fine-tunes pack a CPU node by fractions or take one GPU each on a cluster,
and one failing (corrupt shards, NaN loss, a dead worker) does not stop the others. With
`finetune.mixed=true` each method is one Ray task training every task's adapter together from
interleaved shards, every sample carrying its task id (the bank's mixed-batch path).

Output layout (DIR = --out):
    DIR/<task>.safetensors + .json       the first method of finetune.methods (the default: affiner)
    DIR/<method>/<task>.safetensors ...  every further method
    DIR/bank.safetensors + bank.json     all tasks of the first method in one file (bank_file.py);
                                         DIR/<method>/bank.* for the others
    DIR/logs/<method>/<task>.jsonl       loss log of each run (mixed runs: logs/<method>/mixed.jsonl)
    DIR/summary.json                     one row per (task, method): status, reason, parameters, loss, time

Rerunning with the same DIR redoes only what is missing or failed: an adapter whose JSON records this
backbone's hash and the same fine-tune fingerprint (method, rank, targets, optimisation settings,
data content hash) is reused as is (`force=True` retrains everything).

Bad input (shards missing for a task, a rank wider than the layers, a resource request no node can
hold) raises `FinetuneInputError` before any Ray task starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from safetensors.torch import load_file

from diffscaler.adapters import METHOD_PARTS
from diffscaler.artifacts import (
    AdapterLoadError,
    BackboneLoadError,
    is_task_model,
    read_adapter_file,
    read_backbone_meta,
    read_trained_meta,
)
from diffscaler.atomic import write_text_atomic
from diffscaler.bank_file import save_bank
from diffscaler.cluster import connect_ray, node_shapes
from diffscaler.config import AdapterConfig, ExperimentConfig, ModelConfig, from_dict
from diffscaler.data import DatasetError, dataset_dir, load_index
from diffscaler.errors import last_error_line
from diffscaler.models.dit import parse_preset
from diffscaler.train.finetune_loop import LOSS_UNIT, AdapterRun, AdapterRunSpec, TaskData, condition_record

SUMMARY_FORMAT = "diffscaler-finetune-summary"


class FinetuneInputError(ValueError):
    """Input that cannot run (missing shards, a rank wider than a layer, a request no node fits)."""


class FinetuneJobError(RuntimeError):
    """A fine-tune that failed while running; the message is `<original type>: <original message>`.

    Raised from inside the Ray task in place of the original error, whose class may not survive
    pickling (Ray would then report only `UnserializableException`).
    """


# ------------------------------------------------------------------------------------------------
# Checks that run before anything starts
# ------------------------------------------------------------------------------------------------


def backbone_model_config(backbone: str | Path) -> tuple[ModelConfig, str]:
    """(model config, content hash) of a backbone file without loading its tensors (ours) - or with (.pt)."""
    path = Path(backbone)
    try:
        if path.suffix == ".pt":
            from diffscaler.artifacts import load_public_dit

            model, meta = load_public_dit(path)
            return model.config, meta["content_hash"]
        meta = read_backbone_meta(path)
    except BackboneLoadError as err:
        raise FinetuneInputError(str(err)) from None
    return from_dict(ModelConfig, meta["model"], "backbone.model"), meta["content_hash"]


def uses_rank(method: str) -> bool:
    return "down" in METHOD_PARTS.get(method, ())  # scratch (a whole model) has no rank


def method_lr(cfg: ExperimentConfig, method: str) -> float:
    """The learning rate a method fine-tunes with: finetune.method_lrs[method], else finetune.lr."""
    return cfg.finetune.method_lrs.get(method, cfg.finetune.lr)


def method_adapter(cfg: ExperimentConfig, method: str) -> AdapterConfig:
    """The adapter settings a method fine-tunes with: finetune.method_ranks / method_targets over adapter.*
    (a parameter-matched comparison gives each method its own rank and wrapped layers)."""
    ft, a = cfg.finetune, cfg.adapter
    return replace(a, rank=ft.method_ranks.get(method, a.rank), targets=tuple(ft.method_targets.get(method, a.targets)))


def method_config(cfg: ExperimentConfig, method: str) -> ExperimentConfig:
    """`cfg` with adapter.* set to the method's own settings (method_adapter): what its runs and files record."""
    adapter = method_adapter(cfg, method)
    return cfg if adapter == cfg.adapter else replace(cfg, adapter=adapter)


def check_rank(model: ModelConfig, rank: int, method: str, where: str) -> None:
    """A rank-r branch needs r <= the layer width; every target linear of a DiT has min(in, out) = D."""
    if not uses_rank(method):
        return
    width = parse_preset(model.name)[0].hidden_size
    if rank > width:
        raise FinetuneInputError(
            f"{where}: rank {rank} is larger than the layer width {width} of {model.name} "
            f"(the {method} branch D_t is rank x {width}); use a rank <= {width}"
        )


def resolve_tasks(
    cfg: ExperimentConfig,
    names: Sequence[str] | None = None,
    image_size: int | None = None,
    in_channels: int | None = None,
) -> list[TaskData]:
    """TaskData of the named targets (all of cfg.data.targets by default), from each shard index; with
    `in_channels`, shards that do not fit the backbone (pixels vs latents, size, data.vae) are refused."""
    specs = {t.name: t for t in cfg.data.targets}
    if not specs:
        raise FinetuneInputError("data.targets is empty: name at least one target dataset")
    wanted = list(names) if names else list(specs)
    out = []
    for name in wanted:
        if name not in specs:
            raise FinetuneInputError(f"task {name!r} is not in data.targets {list(specs)}")
        spec = specs[name]
        folder = dataset_dir(cfg.data, name)
        if "://" not in folder:  # Ray workers and Tune trials may run in another working directory
            folder = os.path.abspath(folder)
        try:
            index = load_index(folder)
        except DatasetError as err:
            raise FinetuneInputError(
                f"task {name!r}: no shards at {folder} ({err}); build them with "
                f"`diffscaler shards make --source {spec.source_name} --out {folder}` or `python -m ray_jobs.shards`"
            ) from None
        if image_size is not None and in_channels is not None:
            problem = index.backbone_mismatch(in_channels, image_size, configured_vae_hash(cfg))
            if problem:
                raise FinetuneInputError(f"task {name!r}: {problem}")
        elif image_size is not None and index.image_size != image_size:
            raise FinetuneInputError(
                f"task {name!r}: shards at {folder} are {index.image_size}x{index.image_size} px, the backbone "
                f"takes {image_size}x{image_size}; rebuild them with data.image_size={image_size}"
            )
        if index.num_samples("train") < 1:
            raise FinetuneInputError(f"task {name!r}: the train split at {folder} is empty")
        have = index.condition.kind if index.condition else ""
        if have != spec.condition:
            raise FinetuneInputError(
                f"task {name!r}: data.targets declares condition {spec.condition or '(none)'!r}, the shards at "
                f"{folder} carry {have or '(none)'!r}; rebuild them (`python -m ray_jobs.shards`)"
            )
        out.append(
            TaskData(
                name,
                folder,
                spec.conditional,
                index.num_classes,
                tuple(index.class_names),
                index.data_hash,
                condition_record(index),
            )
        )
    return out


def configured_vae_hash(cfg: ExperimentConfig) -> str:
    """The identity hash of data.vae ("" when none); FinetuneInputError naming the path when it is bad."""
    from diffscaler.vae import VaeError, configured_vae_hash

    try:
        return configured_vae_hash(cfg.data.vae, cfg.data.vae_config)
    except VaeError as err:
        raise FinetuneInputError(f"data.vae: {err}") from None


def check_fits(cpus: float, gpus: float, what: str, count: int = 1) -> None:
    """Raise if no node - alive, or a type the autoscaler can start - can hold one request of `cpus`
    CPUs and `gpus` GPUs. Ray keeps such a request PENDING forever (a silent hang): fail clearly instead.
    """
    nodes = node_shapes()
    fits = [n for n in nodes if n.get("CPU", 0.0) + 1e-9 >= cpus and n.get("GPU", 0.0) + 1e-9 >= gpus]
    if not fits:
        have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "no nodes"
        raise FinetuneInputError(
            f"{what}: each of the {count} request(s) needs {cpus:g} CPU and {gpus:g} GPU, but no node has that "
            f"(cluster nodes: {have}); lower the request or add a node - Ray would wait forever"
        )


# ------------------------------------------------------------------------------------------------
# Planning: which runs, where their files go, what can be reused
# ------------------------------------------------------------------------------------------------


def method_dir(out_dir: str | Path, method: str, methods: Sequence[str]) -> Path:
    """The first configured method writes into DIR itself; every other method into DIR/<method>/."""
    return Path(out_dir) if method == methods[0] else Path(out_dir) / method


@dataclass(frozen=True)
class FinetuneVariant:
    """One row group of the table: a method at the fine-tune seed, or again at one of its extra seeds."""

    label: str  # the method, or "<method> seed N"
    method: str
    seed: int
    subdir: str  # "" = method_dir; else DIR/<method>-seed<N>

    def out_dir(self, out: str | Path, methods: Sequence[str]) -> Path:
        return Path(out) / self.subdir if self.subdir else method_dir(out, self.method, methods)

    def config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        return cfg if self.seed == cfg.finetune.seed else replace(cfg, finetune=replace(cfg.finetune, seed=self.seed))


def finetune_variants(cfg: ExperimentConfig) -> list[FinetuneVariant]:
    """Every configured method at finetune.seed, then the extra seeds of finetune.extra_seeds."""
    ft = cfg.finetune
    out = [FinetuneVariant(m, m, ft.seed, "") for m in ft.methods]
    for m in ft.methods:
        out += [
            FinetuneVariant(f"{m} seed {s}", m, s, f"{m}-seed{s}") for s in ft.extra_seeds.get(m, ()) if s != ft.seed
        ]
    return out


def fingerprint(
    cfg: ExperimentConfig,
    method: str,
    rank: int,
    tasks: Sequence[TaskData],
    backbone_hash: str,
    lr: float | None = None,
    steps: int | None = None,
) -> str:
    """Everything that changes what a fine-tune produces; equal fingerprints = the same adapter."""
    ft, a, d, diff = cfg.finetune, cfg.adapter, cfg.data, cfg.diffusion
    content = {
        "backbone_hash": backbone_hash,
        "method": method,
        "rank": rank if uses_rank(method) else 0,
        "targets": list(a.targets),
        "branch_scale_init": a.branch_scale_init if method == "affiner" else 0.0,
        "steps": steps if steps is not None else ft.steps,
        "lr": lr if lr is not None else ft.lr,
        "batch_size": ft.batch_size,
        "warmup_steps": ft.warmup_steps,
        **({"lr_schedule": ft.lr_schedule} if ft.lr_schedule != "constant" else {}),  # constant: as before
        "grad_clip": ft.grad_clip,
        "seed": ft.seed,
        "data": [d.seed, d.hflip, d.shuffle_buffer, d.skip_bad_samples],
        "diffusion": [diff.num_timesteps, diff.beta_start, diff.beta_end],
        "tasks": [
            [t.name, t.conditional, t.data_hash, *([t.condition] if t.condition else [])] for t in tasks
        ],  # the co-trained set, in bank order
        # the condition path, where a task has maps (unconditional fingerprints stay as they were)
        **(
            {"condition": [ft.condition_dropout, a.condition_blocks, a.controlnet_blocks]}
            if any(t.condition for t in tasks) or method == "controlnet"
            else {}
        ),
    }
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def reusable_adapter(path: Path, backbone_hash: str, fp: str) -> dict[str, Any] | None:
    """The adapter JSON if `path` is a complete, loadable adapter made with this fingerprint, else None."""
    try:
        if is_task_model(path):
            meta = read_trained_meta(path)
            load_file(str(path))  # proves the safetensors file loads
        else:
            meta, _tensors = read_adapter_file(path)  # also proves the safetensors file loads
    except (AdapterLoadError, OSError, ValueError):
        return None
    ok = meta.get("backbone_hash") == backbone_hash and meta.get("finetune", {}).get("fingerprint") == fp
    return meta if ok else None


@dataclass(frozen=True)
class FinetuneJob:
    """One Ray task: a (task, method) fine-tune, or all tasks of a method in mixed mode."""

    key: str  # "<method>/<task>" or "<method>/mixed"
    method: str
    spec: AdapterRunSpec
    out_dir: str  # adapter files go here
    fingerprint: str
    variant: str = ""  # the table row group (FinetuneVariant.label)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "method": self.method,
            "spec": self.spec.to_dict(),
            "out_dir": self.out_dir,
            "fingerprint": self.fingerprint,
            "variant": self.variant,
        }


@dataclass
class FinetuneRow:
    task: str
    method: str
    rank: int  # 0 for methods without a rank-r branch
    status: str  # ok | reused | failed
    reason: str = ""  # why it failed
    trainable_params: int = 0  # parameters this task owns (its adapter file)
    backbone_params: int = 0
    steps: int = 0  # optimizer steps
    final_loss: float = math.nan  # mean training loss over the last log window (LOSS_UNIT)
    val_loss: float = math.nan  # eval split, fixed timesteps and noise (LOSS_UNIT)
    wall_s: float = 0.0  # seconds of the Ray task (load + train + save); shared by a mixed run's tasks
    images_per_s: float = 0.0  # training throughput
    adapter: str = ""  # <task>.safetensors
    log: str = ""  # JSONL loss log
    mixed: bool = False  # trained together with the other tasks of its method
    started_at: float = 0.0  # unix time the Ray task began (concurrent runs overlap)
    finished_at: float = 0.0  # unix time it returned
    variant: str = ""  # the table row group: the method, or "<method> seed N"

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.backbone_params if self.backbone_params else math.nan


@dataclass
class FinetuneSummary:
    out_dir: str
    backbone: str
    backbone_hash: str
    rows: list[FinetuneRow] = field(default_factory=list)
    banks: dict[str, str] = field(default_factory=dict)  # method -> bank.json
    wall_s: float = 0.0  # whole program, seconds

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["trainable_pct"] = r.trainable_pct
            rows.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()})
        return {
            "format": SUMMARY_FORMAT,
            "format_version": 1,
            "out_dir": self.out_dir,
            "backbone": self.backbone,
            "backbone_hash": self.backbone_hash,
            "loss_unit": LOSS_UNIT,
            "wall_s": self.wall_s,
            "banks": self.banks,
            "rows": rows,
        }


@dataclass
class FinetunePlan:
    jobs: list[FinetuneJob]
    reused: list[FinetuneRow]
    backbone_hash: str
    tasks: list[TaskData]


def plan_finetunes(
    cfg: ExperimentConfig, backbone: str | Path, out_dir: str | Path, *, force: bool = False
) -> FinetunePlan:
    """Validate everything and decide what runs; raises FinetuneInputError before any work starts."""
    model_cfg, backbone_hash = backbone_model_config(backbone)
    ft = cfg.finetune
    for method in ft.methods:
        where = f"finetune.method_ranks.{method}" if method in ft.method_ranks else "adapter.rank"
        check_rank(model_cfg, method_adapter(cfg, method).rank, method, where)
    if len(set(ft.methods)) != len(ft.methods):
        raise FinetuneInputError(f"finetune.methods repeats a method: {list(ft.methods)}")
    tasks = resolve_tasks(cfg, image_size=model_cfg.input_size, in_channels=model_cfg.in_channels)
    if ft.mixed and "scratch" in ft.methods:
        raise FinetuneInputError(
            "finetune.methods: 'scratch' trains one model per task; it has no mixed form (finetune.mixed=true)"
        )
    with_maps = [t.name for t in tasks if t.condition is not None]
    if "scratch" in ft.methods and with_maps:
        raise FinetuneInputError(
            f"finetune.methods: 'scratch' trains a plain DiT, which has no condition path for "
            f"the maps of {with_maps}; leave it out for conditional targets"
        )
    if ft.mixed and ft.batch_size < len(tasks):
        raise FinetuneInputError(
            f"finetune.batch_size {ft.batch_size} is smaller than the {len(tasks)} tasks a mixed batch must hold"
        )
    for t in tasks:  # a reader needs one full batch per epoch (a mixed batch holds ~batch_size / tasks of each)
        need = math.ceil(ft.batch_size / len(tasks)) if ft.mixed else ft.batch_size
        have = load_index(t.dataset_dir).num_samples("train")
        if have < need:
            raise FinetuneInputError(
                f"task {t.name!r}: {have} train images at {t.dataset_dir}, fewer than the "
                f"{need} one batch takes (finetune.batch_size {ft.batch_size})"
            )
    out = Path(out_dir).resolve()
    logs = out / "logs"
    jobs: list[FinetuneJob] = []
    reused: list[FinetuneRow] = []
    for variant in finetune_variants(cfg):
        method, vcfg = variant.method, method_config(variant.config(cfg), variant.method)
        rank = vcfg.adapter.rank
        mdir = variant.out_dir(out, ft.methods)
        groups = [tasks] if ft.mixed else [[t] for t in tasks]
        for group in groups:
            lr = method_lr(cfg, method)
            fp = fingerprint(vcfg, method, rank, group, backbone_hash, lr=lr)
            metas = [
                None if force else reusable_adapter(mdir / f"{t.name}.safetensors", backbone_hash, fp) for t in group
            ]
            if all(m is not None for m in metas):
                reused.extend(_row_from_meta(m, mdir, ft.mixed, variant.label) for m in metas)  # type: ignore[arg-type]
                continue
            name = "mixed" if ft.mixed else group[0].name
            log_path = str(logs / (variant.subdir or method) / f"{name}.jsonl")
            spec = AdapterRunSpec(
                tuple(group), method, rank, lr, ft.steps, str(Path(backbone).resolve()), vcfg.to_dict(), log_path
            )
            jobs.append(FinetuneJob(f"{variant.label}/{name}", method, spec, str(mdir), fp, variant.label))
    return FinetunePlan(jobs, reused, backbone_hash, tasks)


def _row_from_meta(meta: dict[str, Any], mdir: Path, mixed: bool, variant: str) -> FinetuneRow:
    res = meta.get("finetune", {})
    return FinetuneRow(
        task=meta["task"],
        method=meta["method"],
        rank=meta["rank"] if uses_rank(meta["method"]) else 0,
        status="reused",
        trainable_params=meta["trainable_params"],
        backbone_params=meta["backbone_params"],
        steps=res.get("steps", 0),
        final_loss=_num(res.get("final_loss")),
        val_loss=_num(res.get("val_loss")),
        wall_s=res.get("wall_s", 0.0),
        images_per_s=res.get("images_per_s", 0.0),
        adapter=str(mdir / f"{meta['task']}.safetensors"),
        log=res.get("log", ""),
        mixed=mixed,
        variant=variant,
    )


def _num(v: Any) -> float:
    return float(v) if v is not None else math.nan


# ------------------------------------------------------------------------------------------------
# One fine-tune (runs inside a Ray task; plain torch)
# ------------------------------------------------------------------------------------------------


def run_finetune_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Train one job's adapters and write their files; returns one FinetuneRow dict per task."""
    t0, started_at = time.perf_counter(), time.time()
    spec = AdapterRunSpec.from_dict(job["spec"])
    run: AdapterRun | None = None
    try:
        run = AdapterRun(spec)
        run.train_until(spec.steps)
        val = run.validation_loss() if _has_eval_split(spec) else {}
        run.write_log({"kind": "val", "step": run.step, "val_loss": val, "loss_unit": LOSS_UNIT})
        wall = time.perf_counter() - t0
        images_per_s = run.images_seen / max(run.train_seconds, 1e-9)
        mixed = len(spec.tasks) > 1
        per_task = {
            t.name: {
                "finetune": {
                    "fingerprint": job["fingerprint"],
                    "steps": run.step,
                    "lr": spec.lr,
                    "batch_size": run.cfg.finetune.batch_size,
                    "final_loss": run.last_window_loss,
                    "val_loss": val.get(t.name),
                    "loss_unit": LOSS_UNIT,
                    "wall_s": wall,
                    "images_per_s": images_per_s,
                    "log": spec.log_path,
                    "data_hash": t.data_hash,
                    "mixed_with": [u.name for u in spec.tasks] if mixed else [],
                }
            }
            for t in spec.tasks
        }
        files = run.save_adapters(job["out_dir"], per_task_extra=per_task)
        return [
            asdict(
                FinetuneRow(
                    task=t.name,
                    method=spec.method,
                    rank=spec.rank if uses_rank(spec.method) else 0,
                    status="ok",
                    trainable_params=run.trainable_parameters(t.name),
                    backbone_params=run.bank.backbone_parameters() if run.bank else run.backbone_params,
                    steps=run.step,
                    final_loss=run.last_window_loss,
                    val_loss=val.get(t.name, math.nan),
                    wall_s=wall,
                    images_per_s=images_per_s,
                    adapter=files[t.name],
                    log=spec.log_path,
                    mixed=mixed,
                    started_at=started_at,
                    finished_at=time.time(),
                    variant=job.get("variant", spec.method),
                )
            )
            for t in spec.tasks
        ]
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        if run is not None:
            run.write_log({"kind": "error", "step": run.step, "error": reason})
        raise FinetuneJobError(reason) from None
    finally:
        if run is not None:
            run.close()


def _has_eval_split(spec: AdapterRunSpec) -> bool:
    return all(load_index(t.dataset_dir).num_samples("eval") > 0 for t in spec.tasks)


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


def failure_reason(err: BaseException) -> str:
    """The user's error from a Ray failure, one line: `ShardError: shards/x/train-000000.tar: ...`."""
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and cause is not None:
        err = cause
    last = last_error_line(err, 500)
    return (last if isinstance(err, FinetuneJobError) else f"{type(err).__name__}: {last}")[:500]


def run_finetunes(
    cfg: ExperimentConfig,
    backbone: str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> FinetuneSummary:
    """Plan, check, run every fine-tune concurrently as Ray tasks, assemble the banks, write summary.json."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    plan = plan_finetunes(cfg, backbone, out_dir, force=force)
    out = Path(out_dir).resolve()
    summary = FinetuneSummary(str(out), str(Path(backbone).resolve()), plan.backbone_hash, rows=list(plan.reused))
    for row in plan.reused:
        log(f"finetune {row.method}/{row.task}: reusing {row.adapter} (same backbone and fingerprint)")
    if plan.jobs:
        connect_ray(cfg)
        ft = cfg.finetune
        gpus = 1.0 if ft.use_gpu else 0.0
        check_fits(ft.cpus_per_task, gpus, "finetune.cpus_per_task / finetune.use_gpu", len(plan.jobs))
        remote = ray.remote(run_finetune_job)
        pending = {}
        for job in plan.jobs:
            # max_retries covers a dead worker (OOM kill, lost node); exceptions are not retried.
            opts = dict(num_cpus=ft.cpus_per_task, num_gpus=gpus, max_retries=1, name=f"finetune[{job.key}]")
            pending[remote.options(**opts).remote(job.to_dict())] = job
        log(f"finetune: {len(plan.jobs)} run(s) submitted, {ft.cpus_per_task:g} CPU / {gpus:g} GPU each")
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                rows = [FinetuneRow(**r) for r in ray.get(done[0])]
                for r in rows:
                    log(
                        f"finetune {job.key}: {r.task} ok, {r.steps} steps, final loss {r.final_loss:.4f}, "
                        f"{r.wall_s:.1f} s"
                    )
            except Exception as err:  # one failed fine-tune never stops the others
                reason = failure_reason(err)
                rank = job.spec.rank if uses_rank(job.method) else 0
                rows = [
                    FinetuneRow(
                        task=t.name,
                        method=job.method,
                        rank=rank,
                        status="failed",
                        reason=reason,
                        log=job.spec.log_path,
                        mixed=len(job.spec.tasks) > 1,
                        variant=job.variant,
                    )
                    for t in job.spec.tasks
                ]
                log(f"finetune {job.key}: FAILED: {reason}")
            summary.rows.extend(rows)
    variants = finetune_variants(cfg)
    order = {(v.label, t.name): i for i, (v, t) in enumerate((v, t) for v in variants for t in plan.tasks)}
    summary.rows.sort(key=lambda r: order.get((r.variant, r.task), len(order)))
    for v in variants:
        files = [r.adapter for r in summary.rows if r.variant == v.label and r.status != "failed"]
        if files and v.method != "scratch":  # a bank holds adapters; scratch rows are whole models
            _, bank_json = save_bank(files, v.out_dir(out, cfg.finetune.methods))
            summary.banks[v.label] = str(bank_json)
    summary.wall_s = time.perf_counter() - t0
    write_summary(summary, out / "summary.json")
    return summary


def write_summary(summary: FinetuneSummary, path: Path) -> None:
    write_text_atomic(path, json.dumps(summary.to_dict(), indent=2, sort_keys=True) + "\n")


def format_table(summary: FinetuneSummary) -> str:
    """The comparison table: one line per (task, method)."""
    head = [
        "task",
        "method",
        "rank",
        "trainable params",
        "% of backbone",
        "steps",
        "final loss",
        "val loss",
        "wall s",
        "status",
    ]
    lines = []
    for r in summary.rows:
        status = r.status if r.status != "failed" else f"FAILED: {r.reason}"
        lines.append(
            [
                r.task,
                r.method + (" (mixed)" if r.mixed else ""),
                str(r.rank) if r.rank else "-",
                f"{r.trainable_params:,}" if r.trainable_params else "-",
                f"{r.trainable_pct:.3f}" if math.isfinite(r.trainable_pct) else "-",
                str(r.steps) if r.steps else "-",
                _fmt(r.final_loss),
                _fmt(r.val_loss),
                f"{r.wall_s:.1f}" if r.wall_s else "-",
                status,
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out.append(
        f"losses: {LOSS_UNIT} (final = mean of the last finetune.log_every steps; val = eval split, fixed "
        f"timesteps and noise); wall: seconds per Ray task; backbone {summary.backbone_hash[:19]}..."
    )
    return "\n".join(out)


def _fmt(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else "-"
