"""One adapter fine-tune as a plain torch loop: frozen backbone, only the bank's parameters trained.

Shared by the parallel fine-tunes (`diffscaler.train.finetune`, one Ray task each) and the sweep
(`diffscaler.train.sweep`, one Tune trial each). No Ray in here, so it runs and is tested alone:

    run = AdapterRun(AdapterRunSpec(tasks=(task,), method="affiner", rank=8, lr=1e-3, steps=200,
                                    backbone_path="runs/backbone.safetensors", config=cfg.to_dict()))
    run.train_until(200)                      # AdamW + linear warm-up + grad clip, diffusion MSE loss
    run.validation_loss()                     # {task: mean MSE} on the eval split, fixed t and noise
    run.save_adapters("runs/adapters")        # <task>.safetensors + <task>.json (artifacts.save_adapter)

One task trains with an int task id (the bank's single-task fast path); several tasks train together
from a `MixedTaskReader` whose batches carry per-sample task ids (the bank's mixed path).

Determinism: step k seeds torch's RNG from (finetune seed, k) - timesteps, noise and label dropout -
and the reader's step k batch is a pure function of (data seed, k), so a run resumed at step k from
`save_state` continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffscaler.adapters import AdapterBank, TaskInfo
from diffscaler.adapters.conv import ConvBank
from diffscaler.artifacts import load_backbone, save_adapter, save_task_model
from diffscaler.atomic import with_umask_mode
from diffscaler.backbones import attach_bank, build_backbone
from diffscaler.config import ExperimentConfig, config_from_json
from diffscaler.data import MixedTaskReader, ShardReader, load_index, read_split
from diffscaler.data.conditions import maps_to_unit
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.diffusion.gaussian import ModelFn
from diffscaler.models.compile import compile_blocks, resolve_compile

LOSS_UNIT = "MSE of the predicted noise, per element"
VALIDATION_SEED = 1234  # fixed timesteps/noise: comparable across trials, steps and runs


@dataclass(frozen=True)
class TaskData:
    """One target dataset as a fine-tune sees it (resolved from the shard index by the planner)."""

    name: str  # task name (adapter file stem)
    dataset_dir: str  # shard folder: <shards_root>/<name>
    conditional: bool  # one conditioning row per class (labels from the shards) or one row, label 0
    num_classes: int  # classes in the shard index (rows = this when conditional, else 1)
    class_names: tuple[str, ...] = ()
    data_hash: str = ""  # index.json content hash: part of the rerun fingerprint
    # The spatial condition its shards carry (condition_record), None for a task without maps: what the
    # adapter JSON records as `condition_extractor`, so sampling extracts maps the way the shards did.
    condition: dict[str, Any] | None = None

    def task_info(self, rank: int) -> TaskInfo:
        rows = self.num_classes if self.conditional else 1
        names = self.class_names if self.conditional else ()
        if self.condition is None:
            return TaskInfo(self.name, rows, self.conditional, rank, names)
        c = self.condition
        return TaskInfo(
            self.name,
            rows,
            self.conditional,
            rank,
            names,
            condition=str(c["kind"]),
            condition_channels=int(c["channels"]),
            condition_size=int(c["size"]),
            condition_extractor=dict(c),
        )

    @property
    def condition_channels(self) -> int:
        """Channels of the task's condition maps (0 = no condition)."""
        return int(self.condition["channels"]) if self.condition else 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskData:
        return cls(**{**d, "class_names": tuple(d.get("class_names", ()))})


def condition_record(index: Any) -> dict[str, Any] | None:
    """A shard index's condition as adapter files record it (`condition_extractor`): kind, extractor
    parameters, map channels and side (pixels, also for latent shards); None for a dataset without maps."""
    spec = index.condition
    if spec is None:
        return None
    return {**spec.record(), "channels": int(spec.channels), "size": int(index.pixel_size)}


@dataclass(frozen=True)
class AdapterRunSpec:
    tasks: tuple[TaskData, ...]  # one task, or several trained together (mixed batches)
    method: str  # affiner | difffit | lora | bitfit | full
    rank: int  # adapter rank (affiner, lora); recorded for the others
    lr: float  # peak AdamW learning rate
    steps: int  # optimizer steps of the whole run (warm-up and the log use it)
    backbone_path: str  # backbone.safetensors (or a public DiT .pt)
    config: dict[str, Any] = field(default_factory=dict)  # ExperimentConfig.to_dict(): everything else
    log_path: str = ""  # JSONL loss log ("" = none)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": [vars(t) | {"class_names": list(t.class_names)} for t in self.tasks],
            "method": self.method,
            "rank": self.rank,
            "lr": self.lr,
            "steps": self.steps,
            "backbone_path": self.backbone_path,
            "config": self.config,
            "log_path": self.log_path,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterRunSpec:
        return cls(**{**d, "tasks": tuple(TaskData.from_dict(t) for t in d["tasks"])})


def lr_factor(step: int, *, warmup: int, steps: int, schedule: str) -> float:
    """The lr multiplier of optimizer step `step` (0-based): a linear warm-up over `warmup` steps, then
    constant, or a cosine from 1 down to 0 at the run's last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, steps - warmup)  # the cosine's length: every step after the warm-up
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup + 1) / span)))


def step_seed(seed: int, step: int) -> int:
    """A stable per-step seed (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(f"finetune/{seed}/{step}".encode()).digest()[:8], "big") >> 1


class AdapterRun:
    """Backbone + bank + optimizer + data stream of one fine-tune; `train_until(k)` advances it."""

    def __init__(self, spec: AdapterRunSpec, device: str | None = None):
        self.spec = spec
        self.cfg: ExperimentConfig = config_from_json(spec.config) if spec.config else ExperimentConfig()
        ft = self.cfg.finetune
        if device is None:
            if ft.use_gpu and not torch.cuda.is_available():
                raise RuntimeError("finetune.use_gpu is true but this process sees no CUDA device")
            device = "cuda" if ft.use_gpu else "cpu"
        self.device = torch.device(device)
        self.model, meta = load_backbone(spec.backbone_path)
        self.backbone_hash: str = meta["content_hash"]
        size = self.model.config.input_size
        for task in spec.tasks:
            # A cheap, early, named error instead of a shape error deep in the first forward.
            problem = load_index(task.dataset_dir).backbone_mismatch(self.model.config.in_channels, size)
            if problem:
                raise ValueError(f"task {task.name!r}: {problem} ({spec.backbone_path})")
        a = self.cfg.adapter
        infos = [t.task_info(spec.rank) for t in spec.tasks]
        self.bank: AdapterBank | ConvBank | None = None
        self.backbone_params = self.model.num_parameters()
        if spec.method == "scratch":
            # The comparison's lower bar: the same DiT from random init, every parameter trained, on the task
            # alone; its classes are the task's own (one row for an unconditional task).
            if len(spec.tasks) != 1:
                raise ValueError("method 'scratch' trains one task per model; it has no mixed-task form")
            config = dataclasses.replace(self.model.config, num_classes=infos[0].num_classes)
            self.model = build_backbone(config, seed=ft.seed)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            # conditional tasks: their maps are dropped at finetune.condition_dropout so guidance can use them
            self.bank = attach_bank(  # the DiT's AdapterBank or the U-Net's ConvBank (DiT-only options unused)
                self.model,
                infos,
                method=spec.method,
                rank=spec.rank,
                targets=a.targets,
                branch_scale_init=a.branch_scale_init,
                seed=ft.seed,
                condition_blocks=a.condition_blocks,
                controlnet_blocks=a.controlnet_blocks,
                condition_dropout=ft.condition_dropout,
            )
            self.params = self.bank.parameters()
        self.model.to(self.device).train()
        # Input checks sync with the host every forward; on a GPU the reader already validated labels.
        self.model.check_inputs = self.device.type == "cpu"
        self.compile_backend = resolve_compile(ft.compile, self.device)
        if self.compile_backend:  # each block compiled in place; parameters and state-dict keys unchanged
            compile_blocks(self.model, self.compile_backend)
        # fused on a GPU: the bank is hundreds of small tensors, where per-tensor kernel launches dominate;
        # foreach on the CPU (torch picks the per-tensor loop there), for the same reason
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=spec.lr, weight_decay=0.0, fused=fused, foreach=None if fused else True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            partial(lr_factor, warmup=max(0, ft.warmup_steps), steps=spec.steps, schedule=ft.lr_schedule),
        )
        self.diffusion = GaussianDiffusion.from_config(self.cfg.diffusion, learn_sigma=self.model.config.learn_sigma)
        self.step = 0
        self.recent: list[float] = []  # training losses since the last log line
        self.last_window_loss = math.nan  # mean training loss of the last logged window
        self.images_seen = 0
        self.train_seconds = 0.0
        self._stream = None
        self._val_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._log_file = None
        self._resumed = False  # set by load_state: the log is appended to, not restarted
        if spec.log_path:
            Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)

    # -- data -------------------------------------------------------------------------------------
    def _reader_kwargs(self) -> dict[str, Any]:
        d = self.cfg.data
        return dict(
            seed=d.seed,
            hflip=d.hflip,
            skip_bad=d.skip_bad_samples,
            loader_workers=d.loader_workers,
            shuffle_buffer=d.shuffle_buffer,
        )

    def _open_stream(self):
        batch = self.cfg.finetune.batch_size
        if len(self.spec.tasks) == 1:
            reader = ShardReader(self.spec.tasks[0].dataset_dir, "train", batch, task_id=0, **self._reader_kwargs())
        else:
            dirs = [(t.dataset_dir, i) for i, t in enumerate(self.spec.tasks)]
            reader = MixedTaskReader.from_dirs(dirs, batch, **self._reader_kwargs())
        return reader.stream(start_step=self.step)

    def _labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Unconditional tasks have one conditioning row: label 0 whatever the shard's class says.
        conditional = torch.tensor([t.conditional for t in self.spec.tasks])
        return torch.where(conditional[batch["task_id"]], batch["label"], torch.zeros_like(batch["label"]))

    # -- training ---------------------------------------------------------------------------------
    def _model_fn(
        self,
        y: torch.Tensor,
        task_ids: torch.Tensor | int,
        condition: torch.Tensor | None = None,
        has_condition: torch.Tensor | None = None,
    ) -> ModelFn:
        if self.bank is None:  # scratch: a plain DiT whose classes are the task's
            return lambda x_t, t: self.model(x_t, t, y)  # (N, C_out, H, W)
        if condition is None:
            return lambda x_t, t: self.model(x_t, t, y, task_ids)  # (N, C_out, H, W)
        # maps (N, C_cond, S, S) in [-1, 1]; has_condition (N,) marks the rows whose task takes one
        return lambda x_t, t: self.model(x_t, t, y, task_ids, condition=condition, condition_mask=has_condition)

    def _conditions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The batch's maps and row mask on the device, or (None, None) when no task of the run has maps."""
        if "condition" not in batch or self.bank is None:
            return None, None
        return (
            batch["condition"].to(self.device, non_blocking=True),  # (B, C_cond, S, S)
            batch["has_condition"].to(self.device),
        )  # (B,)

    def train_until(self, until_step: int, on_log: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run optimizer steps self.step .. until_step - 1; a log line every finetune.log_every steps."""
        if self._stream is None:
            self._stream = self._open_stream()
        ft = self.cfg.finetune
        single = len(self.spec.tasks) == 1
        per_task: dict[int, list[float]] = {}
        while self.step < until_step:
            t0 = time.perf_counter()
            batch = next(self._stream)
            x0 = batch["image"].to(self.device, non_blocking=True)  # (B, 3, H, W) in [-1, 1]
            y = self._labels(batch).to(self.device)  # (B,)
            ids = 0 if single else batch["task_id"].to(self.device)  # int: the fast path; (B,): mixed
            cond, has_cond = self._conditions(batch)
            torch.manual_seed(step_seed(ft.seed, self.step))  # t, noise, label and condition dropout of this step
            t = self.diffusion.sample_timesteps(x0.shape[0], self.device)  # (B,)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                losses = self.diffusion.training_losses(self._model_fn(y, ids, cond, has_cond), x0, t)["loss"]
            loss = losses.mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(self.params, ft.grad_clip) if ft.grad_clip > 0 else torch.tensor(0.0)
            )
            self.optimizer.step()
            self.scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {self.step} (lr {self.spec.lr}); lower the lr")
            self.recent.append(value)
            if not single:
                for i in batch["task_id"].unique().tolist():
                    per_task.setdefault(i, []).append(float(losses.detach()[batch["task_id"] == i].mean()))
            self.step += 1
            self.images_seen += x0.shape[0]
            self.train_seconds += time.perf_counter() - t0
            if self.step % ft.log_every == 0 or self.step == until_step:
                line = self._log_line(float(grad_norm), per_task)
                per_task = {}
                if on_log is not None:
                    on_log(line)

    def _log_line(self, grad_norm: float, per_task: dict[int, list[float]]) -> dict[str, Any]:
        self.last_window_loss = sum(self.recent) / len(self.recent)
        self.recent = []
        line: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "loss": self.last_window_loss,
            "loss_unit": LOSS_UNIT,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "images_per_s": self.images_seen / max(self.train_seconds, 1e-9),
            "train_s": self.train_seconds,
        }
        if per_task:
            line["task_loss"] = {self.spec.tasks[i].name: sum(v) / len(v) for i, v in sorted(per_task.items())}
        self.write_log(line)
        return line

    def write_log(self, line: dict[str, Any]) -> None:
        if not self.spec.log_path:
            return
        if self._log_file is None:
            # A fresh run starts a fresh log; a resumed one appends to it.
            self._log_file = open(self.spec.log_path, "a" if self._resumed else "w")  # noqa: SIM115
        self._log_file.write(json.dumps(line, sort_keys=True) + "\n")
        self._log_file.flush()

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- validation -------------------------------------------------------------------------------
    def _validation_batch(self, task: TaskData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if task.name not in self._val_cache:
            split = read_split(
                task.dataset_dir, "eval", limit=self.cfg.finetune.val_samples, conditions=task.condition is not None
            )
            images, labels = split[:2]
            if images.dtype == np.float32:  # latent shards: (N, C, h, w) as stored
                x0 = torch.from_numpy(images)
            else:
                x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, H, W)
            y = torch.from_numpy(labels) if task.conditional else torch.zeros(len(labels), dtype=torch.long)
            maps = torch.from_numpy(maps_to_unit(split[2])) if len(split) > 2 else None  # (N, C_cond, S, S)
            self._val_cache[task.name] = (x0, y, maps)
        return self._val_cache[task.name]

    @torch.no_grad()
    def validation_loss(self, batch_size: int = 64) -> dict[str, float]:
        """{task: mean diffusion loss} on the first finetune.val_samples eval-split images, fixed evenly spread
        timesteps and fixed noise (comparable across trials, steps and runs)."""
        self.model.eval()  # no label dropout: the number depends on the adapter only
        out: dict[str, float] = {}
        try:
            for i, task in enumerate(self.spec.tasks):
                x0, y, maps = self._validation_batch(task)
                n = x0.shape[0]
                g = torch.Generator().manual_seed(VALIDATION_SEED)
                noise = torch.randn(x0.shape, generator=g)  # (N, 3, H, W)
                # t_k spread over [0, T): a stratified estimate of the loss averaged over timesteps.
                t = ((torch.arange(n) + 0.5) * self.diffusion.num_timesteps / n).long()  # (N,)
                total = 0.0
                for lo in range(0, n, batch_size):
                    sl = slice(lo, lo + batch_size)
                    xb, yb, tb = x0[sl].to(self.device), y[sl].to(self.device), t[sl].to(self.device)
                    cb = mb = None
                    if maps is not None and self.bank is not None:  # the task's own maps, every row with one
                        cb = maps[sl].to(self.device)  # (n, C_cond, S, S)
                        mb = torch.ones(len(cb), dtype=torch.bool, device=self.device)
                    fn = self._model_fn(yb, i, cb, mb)
                    losses = self.diffusion.training_losses(fn, xb, tb, noise[sl].to(self.device))
                    losses = losses["loss"]
                    total += float(losses.sum())
                out[task.name] = total / n
        finally:
            self.model.train()
        return out

    # -- outputs ----------------------------------------------------------------------------------
    def trainable_parameters(self, task: str) -> int:
        if self.bank is None:
            return sum(p.numel() for p in self.params)
        return self.bank.trainable_parameters_per_task(task)

    def save_adapters(
        self,
        out_dir: str | Path,
        extra: dict[str, Any] | None = None,
        per_task_extra: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, str]:
        """Write every task's `<task>.safetensors` + `.json` into out_dir; returns {task: path}."""
        files = {}
        for task in self.spec.tasks:
            more = {**(extra or {}), **((per_task_extra or {}).get(task.name, {}))}
            if task.condition is not None:  # sampling extracts maps with the extractor the shards used
                more["condition_extractor"] = dict(task.condition)
                if self.bank is not None:  # part of trainable_params, shown apart in the report
                    more["condition_params"] = self.bank.condition_parameters_per_task(task.name)
            if self.bank is None:
                st_path = save_task_model(
                    self.model, task.task_info(0), out_dir, self.backbone_hash, self.backbone_params, extra=more
                )
            else:
                st_path, _ = save_adapter(self.bank, task.name, out_dir, self.backbone_hash, extra=more)
            files[task.name] = str(st_path)
        return files

    # -- resumable state (safetensors + JSON, never pickle) ---------------------------------------
    def save_state(self, directory: str | Path) -> None:
        """Adapter parameters, AdamW moments and the step into `directory` (for Tune checkpoints)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        for i, p in enumerate(self.params):
            for name, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"adam.{i}.{name}"] = value.detach().cpu().reshape(value.shape).contiguous()
        save_file(tensors, str(d / "state.safetensors"))
        with_umask_mode(d / "state.safetensors")  # safetensors writes 0600; the JSON beside it gets the umask
        meta = {
            "step": self.step,
            "last_window_loss": self.last_window_loss,
            "images_seen": self.images_seen,
            "train_seconds": self.train_seconds,
            "scheduler": self.scheduler.state_dict(),
            "lrs": [g["lr"] for g in self.optimizer.param_groups],
        }
        (d / "state.json").write_text(json.dumps(meta, sort_keys=True) + "\n")

    @torch.no_grad()
    def load_state(self, directory: str | Path) -> None:
        d = Path(directory)
        tensors = load_file(str(d / "state.safetensors"))
        meta = json.loads((d / "state.json").read_text())
        for i, p in enumerate(self.params):
            p.copy_(tensors[f"param.{i}"])
            state = {k.split(".", 2)[2]: v.to(self.device) for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
            if state:
                state["step"] = state["step"].cpu()  # AdamW keeps its step count on the CPU
                self.optimizer.state[p] = state
        self.scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, meta["lrs"], strict=True):
            group["lr"] = lr  # the scheduler's state does not carry the optimizer's current lr
        self.step = int(meta["step"])
        self.last_window_loss = float(meta["last_window_loss"])
        self.images_seen = int(meta["images_seen"])
        self.train_seconds = float(meta["train_seconds"])
        self._stream = None  # reopened at the restored step
        self._resumed = True
