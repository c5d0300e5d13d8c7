"""The sweep: Ray Tune over adapter rank and learning rate per dataset, ASHA on a validation loss, FID last.

    python -m ray_jobs.sweep --config ray_jobs/configs/tiny.yaml --backbone runs/pretrain/backbone.safetensors \
        --out runs/sweep [sweep.num_samples=8 sweep.max_steps=200 ...]
    result = run_sweep(cfg, "runs/pretrain/backbone.safetensors", "runs/sweep")

One `Tuner` per dataset (losses of different datasets do not compare: one ASHA over all would stop the
harder one) runs `sweep_trial` over rank and a log-uniform lr: the fine-tune loop, reporting every
sweep.rung_steps the eval split's diffusion loss at fixed timesteps and noise (so trials compare) with
a safetensors checkpoint. Then the best candidates are scored by FID on the eval actor pool, once Tune
has released its resources, and the lowest wins: DIR/trials.csv, DIR/best.json, the winner copied to
ADAPTERS/<dataset>.safetensors. The experiment name is the dataset plus a fingerprint of the search
space, so rerunning restores an interrupted sweep (`Tuner.restore`) and a changed space starts anew. A
request no node can hold raises `FinetuneInputError` up front instead of staying PENDING forever.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from diffscaler.atomic import atomic_path, copy_file_atomic, write_text_atomic
from diffscaler.cluster import connect_ray, max_cluster_resources
from diffscaler.config import ExperimentConfig, swept_datasets
from diffscaler.data import load_index
from diffscaler.errors import last_error_line
from diffscaler.eval import EvalRequest, FidEvaluator
from diffscaler.train.finetune import (
    FinetuneInputError,
    backbone_model_config,
    check_fits,
    check_rank,
    fingerprint,
    method_config,
    resolve_tasks,
    uses_rank,
)
from diffscaler.train.finetune_loop import LOSS_UNIT, AdapterRun, AdapterRunSpec, TaskData

METRIC = "val_loss"
TRIAL_MAX_FAILURES = 2  # restarts of one trial from its last checkpoint (node loss, crash) before it counts as failed


# ------------------------------------------------------------------------------------------------
# The trial (runs in a Tune trial actor)
# ------------------------------------------------------------------------------------------------


def sweep_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One (dataset, rank, lr) trial: train, report the validation loss + a checkpoint every rung."""
    try:
        _train_trial(config, setup)
    except Exception as err:
        # Re-raised as a plain error whose message names the original: its class may not pickle.
        raise SweepTrialError(f"{type(err).__name__}: {err}") from None


class SweepTrialError(RuntimeError):
    """A trial that failed while running; the message is `<original type>: <original message>`."""


def _train_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    task = TaskData.from_dict(setup["task"])
    spec = AdapterRunSpec(
        (task,),
        setup["method"],
        int(config["rank"]),
        float(config["lr"]),
        setup["max_steps"],
        setup["backbone"],
        setup["experiment"],
    )
    run = AdapterRun(spec)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a restored sweep or a retried trial: continue from the last rung
        with checkpoint.as_directory() as d:
            run.load_state(d)
    fp = fingerprint(run.cfg, spec.method, spec.rank, (task,), run.backbone_hash, lr=spec.lr, steps=spec.steps)
    rung = setup["rung_steps"]
    while run.step < spec.steps:
        run.train_until(min(spec.steps, run.step + rung))
        val = run.validation_loss()[task.name]
        extra = {
            "finetune": {
                "fingerprint": fp,
                "steps": run.step,
                "lr": spec.lr,
                "final_loss": run.last_window_loss,
                "val_loss": val,
                "loss_unit": LOSS_UNIT,
                "sweep": True,
            }
        }
        with tempfile.TemporaryDirectory(prefix="sweep-ckpt-") as d:
            run.save_state(d)
            run.save_adapters(d, extra=extra)
            metrics = {
                METRIC: val,
                "train_loss": run.last_window_loss,
                "step": run.step,
                "rank": spec.rank,
                "lr": spec.lr,
                "trainable_params": run.trainable_parameters(task.name),
            }
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


# ------------------------------------------------------------------------------------------------
# Planning and checks (before any trial starts)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPlan:
    tasks: list[TaskData]
    backbone: str  # absolute path
    backbone_hash: str
    method: str
    ranks: tuple[int, ...]
    num_rungs: int  # validation reports of a full-length trial (ASHA's max_t)


def search_space(cfg: ExperimentConfig, ranks: tuple[int, ...]) -> dict[str, Any]:
    s = cfg.sweep
    lr = tune.loguniform(s.lr_min, s.lr_max) if s.lr_max > s.lr_min else s.lr_min
    if s.lrs:  # a grid: every lr once per sweep.num_samples (the comparison's per-method lr choice)
        lr = tune.grid_search(sorted(set(s.lrs)))
    return {"rank": tune.choice(list(ranks)) if len(ranks) > 1 else ranks[0], "lr": lr}


def sweep_methods(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The methods swept, each its own search: sweep.methods, or adapter.method."""
    return cfg.sweep.methods or (cfg.adapter.method,)


def refuse_unet_sweep(cfg: ExperimentConfig) -> None:
    """The U-Net baseline is not swept (yet): its lrs come from finetune.method_lrs."""
    if cfg.model.arch == "unet":
        raise FinetuneInputError(
            "the sweep runs the DiT only: model.arch unet (the U-Net baseline) takes its lrs from "
            "finetune.method_lrs; leave 'sweep' out of pipeline.stages"
        )


def plan_sweep(cfg: ExperimentConfig, backbone: str | Path, method: str | None = None) -> SweepPlan:
    """Validate the search space, the datasets and the backbone; raises FinetuneInputError."""
    refuse_unet_sweep(cfg)
    s = cfg.sweep
    model_cfg, backbone_hash = backbone_model_config(backbone)
    method = method or cfg.adapter.method
    if uses_rank(method) and method in cfg.finetune.method_ranks:
        ranks = (cfg.finetune.method_ranks[method],)  # a rank fixed per method (a parameter-matched run): lr only
        check_rank(model_cfg, ranks[0], method, f"finetune.method_ranks.{method}")
    elif uses_rank(method):
        if not s.ranks:
            raise FinetuneInputError("sweep.ranks is empty: the search space needs at least one rank")
        bad = [r for r in s.ranks if not isinstance(r, int) or isinstance(r, bool) or r < 1]
        if bad:
            raise FinetuneInputError(f"sweep.ranks: {bad} are not positive integers; the search space is malformed")
        for r in s.ranks:
            check_rank(model_cfg, r, method, "sweep.ranks")
        ranks = tuple(sorted(set(s.ranks)))
    else:
        ranks = (cfg.adapter.rank,)  # difffit / bitfit / full have no rank: the sweep is over lr only
    if not (0 < s.lr_min <= s.lr_max < math.inf):
        raise FinetuneInputError(f"sweep.lr_min/lr_max: need 0 < lr_min <= lr_max, got [{s.lr_min}, {s.lr_max}]")
    num_rungs = math.ceil(s.max_steps / s.rung_steps)
    if not 1 <= s.grace_period <= num_rungs:
        raise FinetuneInputError(
            f"sweep.grace_period {s.grace_period} (rungs) must be in [1, {num_rungs}]: max_steps {s.max_steps} / "
            f"rung_steps {s.rung_steps} gives {num_rungs} rung(s)"
        )
    if s.fid_samples < 2:
        raise FinetuneInputError(f"sweep.fid_samples {s.fid_samples}: FID needs at least 2 generated images")
    swept, missing = swept_datasets(cfg)
    if missing:
        skipped = f"sweep: sweep.datasets {list(missing)} not in data.targets, skipped; sweeping {list(swept)}"
        print(skipped, file=sys.stderr)
    tasks = resolve_tasks(cfg, swept, image_size=model_cfg.input_size, in_channels=model_cfg.in_channels)
    for t in tasks:
        index = load_index(t.dataset_dir)
        if index.num_samples("eval") < 1:
            raise FinetuneInputError(
                f"task {t.name!r}: the eval split at {t.dataset_dir} is empty; the sweep's "
                "validation loss and FID need it (data.eval_fraction > 0)"
            )
        if index.num_samples("train") < cfg.finetune.batch_size:
            raise FinetuneInputError(
                f"task {t.name!r}: {index.num_samples('train')} train images < "
                f"finetune.batch_size {cfg.finetune.batch_size}"
            )
    return SweepPlan(tasks, str(Path(backbone).resolve()), backbone_hash, method, ranks, num_rungs)


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    return {"cpu": cfg.sweep.cpus_per_trial, "gpu": 1.0 if cfg.finetune.use_gpu else 0.0}


def concurrent_trials(cfg: ExperimentConfig) -> int:
    """sweep.max_concurrent_trials, or (0) as many trials as the cluster's resources hold at once."""
    if cfg.sweep.max_concurrent_trials > 0:
        return cfg.sweep.max_concurrent_trials
    total = max_cluster_resources()  # on an autoscaling cluster: what it can grow to
    res = trial_resources(cfg)
    n = math.floor(total.get("CPU", 0.0) / res["cpu"] + 1e-9)
    if res["gpu"]:
        n = min(n, math.floor(total.get("GPU", 0.0) / res["gpu"] + 1e-9))
    return max(1, min(n, cfg.sweep.num_samples * max(1, len(set(cfg.sweep.lrs)))))


def fid_actors(cfg: ExperimentConfig) -> int:
    """Evaluation actors that fit the cluster together (they start after the trials have ended)."""
    total = max_cluster_resources()
    e = cfg.eval
    n = min(e.num_actors, math.floor(total.get("CPU", 0.0) / e.cpus_per_actor + 1e-9))
    if e.gpus_per_actor:
        n = min(n, math.floor(total.get("GPU", 0.0) / e.gpus_per_actor + 1e-9))
    return max(1, n)


def sweep_fingerprint(cfg: ExperimentConfig, plan: SweepPlan, task: TaskData) -> str:
    s, ft = cfg.sweep, cfg.finetune
    content = {
        "base": fingerprint(cfg, plan.method, 0, (task,), plan.backbone_hash, lr=0.0, steps=s.max_steps),
        "ranks": list(plan.ranks),
        "lr": [s.lr_min, s.lr_max],
        "num_samples": s.num_samples,
        **({"lrs": sorted(set(s.lrs))} if s.lrs else {}),
        "rung_steps": s.rung_steps,
        "grace_period": s.grace_period,
        "reduction_factor": s.reduction_factor,
        "batch_size": ft.batch_size,
        "val_samples": ft.val_samples,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:10]


def sweep_fingerprints(cfg: ExperimentConfig, backbone: str | Path) -> dict[str, str]:
    """{dataset (first method) or method/dataset: fingerprint of its Tune experiment}: what a sweep searched."""
    methods = sweep_methods(cfg)
    out = {}
    for method in methods:
        plan = plan_sweep(cfg, backbone, method)
        for t in plan.tasks:
            out[t.name if method == methods[0] else f"{method}/{t.name}"] = sweep_fingerprint(cfg, plan, t)
    return out


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    dataset: str
    trial_id: str
    rank: int
    lr: float
    val_loss: float  # last reported (LOSS_UNIT)
    best_val_loss: float  # lowest reported
    steps: int  # optimizer steps trained
    rungs: int  # validation reports
    status: str  # completed | stopped (ASHA) | error | pending
    trainable_params: int = 0
    fid: float | None = None
    fid_feature_network: str = ""
    fid_samples: int | None = None
    error: str = ""
    checkpoint: str = ""  # the trial's last checkpoint (Tune storage)
    method: str = ""  # the method this trial fine-tuned


@dataclass
class SweepResult:
    out_dir: str
    trials: list[TrialRow] = field(default_factory=list)
    best: dict[str, dict[str, Any]] = field(default_factory=dict)  # the first method's, by dataset
    by_method: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # method -> dataset -> best
    wall_s: float = 0.0


def _trial_rows(task: str, results: tune.ResultGrid, max_steps: int) -> list[TrialRow]:
    rows = []
    for r in results:
        m = r.metrics or {}
        cfg = r.config or {}
        history = r.metrics_dataframe
        vals = list(history[METRIC].dropna()) if history is not None and METRIC in history else []
        steps = int(m.get("step", 0))
        status = "error" if r.error else ("completed" if steps >= max_steps else ("stopped" if steps else "pending"))
        rows.append(
            TrialRow(
                dataset=task,
                trial_id=str(m.get("trial_id", Path(r.path).name)),
                rank=int(cfg.get("rank", 0)),
                lr=float(cfg.get("lr", math.nan)),
                val_loss=float(m.get(METRIC, math.nan)),
                best_val_loss=min(vals) if vals else math.nan,
                steps=steps,
                rungs=len(vals),
                status=status,
                trainable_params=int(m.get("trainable_params", 0)),
                error=_one_line(r.error) if r.error else "",
                checkpoint=r.checkpoint.path if r.checkpoint is not None else "",
            )
        )
    return rows


def _one_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {last_error_line(cause)}"[:300]


def write_trials_csv(rows: list[TrialRow], path: Path) -> None:
    columns = [
        "dataset",
        "method",
        "trial_id",
        "rank",
        "lr",
        "val_loss",
        "best_val_loss",
        "steps",
        "rungs",
        "status",
        "trainable_params",
        "fid",
        "fid_feature_network",
        "fid_samples",
        "error",
    ]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(
                ["" if (v := getattr(r, c)) is None or (isinstance(v, float) and math.isnan(v)) else v for c in columns]
            )


def _write_json(data: Any, path: Path) -> None:
    def finite(v: Any) -> Any:  # NaN/inf are not JSON: write null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v

    write_text_atomic(path, json.dumps(finite(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


def run_sweep(
    cfg: ExperimentConfig,
    backbone: str | Path,
    out_dir: str | Path,
    *,
    adapter_dir: str | Path | None = None,
    storage_path: str | None = None,
    run_fid: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Plan and check, then per dataset: Tune (resume if possible), FID on the best trials, outputs."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    methods = sweep_methods(cfg)
    plans = {m: plan_sweep(cfg, backbone, m) for m in methods}
    out = Path(out_dir).resolve()
    adapters_root = Path(adapter_dir).resolve() if adapter_dir else out / "adapters"
    storage = storage_path or cfg.sweep.storage_path or str(out / "tune")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    run_fid = run_fid and cfg.sweep.fid_candidates > 0
    connect_ray(cfg)
    res = trial_resources(cfg)
    check_fits(res["cpu"], res["gpu"], "sweep.cpus_per_trial / finetune.use_gpu (one trial)", cfg.sweep.num_samples)
    if run_fid:
        check_fits(cfg.eval.cpus_per_actor, cfg.eval.gpus_per_actor, "eval.cpus_per_actor / gpus_per_actor (FID)")
    concurrent = concurrent_trials(cfg)
    out.mkdir(parents=True, exist_ok=True)
    result = SweepResult(str(out))
    for method, plan in plans.items():
        # the first method's winners go into ADAPTERS itself, every other method's into ADAPTERS/<method>/
        adapters = adapters_root if method == methods[0] else adapters_root / method
        best_of = _sweep_method(cfg, plan, out, adapters, storage, concurrent, res, run_fid, result, log)
        result.by_method[method] = best_of
        if method == methods[0]:
            result.best = best_of
        write_trials_csv(result.trials, out / "trials.csv")  # after each search: partial results survive
        _write_json({"loss_unit": LOSS_UNIT, "datasets": result.best, "methods": result.by_method}, out / "best.json")
    result.wall_s = time.perf_counter() - t0
    return result


def _sweep_method(
    cfg: ExperimentConfig,
    plan: SweepPlan,
    out: Path,
    adapters: Path,
    storage: str,
    concurrent: int,
    res: dict[str, float],
    run_fid: bool,
    result: SweepResult,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Every dataset's search for one method; returns {dataset: best.json entry}."""
    best_of: dict[str, dict[str, Any]] = {}
    s = cfg.sweep
    lrs = f"lr grid {sorted(set(s.lrs))}" if s.lrs else f"lr [{s.lr_min:g}, {s.lr_max:g}]"
    log(
        f"sweep: {len(plan.tasks)} dataset(s) x {cfg.sweep.num_samples} trial(s), method {plan.method}, ranks "
        f"{list(plan.ranks)}, {lrs}, {plan.num_rungs} rung(s) of "
        f"{cfg.sweep.rung_steps} steps, {concurrent} concurrent trial(s) at {res['cpu']:g} CPU / {res['gpu']:g} GPU"
    )
    for task in plan.tasks:
        experiment = f"{storage.rstrip('/')}/sweep-{task.name}-{sweep_fingerprint(cfg, plan, task)}"
        rows = _tune_dataset(cfg, plan, task, experiment, concurrent, log)
        if run_fid:
            _score_fid(cfg, plan, task, rows, out, log)
        result.trials.extend(rows)
        best = _choose_best(rows, run_fid)
        if best is not None:
            best_of[task.name] = _install_winner(best, task, adapters, out, plan.method) | {
                "backbone_hash": plan.backbone_hash,
                "sweep_fingerprint": sweep_fingerprint(cfg, plan, task),
                "experiment": experiment,
            }
            log(
                f"sweep {task.name}: best trial {best.trial_id} rank {best.rank} lr {best.lr:.3g} val loss "
                f"{best.val_loss:.4f}"
                + (
                    f" FID {best.fid:.2f} ({best.fid_feature_network}, {best.fid_samples} samples)"
                    if best.fid is not None
                    else ""
                )
            )
        else:
            log(f"sweep {task.name}: no trial finished a rung; no best configuration")
    return best_of


def _tune_dataset(
    cfg: ExperimentConfig, plan: SweepPlan, task: TaskData, experiment: str, concurrent: int, log: Callable[[str], None]
) -> list[TrialRow]:
    """One Tuner over `task` whose experiment lives at `experiment` (storage/name): restored if it exists."""
    s = cfg.sweep
    method_cfg = method_config(cfg, plan.method).to_dict()  # the method's own rank and wrapped layers
    setup = {
        "task": vars(task) | {"class_names": list(task.class_names)},
        "method": plan.method,
        "backbone": plan.backbone,
        "experiment": method_cfg,
        "max_steps": s.max_steps,
        "rung_steps": s.rung_steps,
    }
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, setup=setup), trial_resources(cfg))
    storage, _, name = experiment.rpartition("/")
    if tune.Tuner.can_restore(experiment):
        log(f"sweep {task.name}: restoring experiment {experiment} (finished trials kept, unfinished ones resume)")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=plan.num_rungs,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg, plan.ranks),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="min",
                scheduler=scheduler,
                num_samples=s.num_samples,
                # The generator itself caps concurrency (Tune ignores max_concurrent_trials for it); its
                # seed makes the sampled (rank, lr) configurations the same on every run.
                search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.finetune.seed),
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),  # latest rungs: resume + the adapter
                # A trial lost with its node (a spot reclaim: ActorUnavailableError / actor died) restarts from its
                # last rung checkpoint on another node, as a lost fine-tune task is retried; with 0 it was recorded
                # as failed (tests/test_spot_nodes.py). Tune cannot tell that from an error in the trial's own
                # code, which is therefore retried too (from its checkpoint) before it is recorded as failed.
                failure_config=tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES),
            ),
        )
    results = tuner.fit()
    rows = _trial_rows(task.name, results, s.max_steps)
    for r in rows:
        r.method = plan.method
    failed = [r for r in rows if r.status == "error"]
    log(
        f"sweep {task.name}: {len(rows)} trial(s): {sum(r.status == 'completed' for r in rows)} completed, "
        f"{sum(r.status == 'stopped' for r in rows)} stopped by ASHA, {len(failed)} failed"
        + "".join(f"\n  trial {r.trial_id} failed: {r.error}" for r in failed)
    )
    return rows


def _score_fid(
    cfg: ExperimentConfig, plan: SweepPlan, task: TaskData, rows: list[TrialRow], out: Path, log: Callable[[str], None]
) -> None:
    """FID of the best sweep.fid_candidates trials; a score already computed for the same checkpoint and
    evaluation settings (candidates/<dataset>/<trial>/fid.json) is reused, so a rerun costs nothing."""
    ranked = sorted((r for r in rows if r.checkpoint and math.isfinite(r.val_loss)), key=_val_key)
    todo: list[tuple[TrialRow, Path, dict[str, Any]]] = []
    for r in ranked[: cfg.sweep.fid_candidates]:
        local = out / "candidates" / task.name / r.trial_id
        key = _fid_key(cfg, task, r.checkpoint)
        cached = _read_json(local / "fid.json")
        if cached.get("key") == key and (local / f"{task.name}.safetensors").is_file():
            r.fid, r.fid_feature_network, r.fid_samples = cached["fid"], cached["feature_network"], cached["samples"]
            continue
        _fetch_checkpoint(r.checkpoint, local)
        todo.append((r, local, key))
    if not todo:
        return
    requests = [
        EvalRequest(
            task=task.name,
            adapter_path=str(local / f"{task.name}.safetensors"),
            shards_dir=task.dataset_dir,
            num_samples=cfg.sweep.fid_samples,
            label=r.trial_id,
        )
        for r, local, _ in todo
    ]
    with FidEvaluator(plan.backbone, cfg, num_actors=fid_actors(cfg)) as ev:
        results = ev.evaluate(requests)
    for (r, local, key), e in zip(todo, results, strict=True):
        if e.status == "ok" and e.fid is not None:
            r.fid, r.fid_feature_network, r.fid_samples = float(e.fid), e.feature_network, e.num_generated
            _write_json(
                {
                    "key": key,
                    "fid": r.fid,
                    "feature_network": r.fid_feature_network,
                    "samples": r.fid_samples,
                    "result": e.to_dict(),
                },
                local / "fid.json",
            )
        else:
            log(f"sweep {task.name}: FID of trial {r.trial_id} failed: {e.error}")


def _fid_key(cfg: ExperimentConfig, task: TaskData, checkpoint: str) -> dict[str, Any]:
    e, d = cfg.eval, cfg.diffusion
    return {
        "checkpoint": checkpoint,
        "samples": cfg.sweep.fid_samples,
        "feature_network": e.feature_network,
        "feature_weights_path": e.feature_weights_path,
        "steps": e.sampling_steps,
        "seed": e.seed,
        "num_reference": e.num_reference,
        "sampler": d.sampler,
        "cfg_scale": d.cfg_scale,
        "data_hash": task.data_hash,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _val_key(r: TrialRow) -> tuple[int, float]:
    # Trials that trained all steps first: an early rung's loss flatters a trial ASHA stopped.
    return (0 if r.status == "completed" else 1, r.val_loss if math.isfinite(r.val_loss) else math.inf)


def _fetch_checkpoint(checkpoint_path: str, local: Path) -> None:
    """Copy a trial's checkpoint (local or cloud storage) to `local`."""
    if local.exists():
        shutil.rmtree(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tune.Checkpoint(checkpoint_path).to_directory(str(local))


def _choose_best(rows: list[TrialRow], by_fid: bool) -> TrialRow | None:
    scored = [r for r in rows if r.fid is not None]
    if by_fid and scored:
        return min(scored, key=lambda r: r.fid)
    ranked = sorted((r for r in rows if r.checkpoint and math.isfinite(r.val_loss)), key=_val_key)
    return ranked[0] if ranked else None


def _install_winner(best: TrialRow, task: TaskData, adapters: Path, out: Path, method: str) -> dict:
    """Copy the winning adapter pair into the adapter folder (temp names, JSON last); best.json entry."""
    local = out / "candidates" / task.name / best.trial_id
    if not (local / f"{task.name}.safetensors").is_file():
        _fetch_checkpoint(best.checkpoint, local)
    adapters.mkdir(parents=True, exist_ok=True)
    for ext in (".safetensors", ".json"):
        copy_file_atomic(local / f"{task.name}{ext}", adapters / f"{task.name}{ext}")
    return {
        "trial_id": best.trial_id,
        "method": method,
        "rank": best.rank,
        "lr": best.lr,
        "steps": best.steps,
        "val_loss": best.val_loss if math.isfinite(best.val_loss) else None,
        "fid": best.fid,
        "fid_feature_network": best.fid_feature_network or None,
        "fid_samples": best.fid_samples,
        "selected_by": "fid" if best.fid is not None else "val_loss",
        "adapter": str(adapters / f"{task.name}.safetensors"),
        "trainable_params": best.trainable_params,
    }
