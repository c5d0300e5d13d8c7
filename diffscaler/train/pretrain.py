"""Backbone pretraining: Ray Train `TorchTrainer` workers, each one DeepSpeed ZeRO rank.

    python -m ray_jobs.pretrain --config ray_jobs/configs/tiny.yaml --out runs/pretrain pretrain.zero_stage=3
    result = run_pretrain(cfg, "runs/pretrain")      # library form; connects to Ray if needed

The driver checks all it can before a worker starts (`plan_run`, `check_cluster`: config, shards, output
and storage folders, GPUs, a resumable checkpoint), runs `pretrain_worker` on `pretrain.num_workers`
workers (DeepSpeed from `pretrain.*`, fp32 EMA, the step-indexed shard stream, a checkpoint every
`checkpoint_every` steps to which each rank adds its shard; `ray.train.report` only then, since each call
waits on the controller), and exports `OUT/backbone.safetensors` (EMA weights) and `metrics.jsonl` from
the final checkpoint, so they arrive even when OUT is not on rank 0's machine. Rerunning with the same
storage_path and run_name resumes at the same step, data position and RNG states, once
`check_resumable` has proved the checkpoint is this run's; multi-node storage must be shared (NFS, s3).
A non-finite loss or gradient norm stops every rank at the same step, before any checkpoint, and a marker
stops Ray's restarts from replaying the divergence: a new launch (a lower lr) resumes from the last good one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffscaler.atomic import copy_file_atomic, with_umask_mode
from diffscaler.backbones import backbone_macs, build_backbone
from diffscaler.cluster import connect_ray, max_cluster_resources
from diffscaler.config import ConfigError, ExperimentConfig, config_from_json
from diffscaler.data import storage
from diffscaler.data.build import pretrain_dataset_dir
from diffscaler.data.index import DatasetError, load_index
from diffscaler.data.reader import ShardReader
from diffscaler.data.tarformat import ShardError
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.diffusion.sampling import sample_images
from diffscaler.images import image_grid, save_png
from diffscaler.train.deepspeed_setup import (
    build_optimizer,
    deepspeed_config,
    micro_batch_size,
    resolve_precision,
    skip_cpu_shm_allreduce_build,
    warmup_scheduler,
)
from diffscaler.train.ema import EmaWeights
from diffscaler.train.pretrain_checkpoint import (
    EMA_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    STATE_FILE,
    TrainerState,
    capture_rng,
    checkpoint_dir_name,
    deepspeed_tag,
    export_backbone,
    load_ema_state,
    read_skipped,
    read_state,
    restore_rng,
    resume_checkpoint,
    rng_file,
    skipped_file,
    write_json,
)
from diffscaler.train.train_log import (
    EventLog,
    MetricsLog,
    device_peak_flops,
    follow_progress,
    interactive,
    read_jsonl,
    say,
    training_flops_per_image,
)
from diffscaler.vae import VaeError, configured_vae_hash

CHECKPOINTS_KEPT = 3  # Ray deletes older checkpoint folders of a run
NAN_MARKER = "nonfinite_loss.json"  # in the run folder; stops automatic restarts of a diverged launch
DATA_MARKER = "data_error.json"  # in the run folder; stops automatic restarts of a launch whose data is bad
SAMPLE_GRID_CLASSES = 8  # sample grids: up to this many classes (rows), evenly spread over all classes
SAMPLE_GRID_PER_CLASS = 4  # ... and this many fixed seeds each (columns)


class PretrainError(RuntimeError):
    """The training run failed; the message says where and why."""


class NonFiniteLossError(PretrainError):
    """The all-reduced loss or the gradient norm became NaN or infinite; the message names the step."""


class PretrainDataError(PretrainError):
    """A shard fault (ShardError / DatasetError) stopped the run; the message names the file and sample."""


# ------------------------------------------------------------------------------------------------
# Driver: checks before any worker starts
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainPlan:
    """Resolved, absolute locations of one launch (passed to the workers as a dict)."""

    out_dir: str  # absolute: live logs, then backbone.safetensors + metrics.jsonl
    shards_dir: str  # absolute path or URL of the pretraining shards
    storage_path: str  # absolute path or URL: Ray Train storage
    run_dir: str  # storage_path/run_name: this run's checkpoints and markers
    launch_id: str  # unique per run_pretrain call (tells restarts of this launch from a new launch)
    shards_hash: str  # content hash of the shards (recorded in checkpoints and the backbone)
    shards_data_hash: str  # what is read from them (DatasetIndex.data_hash): labels, size, splits too
    num_samples: int  # training samples in the shards
    class_names: tuple[str, ...]  # class names of the shards (sample grid rows)
    print_lines: bool  # rank 0 prints a line per logged step (False when the driver shows a bar)
    resume_step: int  # step of the latest checkpoint found (0 = fresh run)


def _absolute(path_or_url: str) -> str:
    return path_or_url if "://" in path_or_url else str(Path(path_or_url).expanduser().resolve())


def check_writable(path_or_url: str, field_name: str) -> None:
    """Create the folder and a probe file in it, or raise ConfigError naming the field."""
    probe = storage.join(path_or_url, f".diffscaler-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = storage.filesystem(path_or_url)
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(storage.filesystem(probe)[1], b"ok")
        fs.rm(storage.filesystem(probe)[1])
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"{field_name}: cannot write to {path_or_url!r}: {err}") from None


def check_resumable(
    state: TrainerState, cfg: ExperimentConfig, where: str, shards_hash: str | None = None, data_hash: str | None = None
) -> None:
    """A checkpoint continues only *its own* run: the settings that shaped its DeepSpeed files, its
    weights and its data order, the same model, the same shards (`shards_hash`, when known) and the
    same seeds and schedule. Raises ConfigError naming every difference."""
    p = cfg.pretrain
    same = {
        "pretrain.num_workers": (state.world_size, p.num_workers),
        "pretrain.zero_stage": (state.zero_stage, p.zero_stage),
        "pretrain.global_batch_size": (state.global_batch_size, p.global_batch_size),
        "pretrain.grad_accum_steps": (state.grad_accum_steps, p.grad_accum_steps),
        "pretrain.precision": (state.precision, resolve_precision(p.precision, p.use_gpu)),
        "pretrain.ema_decay": (state.ema_decay, p.ema_decay),
    }
    model = asdict(cfg.model)
    for key in sorted(set(model) | set(state.model)):
        same[f"model.{key}"] = (state.model.get(key), model.get(key))
    if shards_hash is not None:
        same["shards (content hash)"] = (state.shards.get("content_hash"), shards_hash)
    if data_hash is not None:  # the same shards read with other labels, size or split are other data
        same["shards (labels, size, splits: data hash)"] = (state.shards.get("data_hash"), data_hash)
    # Seeds and schedule, from the checkpoint's whole config (absent in checkpoints of older code).
    # lr and warm-up may change only when resuming the last good checkpoint of a run that stopped on
    # a non-finite loss: that is the documented way on from a divergence.
    old = state.config or {}
    diverged = _diverged_after(where.rstrip("/").rsplit("/", 1)[0], state.step) if old else False
    keys = [("pretrain", "seed"), ("data", "seed")] + (
        [] if diverged else [("pretrain", "lr"), ("pretrain", "warmup_steps")]
    )
    for section, key in keys:
        if key in old.get(section, {}):
            same[f"{section}.{key}"] = (old[section][key], getattr(getattr(cfg, section), key))
    diff = [f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in same.items() if a != b]
    if state.step > p.steps:  # more steps continue the same schedule; fewer cannot be undone
        diff.append(f"pretrain.steps: the checkpoint is at step {state.step}, past the config's {p.steps}")
    if diff:
        raise ConfigError(
            f"{where} (step {state.step}) is not a checkpoint of this run, it cannot be resumed with this config: "
            + "; ".join(diff)
            + ". Use the checkpoint's values, or a new pretrain.run_name (or --out) to start over"
        )


def _diverged_after(run_dir: str, step: int) -> bool:
    """Whether the run in `run_dir` stopped on a non-finite loss right after its checkpoint at `step`."""
    try:
        marker = json.loads(storage.read_bytes(storage.join(run_dir, NAN_MARKER)))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return marker.get("last_checkpoint") == step


def plan_run(cfg: ExperimentConfig, out_dir: str | Path, shards_dir: str | None = None) -> PretrainPlan:
    """All checks that need no cluster; raises ConfigError / DatasetError naming the field or file."""
    cfg.validate()
    p, m = cfg.pretrain, cfg.model
    out = _absolute(str(out_dir))
    if "://" in out:
        raise ConfigError(f"--out {out_dir!r}: the output folder must be a local or mounted path")
    check_writable(out, "--out")
    shards = _absolute(shards_dir or pretrain_dataset_dir(cfg.data))
    index = load_index(shards)  # DatasetError naming the folder when missing or malformed
    if index.image_size != m.input_size:
        raise ConfigError(
            f"model.input_size: {m.input_size}, but the shards in {shards} hold "
            f"{index.image_size}x{index.image_size} images"
        )
    if m.in_channels != index.channels:
        kind = "npy latents" if index.latent else "RGB images"
        raise ConfigError(f"model.in_channels: {m.in_channels}, but {shards} holds {kind} ({index.channels} channels)")
    if index.latent and cfg.data.vae:  # as the fine-tunes refuse them: latents of another VAE than data.vae
        try:
            want = configured_vae_hash(cfg.data.vae, cfg.data.vae_config)
        except VaeError as err:
            raise ConfigError(f"data.vae: {err}") from None
        if problem := index.backbone_mismatch(m.in_channels, m.input_size, want):
            raise ConfigError(f"data.vae: {problem}")
    if index.latent and p.sample_every > 0:
        raise ConfigError(
            f"pretrain.sample_every: {p.sample_every}, but {shards} holds latents and sample grids "
            "need a VAE decoder; set pretrain.sample_every=0"
        )
    if index.num_classes > m.num_classes:
        raise ConfigError(
            f"model.num_classes: {m.num_classes}, but the shards in {shards} have {index.num_classes} classes"
        )
    train = index.num_samples("train")
    micro = micro_batch_size(p)
    if (train // p.num_workers) // micro < 1:
        raise DatasetError(
            f"{shards}: {train} training samples cannot give each of pretrain.num_workers={p.num_workers} "
            f"ranks one micro-batch of {micro} (pretrain.global_batch_size={p.global_batch_size}); "
            "lower the batch size or build more data"
        )
    store = _absolute(p.storage_path)
    check_writable(store, "pretrain.storage_path")
    run_dir = storage.join(store, p.run_name)
    found = resume_checkpoint(run_dir)  # the one Ray hands the workers (its snapshot), not the highest folder
    if found is not None:
        check_resumable(found[1], cfg, found[0], index.content_hash, index.data_hash)
    return PretrainPlan(
        out_dir=out,
        shards_dir=shards,
        storage_path=store,
        run_dir=run_dir,
        launch_id=uuid.uuid4().hex,
        shards_hash=index.content_hash,
        shards_data_hash=index.data_hash,
        num_samples=train,
        class_names=tuple(index.class_names),
        print_lines=not interactive(),
        resume_step=found[1].step if found else 0,
    )


def check_cluster(cfg: ExperimentConfig) -> None:
    """Resources a request needs must exist, now or once the autoscaler adds nodes: Ray leaves an
    unplaceable request pending forever."""
    p = cfg.pretrain
    total = max_cluster_resources()
    if p.use_gpu and total.get("GPU", 0) < p.num_workers:
        raise ConfigError(
            f"pretrain.use_gpu: {p.num_workers} workers need {p.num_workers} GPUs, the Ray cluster has "
            f"{total.get('GPU', 0):g}; set pretrain.use_gpu=false or add GPU nodes"
        )
    need = p.num_workers * p.cpus_per_worker
    if total.get("CPU", 0) < need:
        raise ConfigError(
            f"pretrain.cpus_per_worker: {p.num_workers} workers x {p.cpus_per_worker:g} CPUs = {need:g}, "
            f"the Ray cluster has {total.get('CPU', 0):g}"
        )


# ------------------------------------------------------------------------------------------------
# Driver: run
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainResult:
    backbone: Path  # OUT/backbone.safetensors (backbone.json beside it)
    content_hash: str  # the backbone's content hash
    metrics: Path  # OUT/metrics.jsonl
    checkpoint: str  # the final checkpoint folder (in storage)
    step: int  # optimizer steps trained in total
    weights: str  # "ema" or "raw"
    wall_s: float  # seconds this call took (Ray start included when it started Ray)
    skipped_samples: int = 0  # bad samples dropped over the whole run (data.skip_bad_samples=true)
    skipped_files: dict[str, int] | None = None  # {shard: bad samples dropped from it}


def run_pretrain(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    shards_dir: str | None = None,
    *,
    weights: str = "ema",
    fail_at_step: int = -1,
) -> PretrainResult:
    """Pretrain (or resume) the backbone; writes OUT/backbone.safetensors, backbone.json, metrics.jsonl.

    `shards_dir` defaults to `<data.shards_root>/<pretrain dataset>`. Uses the connected Ray cluster
    or connects (`pipeline.ray_address`, RAY_ADDRESS, else local). `weights`: what is exported.
    """
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    start = time.perf_counter()
    plan = plan_run(cfg, out_dir, shards_dir)
    connect_ray(cfg)
    check_cluster(cfg)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    p = cfg.pretrain
    resources = {"CPU": p.cpus_per_worker, **({"GPU": 1} if p.use_gpu else {})}
    trainer = TorchTrainer(
        pretrain_worker,
        # fail_at_step: a test hook (rank 1 exits hard once at that step), not part of the user's config
        train_loop_config={"experiment": cfg.to_dict(), "plan": asdict(plan), "fail_at_step": fail_at_step},
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=p.run_name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=p.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        ),
    )
    out = Path(plan.out_dir)
    say(
        f"pretrain: run {p.run_name!r} in {plan.storage_path}: "
        + (f"resuming from step {plan.resume_step}" if plan.resume_step else "new run")
        + f", {p.steps} steps, {p.num_workers} workers; logs in {out}"
    )
    try:
        with follow_progress(out / METRICS_FILE, p.steps, enabled=not plan.print_lines):
            result = trainer.fit()
    except Exception as err:
        nan = _read_marker(plan, NAN_MARKER)
        if nan is not None:
            raise NonFiniteLossError(nan["message"]) from err
        bad_data = _read_marker(plan, DATA_MARKER)
        if bad_data is not None:
            raise PretrainDataError(bad_data["message"]) from None  # the worker's traceback says nothing more
        raise PretrainError(f"pretrain run {p.run_name!r} in {plan.storage_path} failed: {err}") from err
    if result.checkpoint is None:
        raise PretrainError(f"pretrain run {p.run_name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        state = read_state(ckpt_dir)
        digest = export_backbone(ckpt_dir, out / "backbone.safetensors", weights=weights)
        skipped, skipped_files = read_skipped(ckpt_dir)
        metrics = Path(ckpt_dir) / METRICS_FILE
        copy_file_atomic(metrics, out / METRICS_FILE)
    return PretrainResult(
        backbone=out / "backbone.safetensors",
        content_hash=digest,
        metrics=out / METRICS_FILE,
        checkpoint=result.checkpoint.path,
        step=state.step,
        weights=weights,
        wall_s=time.perf_counter() - start,
        skipped_samples=skipped,
        skipped_files=skipped_files,
    )


def _read_marker(plan: PretrainPlan, name: str) -> dict[str, Any] | None:
    """The marker `name` in the run folder, if this launch wrote it."""
    url = storage.join(plan.run_dir, name)
    try:
        marker = json.loads(storage.read_bytes(url))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return marker if marker.get("launch_id") == plan.launch_id else None


def nonfinite_message(p, step: int, value: float, last_checkpoint: int, run_dir: str, what: str = "loss") -> str:
    """What a non-finite `what` ("loss" or "gradient norm") at `step` means for the run (`p`: the pretrain
    config section)."""
    head = f"pretrain: the {what} is {value} at step {step} (run {p.run_name!r}); stopped without checkpointing it."
    fix = f"Lower pretrain.lr (now {p.lr:g}) or raise pretrain.warmup_steps and rerun"
    if last_checkpoint == 0:  # nothing to continue from: "the last good checkpoint is step 0" would say there is
        none = f"No checkpoint was written yet (pretrain.checkpoint_every={p.checkpoint_every})."
        return f"{head} {none} {fix}: it starts over"
    where = f"The last good checkpoint is step {last_checkpoint} in {run_dir}."
    return f"{head} {where} {fix} with the same run name to continue from it"


# ------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------


def _rank_seed(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + 7919 * (rank + 1)) % (2**63 - 1)


class LossWindow:
    """Per-step losses and gradient norms since the last check, all-reduced in one collective when read.

    Reading them is the only host sync of the loop; it happens at log, checkpoint and sample steps,
    and a non-finite value is located at its exact step.
    """

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []  # local per-step mean losses (0-dim, on device)
        self.norms: list[torch.Tensor] = []  # per-step global gradient norms (0-dim; the same on every rank)
        self.first_step = 0  # step of pending[0]
        self.values: list[float] = []  # reduced losses since the last logged line
        self.skipped = 0  # bad samples dropped by all ranks so far, as of the last reduce

    def add(self, step: int, loss: torch.Tensor, grad_norm: float | torch.Tensor | None = None) -> None:
        """`grad_norm`: DeepSpeed's global gradient norm of the step (None where it computes none)."""
        if not self.pending:
            self.first_step = step
        self.pending.append(loss)
        norm = 0.0 if grad_norm is None else grad_norm  # a float, or a device tensor: no host sync here
        self.norms.append(torch.as_tensor(norm, dtype=torch.float32, device=loss.device).detach().reshape(()))

    def reduce(self, skipped: int = 0) -> tuple[int, float, str] | None:
        """All-reduce the pending losses, gradient norms and this rank's count of skipped samples (one
        collective); returns (step, value, "loss" | "gradient norm") of the first non-finite one, if any."""
        import torch.distributed as dist

        if not self.pending:
            return None
        k = len(self.pending)
        count = torch.tensor([float(skipped)], device=self.pending[0].device)  # exact below 2**24
        local = torch.cat([torch.stack(self.pending).float(), torch.stack(self.norms), count])  # (2k + 1,)
        dist.all_reduce(local)
        self.skipped = int(round(local[-1].item()))
        reduced = (local[:-1] / dist.get_world_size()).tolist()
        losses, norms = reduced[:k], reduced[k:]
        self.pending, self.norms = [], []
        for i, (loss, norm) in enumerate(zip(losses, norms)):
            if not math.isfinite(loss):
                return self.first_step + i, loss, "loss"
            if not math.isfinite(norm):
                return self.first_step + i, norm, "gradient norm"
        self.values.extend(losses)
        return None

    def take_mean(self) -> float:
        mean = sum(self.values) / len(self.values)
        self.values = []
        return mean


class GridSampler:
    """Rank 0: sample grids from the EMA weights (fixed seeds, a few classes) with a plain backbone."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device, class_names: tuple[str, ...], bf16: bool):
        self.cfg, self.device = cfg, device
        self.model = build_backbone(cfg.model).to(device).eval()
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
        n = min(SAMPLE_GRID_CLASSES, len(class_names))
        self.classes = sorted({round(i * (len(class_names) - 1) / max(n - 1, 1)) for i in range(n)})
        self.class_names = [class_names[c] for c in self.classes]
        self.autocast = torch.bfloat16 if bf16 else None

    def grid(self, ema_state: dict[str, torch.Tensor]):
        self.model.load_state_dict(ema_state, strict=False)  # parameters; buffers are the model's own
        labels = [c for c in self.classes for _ in range(SAMPLE_GRID_PER_CLASS)]
        d = self.cfg.diffusion
        images = sample_images(
            self.model,
            self.diffusion,
            num=len(labels),
            seed=self.cfg.pretrain.seed,
            labels=labels,
            steps=d.sampling_steps,
            sampler=d.sampler,
            cfg_scale=d.cfg_scale,
            eta=d.ddim_eta,
            autocast_dtype=self.autocast,
        )
        return image_grid(images, ncols=SAMPLE_GRID_PER_CLASS)  # (rows, cols) = (classes, seeds)


def train_step(
    engine,
    diffusion,
    batches: Iterator[dict[str, torch.Tensor]],
    grad_accum_steps: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """One optimizer step of the DeepSpeed `engine` over `grad_accum_steps` micro-batches.

    Returns this rank's mean loss as a 0-dim tensor on `device` (no host sync).
    """
    step_loss = torch.zeros((), device=device)
    for _ in range(grad_accum_steps):
        batch = next(batches)
        x0 = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W) in [-1, 1]
        y = batch["label"].to(device, non_blocking=True)  # (B,)
        t = diffusion.sample_timesteps(x0.shape[0], device)  # (B,)
        # bf16 weights still meet fp32 tensors (the sinusoidal timestep features): autocast casts them.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            terms = diffusion.training_losses(lambda xt, tt, y=y: engine(xt.to(dtype), tt, y), x0, t)
        loss = terms["loss"].mean()
        engine.backward(loss)  # DeepSpeed scales by 1 / grad_accum_steps
        engine.step()  # the optimizer steps on the last micro-batch of the accumulation
        step_loss += loss.detach().float()
    return step_loss / grad_accum_steps


def _continue_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, steps_done: int) -> None:
    """Put the warm-up schedule (built from this config) at `steps_done`: the next step's lr."""
    scheduler.last_epoch = steps_done
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(steps_done)


def pretrain_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train function, one per rank; reads everything from `loop_config`."""
    import ray.train

    cfg = config_from_json(loop_config["experiment"])
    plan = PretrainPlan(**{**loop_config["plan"], "class_names": tuple(loop_config["plan"]["class_names"])})
    marker = _read_marker(plan, NAN_MARKER)
    if marker is not None:  # an automatic restart of a launch that diverged: replaying it would too
        raise NonFiniteLossError(marker["message"])
    marker = _read_marker(plan, DATA_MARKER)
    if marker is not None:  # ... or that hit a bad shard: the same sample fails the same way every time
        raise PretrainDataError(marker["message"])
    ctx = ray.train.get_context()
    trainer = RankTrainer(
        cfg, plan, ctx.get_world_rank(), ctx.get_world_size(), fail_at_step=loop_config.get("fail_at_step", -1)
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            trainer.restore(ckpt_dir, checkpoint.path)
    trainer.train()


class RankTrainer:
    """One rank of the run: DeepSpeed engine, EMA, data stream, and (rank 0) the logs and samples."""

    def __init__(self, cfg: ExperimentConfig, plan: PretrainPlan, rank: int, world: int, fail_at_step: int = -1):
        import ray.train.torch

        self.fail_at_step = fail_at_step
        p = cfg.pretrain
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if p.use_gpu else "cpu")
        import deepspeed

        self.cfg, self.p, self.plan, self.rank, self.world = cfg, p, plan, rank, world
        deepspeed.utils.logger.setLevel(logging.WARNING)
        skip_cpu_shm_allreduce_build()
        self.device = ray.train.torch.get_device()
        if p.use_gpu:
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(p.precision, p.use_gpu)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32

        # The same initial weights on every rank (ZeRO-3 partitions each rank's own copy).
        model = build_backbone(cfg.model, seed=p.seed)
        model.check_inputs = False  # the reader checked labels and shapes; the checks would sync every step
        model.set_grad_checkpointing(p.grad_checkpointing)
        params = {n for n, _ in model.named_parameters()}
        self.buffers = {n: t.detach().float().clone() for n, t in model.state_dict().items() if n not in params}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, p),
            lr_scheduler=warmup_scheduler(p.warmup_steps),
            config=deepspeed_config(p, world_size=world, use_gpu=p.use_gpu),
        )
        self.ema = EmaWeights(self.engine.module, p.ema_decay)
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
        self.sampler = None
        if rank == 0 and p.sample_every > 0:
            self.sampler = GridSampler(cfg, self.device, plan.class_names, bf16=self.precision == "bf16")
        # After every other draw from the global RNG (the sampler's model init is one), so a resumed
        # run restores exactly the stream that an uninterrupted one continues with.
        torch.manual_seed(_rank_seed(p.seed, rank))  # timesteps, noise, label dropout: one stream per rank

        device_name = torch.cuda.get_device_name(self.device) if p.use_gpu else ""
        self.peak_flops, self.peak_source = device_peak_flops(p.peak_tflops, p.use_gpu, device_name)
        self.flops_per_image = training_flops_per_image(backbone_macs(cfg.model))
        self.step = self.micro_step = self.images_seen = 0  # optimizer steps, data position, images
        self.history: list[dict[str, Any]] | None = None  # rank 0: the resumed checkpoint's metrics
        self.resumed_from: str | None = None
        self.reader = None
        # bad samples this rank dropped before the checkpoint it resumed from (its reader counts the rest)
        self.skipped_before: dict[str, Any] = {"count": 0, "files": {}}

    def restore(self, ckpt_dir: str, where: str) -> None:
        """Continue from a checkpoint folder: DeepSpeed shards, EMA, RNG, step, data position."""
        state = read_state(ckpt_dir)
        check_resumable(state, self.cfg, where, self.plan.shards_hash, self.plan.shards_data_hash)
        # The schedule is rebuilt from this config (not loaded): after a divergence the lr may change.
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag=state.deepspeed_tag, load_lr_scheduler_states=False)
        if path is None:
            raise PretrainError(f"{where}: DeepSpeed found no checkpoint {state.deepspeed_tag!r} in it")
        _continue_schedule(self.scheduler, state.step)
        self.ema.load_full_state(load_ema_state(ckpt_dir), state.ema_updates)
        restore_rng(json.loads(Path(ckpt_dir, rng_file(self.rank)).read_text()))
        if Path(ckpt_dir, skipped_file(self.rank)).is_file():
            self.skipped_before = json.loads(Path(ckpt_dir, skipped_file(self.rank)).read_text())
        if self.rank == 0:
            self.history = read_jsonl(Path(ckpt_dir) / METRICS_FILE)
        self.step, self.micro_step, self.images_seen = state.step, state.micro_step, state.images_seen
        self.resumed_from = where

    def train(self) -> None:
        try:
            self._train()
        except (ShardError, DatasetError) as err:
            self._stop_on_data_error(err)

    def _train(self) -> None:
        import torch.distributed as dist

        p, data = self.p, self.cfg.data
        self.reader = reader = ShardReader(
            self.plan.shards_dir,
            "train",
            micro_batch_size(p),
            rank=self.rank,
            world_size=self.world,
            seed=data.seed,
            hflip=data.hflip,
            skip_bad=data.skip_bad_samples,
            loader_workers=data.loader_workers,
            shuffle_buffer=data.shuffle_buffer,
        )
        stream = reader.stream(start_step=self.micro_step)
        self._open_logs()
        self.window, self.last_checkpoint = LossWindow(), self.step
        self.window_start, self.window_images, self.overhead = time.perf_counter(), 0, 0.0
        while self.step < p.steps:
            self.step += 1
            self._inject_failure_once()
            lr = self.engine.get_lr()[0]  # the lr of this step (the schedule advances inside engine.step)
            loss = train_step(self.engine, self.diffusion, stream, p.grad_accum_steps, self.dtype, self.device)
            self.micro_step += p.grad_accum_steps
            self.images_seen += p.global_batch_size
            self.window_images += p.global_batch_size
            self.ema.update()
            self.window.add(self.step, loss, self.engine.get_global_grad_norm())

            final = self.step == p.steps
            is_log = self.step % p.log_every == 0 or final
            is_checkpoint = self.step % p.checkpoint_every == 0 or final
            is_sample = p.sample_every > 0 and (self.step % p.sample_every == 0 or final)
            if not (is_log or is_checkpoint or is_sample):
                continue
            bad = self.window.reduce(self._skipped()["count"])  # the same values on every rank: all stop together
            if bad is not None:
                self._stop_on_nonfinite(*bad)
            record = self._log(lr) if is_log else None
            if is_checkpoint or is_sample:
                extra_start = time.perf_counter()
                self._samples_and_checkpoint(is_checkpoint, is_sample, record)
                self.overhead += time.perf_counter() - extra_start
                dist.barrier()  # rank 0 sampled alone; start the next step together
        if self.rank == 0:
            self.events.write("done", step=self.step, images_seen=self.images_seen)
            self.log.close()
            say(f"pretrain: done at step {self.step}, {self.images_seen} images seen")

    # -- rank 0's sinks ----------------------------------------------------------------------------

    def _open_logs(self) -> None:
        self.log = self.events = None
        if self.rank != 0:
            return
        p, out = self.p, Path(self.plan.out_dir)
        self.log = MetricsLog(
            out, start_step=self.step, total_steps=p.steps, print_lines=self.plan.print_lines, history=self.history
        )
        self.events = EventLog(out)
        common = {
            "step": self.step,
            "world_size": self.world,
            "zero_stage": p.zero_stage,
            "precision": self.precision,
            "peak_flops_per_device": self.peak_flops,
            "peak_source": self.peak_source,
            "launch_id": self.plan.launch_id,
        }
        if self.resumed_from is not None:
            self.events.write("resume", checkpoint=self.resumed_from, discarded=self.log.discarded, **common)
        else:
            self.events.write("start", **common)
        say(
            f"pretrain: {'resuming at' if self.resumed_from else 'starting at'} step {self.step}/{p.steps}, "
            f"{self.world} workers, ZeRO-{p.zero_stage}, {self.precision}; MFU against {self.peak_source}"
        )

    def _log(self, lr: float) -> dict[str, Any]:
        """The metrics line of this step (every rank computes it; rank 0 writes it)."""
        elapsed = max(time.perf_counter() - self.window_start - self.overhead, 1e-9)
        images_per_s = self.window_images / elapsed  # whole job: every rank waits on the others each step
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.step,
            "loss": self.window.take_mean(),
            "lr": lr,
            "images_per_s": images_per_s,
            "mfu": images_per_s * self.flops_per_image / (self.peak_flops * self.world),
            "grad_norm": None if grad_norm is None else float(grad_norm),
        }
        if self.cfg.data.skip_bad_samples:
            record["skipped_samples"] = self.window.skipped  # all ranks, whole run
        if self.log is not None:
            self.log.log(record)
        self.window_start, self.window_images, self.overhead = time.perf_counter(), 0, 0.0
        return record

    # -- samples and checkpoints ---------------------------------------------------------------------

    def _samples_and_checkpoint(self, is_checkpoint: bool, is_sample: bool, record: dict[str, Any] | None) -> None:
        ema = self.ema
        ema_state = ema.full_state() if (ema.partitioned or self.rank == 0) else {}  # collective under ZeRO-3
        grid = self.sampler.grid(ema_state) if (self.sampler is not None and is_sample) else None
        if grid is not None:
            path = Path(self.plan.out_dir) / "samples" / f"step{self.step:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(grid, path)
            self.events.write(
                "samples",
                step=self.step,
                path=str(path),
                rows=self.sampler.class_names,
                columns=f"{SAMPLE_GRID_PER_CLASS} seeds",
            )
        if not is_checkpoint:
            return
        p, plan = self.p, self.plan
        state = TrainerState(
            step=self.step,
            micro_step=self.micro_step,
            images_seen=self.images_seen,
            ema_updates=ema.num_updates,
            ema_decay=p.ema_decay,
            world_size=self.world,
            zero_stage=p.zero_stage,
            precision=self.precision,
            global_batch_size=p.global_batch_size,
            grad_accum_steps=p.grad_accum_steps,
            deepspeed_tag=deepspeed_tag(self.step),
            run_name=p.run_name,
            model=asdict(self.cfg.model),
            shards={
                "url": plan.shards_dir,
                "content_hash": plan.shards_hash,
                "data_hash": plan.shards_data_hash,
                "num_samples": plan.num_samples,
                "class_names": list(plan.class_names),
            },
            config=self.cfg.to_dict(),
        )
        metrics = {
            "step": self.step,
            "images_seen": self.images_seen,
            "skipped_samples": self.window.skipped,
            **({"loss": record["loss"]} if record else {}),
        }
        self._save_and_report(state, ema_state, grid, metrics)
        self.last_checkpoint = self.step
        if self.events is not None:
            self.events.write(
                "checkpoint", step=self.step, name=checkpoint_dir_name(self.step), skipped_samples=self.window.skipped
            )

    def _save_and_report(
        self, state: TrainerState, ema_state: dict[str, torch.Tensor], grid, metrics: dict[str, Any]
    ) -> None:
        """Every rank writes its part into its own temp folder and reports it; Ray merges the parts."""
        import ray.train
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="diffscaler-ckpt-") as tmp:
            self.engine.save_checkpoint(tmp, tag=state.deepspeed_tag)  # collective: each rank its ZeRO shard
            write_json(Path(tmp, rng_file(self.rank)), capture_rng())
            write_json(Path(tmp, skipped_file(self.rank)), self._skipped())
            if self.rank == 0:
                save_file({**ema_state, **self.buffers}, str(Path(tmp, EMA_FILE)))
                with_umask_mode(Path(tmp, EMA_FILE))  # safetensors writes 0600
                shutil.copyfile(self.log.path, Path(tmp, METRICS_FILE))
                if grid is not None:
                    save_png(grid, Path(tmp, SAMPLES_FILE))
                Path(tmp, STATE_FILE).write_text(state.to_json())  # last: marks the folder complete
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(state.step),
            )
        # Wait until the controller has registered it: a rank that died right after reporting could
        # otherwise take the checkpoint with it, and the restart would begin at an older one.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def _skipped(self) -> dict[str, Any]:
        """This rank's bad samples dropped over the whole run: {"count", "files": {shard: count}}."""
        files = dict(self.skipped_before["files"])
        if self.reader is not None:
            for url, n in self.reader.skipped_files.items():
                files[url] = files.get(url, 0) + n
        return {"count": sum(files.values()), "files": files}

    # -- failures ----------------------------------------------------------------------------------

    def _stop_on_nonfinite(self, step: int, value: float, what: str) -> None:
        import torch.distributed as dist

        p, plan = self.p, self.plan
        message = nonfinite_message(p, step, value, self.last_checkpoint, plan.run_dir, what)
        if self.rank == 0:
            marker = {
                "launch_id": plan.launch_id,
                "step": step,
                "value": str(value),
                "what": what,
                "last_checkpoint": self.last_checkpoint,
                "message": message,
            }
            storage.write_bytes_atomic(storage.join(plan.run_dir, NAN_MARKER), json.dumps(marker).encode())
            self.events.write(
                "nonfinite_loss", step=step, value=str(value), what=what, last_checkpoint=self.last_checkpoint
            )
        dist.barrier()  # the marker exists before any rank fails (Ray tears the group down on the first)
        raise NonFiniteLossError(message)

    def _stop_on_data_error(self, err: Exception) -> None:
        """A bad shard fails the same way on every retry: a marker makes Ray's restarts of this launch
        stop at once (see pretrain_worker), and the driver reports this message instead of Ray's."""
        plan = self.plan
        message = (
            f"pretrain: data error at step {self.step} on rank {self.rank}: {err}. Retrying cannot help: "
            f"run `diffscaler shards check {plan.shards_dir}` and rebuild the dataset, or set "
            "data.skip_bad_samples=true to skip such samples (they are counted in backbone.json)"
        )
        marker = {"launch_id": plan.launch_id, "step": self.step, "rank": self.rank, "message": message}
        storage.write_bytes_atomic(storage.join(plan.run_dir, DATA_MARKER), json.dumps(marker).encode())
        if getattr(self, "events", None) is not None:  # None before the logs are open (a reader that cannot start)
            self.events.write("data_error", step=self.step, rank=self.rank, error=str(err))
        raise PretrainDataError(message) from err

    def _inject_failure_once(self) -> None:
        """Testing hook `run_pretrain(fail_at_step=)`: rank 1 dies hard, once per run folder."""
        if self.step != self.fail_at_step or self.rank != min(1, self.world - 1):
            return
        marker = storage.join(self.plan.run_dir, f"injected_failure_step{self.step:08d}.json")
        if storage.exists(marker):
            return
        storage.write_bytes_atomic(marker, json.dumps({"step": self.step, "rank": self.rank}).encode())
        say(f"pretrain: rank {self.rank} exits hard at step {self.step} (fail_at_step test hook)")
        os._exit(1)
