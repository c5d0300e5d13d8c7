"""The run report: `report.md` plus PNG files in the run folder, written from the stages' outputs.

    python -m ray_jobs.pipeline --config ray_jobs/configs/tiny.yaml --out runs/demo   # report is the last stage
    python -m ray_jobs.pipeline --config ray_jobs/configs/tiny.yaml --out runs/demo 'pipeline.stages=[report]'

    write_report(ReportInputs(cfg, run_dir, backbone=..., adapters={"affiner": {"emoji": ".../emoji.safetensors"}},
                              fid_json=run_dir / "fid.json", ...))     # -> [report.md, *.png]

What it shows (each part says so when its stage has not produced anything yet):
- one sample grid per task (`samples_<task>.png`, the first fine-tune method's adapters), all cut from
  one mixed-task batch (`samples_mixed.png`: every sample in it uses its own task's adapter), plus
  the bare backbone's class-conditional samples (`samples_backbone.png`);
- the FID/KID table per task and method, naming the feature network and the sample counts;
- trainable parameters per method (per task, and as % of the backbone);
- the sweep's best (rank, learning rate) per dataset;
- wall time per stage (s) and the loss curves (`loss_curves.png`: pretraining and every fine-tune).

Sampling runs here on the local CPU (or the first GPU), with `diffusion.sampling_steps` steps and
fixed seeds, so grids are comparable between runs.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffscaler.adapters import METHOD_PARTS
from diffscaler.artifacts import is_task_model, load_adapters, load_backbone, read_backbone_meta, read_trained_meta
from diffscaler.atomic import atomic_path, write_text_atomic
from diffscaler.backbones import backbone_macs
from diffscaler.config import ExperimentConfig, ModelConfig, from_dict
from diffscaler.data import DatasetError, ShardError, dataset_dir, load_index, read_split
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.diffusion.sampling import plan_samples, sample_images
from diffscaler.images import image_grid, save_png
from diffscaler.seed_spread import seed_spread_section
from diffscaler.train.train_log import read_jsonl
from diffscaler.vae import VaeError, load_vae

GRID_PER_TASK = 8  # images per task, all tasks in one batch (the mixed-task path costs ~2.5x on CPU)
GRID_COLUMNS = 8  # columns of a task's grid
BACKBONE_GRID_CLASSES = 8  # rows of the backbone grid: classes spread over the backbone's classes
BACKBONE_GRID_PER_CLASS = 3  # columns of the backbone grid
GRID_MIN_WIDTH_PX = 384  # small images are enlarged (nearest neighbour) so a grid is readable
SAMPLE_SEED = 0  # seeds of every grid: the same images each time the report is written
# Below this many multiply-adds per image and forward pass the grids are sampled on one CPU thread: such small
# matmuls gain nothing from a second thread, and on a busy machine two were 3x slower. Above it (a DiT-S/4 at 32
# px and up) torch keeps its threads: one thread cost a DiT-XL/2 run half its wall time, in this stage.
ONE_THREAD_MAX_MACS = 1_000_000_000
LOSS_UNIT = "MSE of the predicted noise, per element"


@dataclass(frozen=True)
class StageRow:
    name: str
    status: str  # done | skipped | failed | interrupted | not selected | running | pending
    wall_s: float | None  # seconds of its latest run (None = never ran)
    reason: str = ""


@dataclass(frozen=True)
class ReportInputs:
    cfg: ExperimentConfig
    out_dir: Path  # report.md and the PNGs go here
    backbone: Path | None = None  # backbone.safetensors (None or missing = no grids)
    adapters: dict[str, dict[str, str]] = field(default_factory=dict)  # method -> task -> adapter file
    fid_json: Path | None = None  # written by the evaluate stage
    pretrain_metrics: Path | None = None  # metrics.jsonl of the pretraining run
    finetune_logs: Path | None = None  # <adapters>/logs/<method>/<task>.jsonl
    sweep_dir: Path | None = None  # the sweep's output folder
    stages: tuple[StageRow, ...] = ()  # wall time per stage


def write_report(inputs: ReportInputs) -> list[Path]:
    """Write report.md and its PNGs into `inputs.out_dir`; returns [report.md, png, ...]."""
    out = Path(inputs.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = inputs.cfg
    images: list[Path] = []
    md: list[str] = [f"# DiffScaler run: `{out}`", ""]
    md += _overview(inputs)
    grids, grid_md = _sample_grids(inputs)
    images += grids
    md += grid_md
    md += _fid_section(inputs)
    md += _params_section(inputs)
    md += _sweep_section(inputs)
    md += _stage_section(inputs)
    md += _throughput_section(inputs)
    curves = _loss_curves(inputs)
    md += ["## Loss curves", ""]
    if curves is not None:
        images.append(curves)
        md += [f"![loss curves]({curves.name})", "", f"Loss: {LOSS_UNIT}; x axis: optimizer steps.", ""]
    else:
        md += ["_No loss logs yet (pretrain / finetune have not run)._", ""]
    md += [
        "## Config",
        "",
        f"The resolved config is `{out / 'config.json'}`. Model {cfg.model.name}, "
        f"{_input_text(cfg, cfg.model.input_size)}, tasks: " + ", ".join(f"`{t.name}`" for t in cfg.data.targets) + ".",
        "",
    ]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(md).rstrip() + "\n")
    return [report, *images]


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _overview(inputs: ReportInputs) -> list[str]:
    total = sum(s.wall_s or 0.0 for s in inputs.stages if s.status in ("done", "failed", "interrupted"))
    states = ", ".join(f"{s.name} {s.status}" for s in inputs.stages)
    lines = []
    if inputs.backbone is not None and inputs.backbone.is_file():
        meta = read_backbone_meta(inputs.backbone)
        m = meta["model"]
        lines.append(
            f"Backbone `{inputs.backbone}`: {m['name']}, {_input_text(inputs.cfg, m['input_size'])}, "
            f"{m['num_classes']} classes, {meta.get('num_parameters', 0):,} parameters, "
            f"hash `{meta['content_hash'][:23]}...`."
        )
    if states:
        lines.append(f"Stages: {states}. Stage time in this run: {total:.1f} s.")
    return [*lines, ""] if lines else []


def _input_text(cfg: ExperimentConfig, side: int) -> str:
    """The model's input: pixels, or with data.vae latent cells (and the pixel size they encode)."""
    if cfg.data.vae:
        return f"{side}x{side} latent cells ({cfg.data.image_size}x{cfg.data.image_size} px images)"
    return f"{side}x{side} px"


def _stage_section(inputs: ReportInputs) -> list[str]:
    lines = ["## Wall time per stage", "", "| stage | status | wall time (s) | note |", "|---|---|---:|---|"]
    for s in inputs.stages:
        wall = f"{s.wall_s:.1f}" if s.wall_s is not None else "-"
        if s.status == "skipped" and s.wall_s is not None:
            wall += " (earlier run)"
        lines.append(f"| {s.name} | {s.status} | {wall} | {_cell(s.reason)} |")
    return [*lines, ""]


def _throughput_section(inputs: ReportInputs) -> list[str]:
    """The real jobs' training speed per CPU: each fine-tune against the pretraining run of the same model (what
    a frozen backbone saves, or costs, outside a micro-benchmark). Pretraining's rate is the median of its
    logged rates after the first tenth of its steps (start-up and warm-up), over its workers' CPUs."""
    cfg = inputs.cfg
    pretrain_rates = []
    if inputs.pretrain_metrics is not None and Path(inputs.pretrain_metrics).is_file():
        logged = [r for r in read_jsonl(inputs.pretrain_metrics) if r.get("images_per_s") and "step" in r]
        last = max((r["step"] for r in logged), default=0)
        pretrain_rates = [r["images_per_s"] for r in logged if r["step"] > last / 10]
    pretrain_cpus = cfg.pretrain.num_workers * _threads(cfg.pretrain.cpus_per_worker)
    finetunes = [
        (label, task, m["finetune"]["images_per_s"])
        for (label, task), m in sorted(_method_metas(inputs).items())
        if (m.get("finetune") or {}).get("images_per_s")
    ]
    if not pretrain_rates or not finetunes or cfg.pretrain.use_gpu or cfg.finetune.use_gpu:
        return []
    per_cpu = statistics.median(pretrain_rates) / pretrain_cpus
    lines = [
        "## Training speed per CPU",
        "",
        f"Pretraining ({cfg.pretrain.num_workers} Ray Train workers x {cfg.pretrain.cpus_per_worker:g} CPU, "
        f"batch {cfg.pretrain.global_batch_size}, DeepSpeed ZeRO-{cfg.pretrain.zero_stage}, median of "
        f"{len(pretrain_rates)} logged rates): **{per_cpu:.1f} images/s per CPU**. Each fine-tune "
        f"({cfg.finetune.cpus_per_task:g} CPU, batch {cfg.finetune.batch_size}; fine-tunes run side by side and "
        "share the machine), its whole run's images/s per CPU (a CPU is a thread: Ray runs a task or worker "
        "of c CPUs on max(1, floor(c)) threads):",
        "",
        "| method | task | images/s per CPU | x pretraining |",
        "|---|---|---:|---:|",
    ]
    for label, task, rate in finetunes:
        ft_per_cpu = rate / _threads(cfg.finetune.cpus_per_task)
        lines.append(f"| {label} | {task} | {ft_per_cpu:.1f} | {ft_per_cpu / per_cpu:.2f}x |")
    return [*lines, ""]


def _threads(cpus: float) -> int:
    return max(1, math.floor(cpus))  # Ray sets OMP_NUM_THREADS so for a task or actor of `cpus` CPUs


def _cell(text: str, limit: int = 160) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _fid_section(inputs: ReportInputs) -> list[str]:
    doc = _read_json(inputs.fid_json)
    lines = ["## FID / KID / task accuracy per task and method", ""]
    if doc is None:
        return [*lines, "_Not evaluated yet (the evaluate stage has not run)._", ""]
    rows = doc.get("results", [])
    if not rows:
        return [*lines, f"_{inputs.fid_json} holds no scores._", ""]
    nets = sorted({r["feature_network"] for r in rows})
    gens = sorted({r["num_generated"] for r in rows if r.get("source", "generated") == "generated"})
    refs = sorted({r["num_reference"] for r in rows})
    split = sorted({r.get("reference_split", "eval") for r in rows})
    lines.append(
        f"Feature network: **{', '.join(nets)}**; {', '.join(map(str, gens))} generated images per task and method, "
        f"against {refs[0]}{'-' + str(refs[-1]) if len(refs) > 1 else ''} real images of the task's "
        f"{'/'.join(split)} split. Lower FID/KID is better. "
        + (
            "Scores on EfficientNet-Lite0 features rank runs against each other; they are not comparable with "
            "published (Inception) FID. "
            if "efficientnet-lite0" in nets
            else ""
        )
        + "How to read them: **floor (real)** scores the task's real images of the other split against the same "
        "reference - as good as a generator can get at these counts; **no adapter** scores the pretrained "
        "backbone's own samples - what the fine-tune starts from. **Task accuracy** is the share of the images "
        "that a nearest-centroid classifier on the same features, fitted on every target's reference images, "
        "assigns to their own dataset (targets built from the same images, such as emoji and its mask task, are "
        "one class; 1/number of classes is chance; the floor row gives its ceiling)."
    )
    metas = _method_metas(inputs)
    with_fidelity = any(r.get("fidelity") is not None for r in rows)  # the column only when a task has a map
    lines += [
        "",
        "| task | method | lr | FID | KID (mean ± std) | task acc. | "
        + ("condition fidelity | " if with_fidelity else "")
        + "trainable params | % of backbone | file (KiB) | train img/s | train wall (s) | status |",
        "|---|---|---:|---:|---:|---:|" + ("---:|" if with_fidelity else "") + "---:|---:|---:|---:|---:|---|",
    ]
    order = {label: i for i, label in enumerate(REFERENCE_LABELS + tuple(inputs.adapters))}
    for r in sorted(rows, key=lambda r: (str(r["task"]), order.get(r["label"], len(order)), r["label"])):
        m = metas.get((r["label"], r["task"]), {})
        ft = m.get("finetune", {})
        status = r["status"] if r["status"] == "ok" else f"failed: {_cell(r.get('error', ''), 80)}"
        name = r["label"] or r["method"] or "-"
        lines.append(
            f"| {r['task'] or '(backbone)'} | {name} | {_fmt_opt(ft.get('lr'), '.2g')} | "
            f"{_fmt_opt(r.get('fid'), '.2f')} | {_kid(r)} | {_fmt_opt(r.get('task_accuracy'), '.2f')} | "
            + (f"{_fidelity_cell(r)} | " if with_fidelity else "")
            + f"{_fmt_opt(m.get('trainable_params'), ',')} | {_pct(m)} | "
            f"{_fmt_opt(m.get('file_kib'), '.1f')} | {_fmt_opt(ft.get('images_per_s'), '.1f')} | "
            f"{_fmt_opt(ft.get('wall_s'), '.0f')} | {status} |"
        )
    lines += ["", *_averages(rows, metas, inputs)]
    lines += seed_spread_section(rows, inputs.cfg.finetune.methods)
    lines += _condition_section(doc)
    return [*lines, ""]


def _fidelity_cell(r: dict[str, Any]) -> str:
    if r.get("fidelity") is None:
        return "-"
    return f"{r['fidelity']:.3f} {'edge F1' if r.get('fidelity_metric') == 'edge_f1' else 'IoU'}"


def _condition_section(doc: dict[str, Any]) -> list[str]:
    """Per conditional task: fidelity of every scored row beside the ceiling and chance of its extractor."""
    refs = doc.get("condition_reference", {})
    rows = [r for r in doc.get("results", []) if r.get("condition")]
    tasks = sorted({r["task"] for r in rows} | set(refs))
    if not tasks:
        return []
    out = [
        "### Condition fidelity",
        "",
        "Do generated images follow their maps? The task's extractor is run again on each generated image and "
        "compared with the map it was sampled with (maps of the reference split's images): **edge F1** with a "
        "1-pixel tolerance for `canny`, **IoU** of the foregrounds for `mask` (a `key:` map has no extractor "
        "here: FID only). **ceiling**: real images against their own maps (what the extractor reaches at this "
        "resolution); **mismatched maps**: real images against other images' maps (chance); **no condition**: "
        "the same adapter sampled without a map (what the map buys).",
        "",
        "| task | condition | row | fidelity | ± std | images |",
        "|---|---|---|---:|---:|---:|",
    ]
    for task in tasks:
        ref = refs.get(task, {})
        for r in (r for r in rows if r["task"] == task):
            out.append(
                f"| {task} | {r['condition']} | {r['label'] or r['method']} | "
                f"{_fmt_opt(r.get('fidelity'), '.3f')} | {_fmt_opt(r.get('fidelity_std'), '.3f')} | "
                f"{r['num_generated']} |"
            )
        for key, name in (("ceiling", "ceiling (real, own maps)"), ("mismatched", "mismatched maps (chance)")):
            if key in ref:
                out.append(
                    f"| {task} | {ref['condition']} | {name} | {ref[key]['mean']:.3f} | {ref[key]['std']:.3f} | "
                    f"{ref[key]['n']} |"
                )
    return [*out, ""]


REFERENCE_LABELS = ("floor (real)", "no adapter")


def _fmt_opt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _kid(r: dict[str, Any]) -> str:
    return f"{r['kid_mean']:.4f} ± {r['kid_std']:.4f}" if r.get("kid_mean") is not None else "-"


def _pct(meta: dict[str, Any]) -> str:
    if not meta.get("backbone_params"):
        return "-"
    return f"{100.0 * meta['trainable_params'] / meta['backbone_params']:.2f} %"


def _method_metas(inputs: ReportInputs) -> dict[tuple[str, str], dict[str, Any]]:
    """{(label, task): adapter (or task-model) description + file_kib} for every evaluated file."""
    out = {}
    for label, tasks in inputs.adapters.items():
        for task, path in tasks.items():
            try:
                meta = read_trained_meta(path)
            except (ValueError, OSError):
                continue
            out[(label, task)] = {**meta, "file_kib": Path(path).stat().st_size / 1024}
    return out


def _averages(
    rows: list[dict[str, Any]], metas: dict[tuple[str, str], dict[str, Any]], inputs: ReportInputs
) -> list[str]:
    """Per method, the mean over the tasks it was scored on (as the DiffFit and DiffScaler papers report)."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok" and r["task"]:
            by_label.setdefault(r["label"], []).append(r)
    if not by_label:
        return []
    order = {label: i for i, label in enumerate(REFERENCE_LABELS + tuple(inputs.adapters))}
    out = [
        "**Averages over the tasks** (mean of the per-task scores; KID ± is the mean of the per-task stds):",
        "",
        "| method | tasks | mean FID | mean KID | mean task acc. | mean % of backbone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in sorted(by_label, key=lambda k: (order.get(k, len(order)), k)):
        rs = by_label[label]
        accs = [r["task_accuracy"] for r in rs if r.get("task_accuracy") is not None]
        pcts = [
            100.0 * m["trainable_params"] / m["backbone_params"]
            for r in rs
            if (m := metas.get((label, r["task"]), {})).get("backbone_params")
        ]
        acc = f"{np.mean(accs):.2f}" if accs else "-"
        pct = f"{np.mean(pcts):.2f} %" if pcts else "-"
        out.append(
            f"| {label} | {len(rs)} | {np.mean([r['fid'] for r in rs]):.2f} | "
            f"{np.mean([r['kid_mean'] for r in rs]):.4f} ± {np.mean([r['kid_std'] for r in rs]):.4f} | "
            f"{acc} | {pct} |"
        )
    return [*out, ""]


def _condition(meta: dict[str, Any]) -> dict[str, Any] | None:
    from diffscaler.data.conditions import adapter_condition

    return adapter_condition(meta)


def _adapter_meta(path: str) -> dict[str, Any] | None:
    try:
        return read_trained_meta(path)
    except (ValueError, OSError):
        return None


def _params_section(inputs: ReportInputs) -> list[str]:
    lines = ["## Trainable parameters per method", ""]
    rows: list[str] = []
    cond_rows: list[str] = []
    for method, tasks in inputs.adapters.items():
        metas = [m for m in (_adapter_meta(p) for p in tasks.values()) if m is not None]
        if not metas:
            continue
        per_task = [m["trainable_params"] for m in metas]
        backbone = metas[0].get("backbone_params", 0)
        mean = sum(per_task) / len(per_task)
        pct = 100.0 * mean / backbone if backbone else math.nan
        sizes = [Path(p).stat().st_size for p in tasks.values() if Path(p).is_file()]
        ranks = sorted({m.get("rank", 0) for m in metas})
        rank = "/".join(map(str, ranks)) if "down" in METHOD_PARTS.get(metas[0].get("method", ""), ()) else "-"
        rows.append(
            f"| {method} | {rank} | {min(per_task):,} - {max(per_task):,} | {pct:.3f} % | "
            f"{backbone:,} | {len(metas)} | {sum(sizes) / max(len(sizes), 1) / 1024:.1f} |"
        )
        for m in metas:  # the spatial condition's share, apart (it is part of the task's count above)
            if cond := _condition(m):
                c = int(m.get("condition_params", 0))
                cond_rows.append(
                    f"| {m['task']} | {method} | {cond['kind']} | {c:,} | "
                    f"{m['trainable_params'] - c:,} | {m['trainable_params']:,} | "
                    f"{100.0 * c / backbone if backbone else math.nan:.3f} % |"
                )
    if not rows:
        return [*lines, "_No adapters yet (the finetune stage has not run)._", ""]
    lines += [
        "Per task: the parameters one task's adapter trains (its own conditioning rows and, for a "
        "conditional task, its condition path included); the backbone stays frozen.",
        "",
        "| method | rank | trainable params per task | mean % of backbone | backbone params | tasks | "
        "adapter file (KiB, mean) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    if cond_rows:
        lines += [
            "",
            "Conditional tasks: the condition path (the map's embedding; for controlnet the trainable "
            "block copies) apart from the rest of the adapter.",
            "",
            "| task | method | condition | condition path params | rest of the adapter | total | condition "
            "path % of backbone |",
            "|---|---|---|---:|---:|---:|---:|",
            *cond_rows,
        ]
    return [*lines, ""]


def _sweep_section(inputs: ReportInputs) -> list[str]:
    if inputs.sweep_dir is None or not Path(inputs.sweep_dir).is_dir():
        return []
    best = _read_json(Path(inputs.sweep_dir) / "best.json")
    lines = ["## Sweep (Ray Tune)", ""]
    if best is None:
        return [*lines, f"_No sweep result in `{inputs.sweep_dir}` yet._", ""]
    per_dataset = best.get("best", best.get("datasets", best))
    per_method = best.get("methods")
    # several swept methods (sweep.methods): one row per method and dataset, not only the first method's
    if isinstance(per_method, dict) and len(per_method) > 1 and all(isinstance(v, dict) for v in per_method.values()):
        rows = [(name, row) for per in per_method.values() for name, row in per.items() if isinstance(row, dict)]
        columns: tuple[str, ...] = ("method", "rank", "lr", "fid", "val_loss", "steps", "selected_by", "trial_id")
    elif isinstance(per_dataset, dict) and all(isinstance(v, dict) for v in per_dataset.values()):
        rows = list(per_dataset.items())
        columns = ("rank", "lr", "fid", "val_loss", "steps", "selected_by", "trial_id")
    else:
        rows = []
    if rows:
        keys = [k for k in columns if any(k in v for _, v in rows)]
        lines += ["| dataset | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for name, row in rows:
            lines.append(f"| {name} | " + " | ".join(_fmt_value(row.get(k)) for k in keys) + " |")
    else:
        lines += ["```json", json.dumps(best, indent=2)[:3000], "```"]
    lines += ["", f"All trials: `{inputs.sweep_dir}`."]
    return [*lines, ""]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.4f}"
    return "-" if v is None else str(v)


# ------------------------------------------------------------------------------------------------
# Sample grids
# ------------------------------------------------------------------------------------------------


def _enlarge(grid: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement so a grid of 32 px images is readable in a browser."""
    factor = max(1, math.ceil(GRID_MIN_WIDTH_PX / grid.shape[1]))
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


def _save_grid(images: np.ndarray, ncols: int, path: Path) -> Path:
    with atomic_path(path) as tmp:
        save_png(_enlarge(image_grid(images, ncols=ncols)), tmp)
    return path


def _sample_grids(inputs: ReportInputs) -> tuple[list[Path], list[str]]:
    import torch

    threads = torch.get_num_threads()
    if not torch.cuda.is_available() and _backbone_macs(inputs) < ONE_THREAD_MAX_MACS:
        torch.set_num_threads(1)
    try:
        return _sample_grids_here(inputs)
    finally:
        torch.set_num_threads(threads)


def _backbone_macs(inputs: ReportInputs) -> int:
    """Multiply-adds per image of the backbone's forward pass (0 when there is no backbone yet)."""
    if inputs.backbone is None or not Path(inputs.backbone).is_file():
        return 0
    return backbone_macs(from_dict(ModelConfig, read_backbone_meta(inputs.backbone)["model"], "backbone.model"))


def _sample_grids_here(inputs: ReportInputs) -> tuple[list[Path], list[str]]:
    lines = ["## Samples", ""]
    backbone = inputs.backbone
    if backbone is None or not Path(backbone).is_file():
        return [], [*lines, "_No backbone yet (the pretrain stage has not run)._", ""]
    import torch

    cfg = inputs.cfg
    out = Path(inputs.out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = cfg.diffusion.sampling_steps  # the "quick look" setting; eval.sampling_steps is for FID
    settings = dict(
        steps=steps, sampler=cfg.diffusion.sampler, cfg_scale=cfg.diffusion.cfg_scale, eta=cfg.diffusion.ddim_eta
    )
    files: list[Path] = []

    model, meta = load_backbone(backbone)
    model.to(device).eval()
    decode = _grid_decoder(cfg, model, device)
    if decode is not None:  # a latent backbone: every grid below is decoded through data.vae
        settings["decode"] = decode
    diffusion = GaussianDiffusion.from_config(cfg.diffusion, learn_sigma=model.config.learn_sigma)
    n_cls = model.config.num_classes
    rows = min(BACKBONE_GRID_CLASSES, n_cls)
    classes = [round(i * (n_cls - 1) / max(rows - 1, 1)) for i in range(rows)]
    labels = [c for c in classes for _ in range(BACKBONE_GRID_PER_CLASS)]
    with torch.no_grad():
        imgs = sample_images(
            model, diffusion, num=len(labels), seed=SAMPLE_SEED, labels=labels, batch_size=len(labels), **settings
        )
    files.append(_save_grid(imgs, BACKBONE_GRID_PER_CLASS, out / "samples_backbone.png"))
    lines += [
        f"Backbone alone, class-conditional: one row per class ({', '.join(map(str, classes))}), "
        f"{settings['sampler']} with {steps} steps, seed {SAMPLE_SEED}.",
        "",
        "![backbone samples](samples_backbone.png)",
        "",
    ]
    if decode is not None:
        lines += [
            f"Latent backbone: every grid is sampled in latent space and decoded through `{cfg.data.vae}`; "
            "the real images are the ones that were encoded.",
            "",
        ]

    method, task_files = next(iter(inputs.adapters.items()), (None, {}))
    present = {t: p for t, p in task_files.items() if Path(p).is_file()}
    if not present:
        return files, [*lines, "_No adapters yet (the finetune stage has not run)._", ""]
    model, meta = load_backbone(backbone)
    bank = load_adapters(model, list(present.values()), backbone_hash=meta["content_hash"])
    model.to(device).eval()
    names = [t.name for t in bank.tasks]
    counts = [t.num_classes for t in bank.tasks]
    # ONE batch holds every task's images, interleaved (a, b, c, a, b, c, ...): each sample uses its own
    # task's adapter; the per-task grids are that batch's rows, so the mixed path is what is shown.
    per_sample_task, labels = plan_samples(names, GRID_PER_TASK, counts, None)
    # Conditional tasks sample with the maps of their first eval images, shown beside them (map | generated | real).
    metas = {t: _adapter_meta(p) or {} for t, p in present.items()}
    real_maps = {n: _real_maps(cfg, n, GRID_PER_TASK) if _condition(metas[n]) else None for n in names}
    extra: dict[str, Any] = {}
    if any(v is not None for v in real_maps.values()):
        from diffscaler.data.conditions import batch_maps, maps_to_unit

        maps, has = batch_maps([None if real_maps[n] is None else real_maps[n][1] for n in names], per_sample_task)
        extra = dict(
            conditions=torch.from_numpy(maps_to_unit(maps)),
            condition_mask=torch.from_numpy(has),
            condition_scale=cfg.diffusion.condition_scale,
        )
    with torch.no_grad():
        imgs = sample_images(
            model,
            diffusion,
            num=len(labels),
            seed=SAMPLE_SEED,
            labels=labels,
            task_ids=per_sample_task,
            batch_size=len(labels),
            **settings,
            **extra,
        )
    task_of = np.array(per_sample_task)
    lines += [
        f"With the **{method}** adapters: {len(labels)} images of {len(names)} tasks sampled in a single "
        f"batch, every image with its own task's adapter ({GRID_PER_TASK} per task; conditional tasks "
        f"cycle through their classes), {settings['sampler']} with {steps} steps, seed {SAMPLE_SEED}.",
        "",
    ]
    for i, name in enumerate(names):
        files.append(_save_grid(imgs[task_of == i], GRID_COLUMNS, out / f"samples_{name}.png"))
        lines += [f"**{name}** (generated)", "", f"![{name}](samples_{name}.png)", ""]
        if real_maps[name] is not None:
            real, maps = real_maps[name]
            kind = _condition(metas[name])["kind"]
            files.append(_condition_grid(maps, imgs[task_of == i], real, out / f"condition_{name}.png"))
            lines += [
                f"{name}, conditioned on **{kind}** maps: one row per image, columns map | generated | real "
                "(the generated image was sampled with the map of the real image beside it):",
                "",
                f"![{name} map, generated, real](condition_{name}.png)",
                "",
            ]
        real = _real_images(cfg, name, GRID_COLUMNS)
        if real is not None:
            files.append(_save_grid(real, GRID_COLUMNS, out / f"real_{name}.png"))
            lines += [f"{name}, real images of its eval split:", "", f"![{name} real](real_{name}.png)", ""]
    order = np.argsort(task_of, kind="stable")  # one row per task
    files.append(_save_grid(imgs[order], GRID_PER_TASK, out / "samples_mixed.png"))
    lines += [
        f"**The whole mixed batch**, one row per task ({', '.join(names)}):",
        "",
        "![mixed batch](samples_mixed.png)",
        "",
    ]
    if len(inputs.adapters) > 1:
        method_files, method_lines = _method_grids(inputs, diffusion, settings, device)
        files += method_files
        lines += method_lines
    return files, lines


def _method_grids(
    inputs: ReportInputs, diffusion: Any, settings: dict[str, Any], device: Any
) -> tuple[list[Path], list[str]]:
    """Per task, one row per method (real images, the bare backbone, then every method), same seeds."""
    import torch

    cfg, out = inputs.cfg, Path(inputs.out_dir)
    backbone, meta = load_backbone(inputs.backbone)
    n_cls = backbone.config.num_classes
    rows: dict[str, dict[str, np.ndarray]] = {}  # task -> row label -> images
    for t in cfg.data.targets:
        real = _real_images(cfg, t.name, GRID_COLUMNS)
        if real is not None and len(real) == GRID_COLUMNS:
            rows.setdefault(t.name, {})["real"] = real
        with torch.no_grad():
            rows.setdefault(t.name, {})["no adapter"] = sample_images(
                backbone.to(device).eval(),
                diffusion,
                num=GRID_COLUMNS,
                seed=SAMPLE_SEED,
                labels=[k % n_cls for k in range(GRID_COLUMNS)],
                batch_size=GRID_COLUMNS,
                **settings,
            )
    for label, tasks in inputs.adapters.items():
        present = {t: p for t, p in tasks.items() if Path(p).is_file()}
        for task, path in present.items():
            if is_task_model(path):
                model, _ = load_backbone(path)
                ids = None
            else:
                model, _ = load_backbone(inputs.backbone)
                load_adapters(model, [path], backbone_hash=meta["content_hash"])
                ids = [0] * GRID_COLUMNS
            extra = _grid_conditions(cfg, task, path, ids is not None)
            with torch.no_grad():
                rows.setdefault(task, {})[label] = sample_images(
                    model.to(device).eval(),
                    diffusion,
                    num=GRID_COLUMNS,
                    seed=SAMPLE_SEED,
                    labels=[0] * GRID_COLUMNS,
                    task_ids=ids,
                    batch_size=GRID_COLUMNS,
                    **settings,
                    **extra,
                )
    files, lines = (
        [],
        [
            "### Every method side by side",
            "",
            "Per task, one row each, top to bottom: "
            + ", ".join(["real images", "no adapter", *inputs.adapters])
            + f" (same seeds in every row, {settings['sampler']} "
            f"{settings['steps']} steps).",
            "",
        ],
    )
    for task, by_row in rows.items():
        grid = np.concatenate(list(by_row.values()))
        files.append(_save_grid(grid, GRID_COLUMNS, out / f"methods_{task}.png"))
        lines += [f"**{task}**: " + ", ".join(by_row), "", f"![{task} by method](methods_{task}.png)", ""]
    return files, lines


def _grid_conditions(cfg: ExperimentConfig, task: str, path: str, adapter: bool) -> dict[str, Any]:
    """sample_images' condition arguments for a conditional task's adapter: the maps of the real row's images."""
    record = _condition(_adapter_meta(path) or {}) if adapter else None
    real = _real_maps(cfg, task, GRID_COLUMNS) if record else None
    if real is None:
        return {}
    import torch

    from diffscaler.data.conditions import maps_to_unit

    return dict(
        conditions=torch.from_numpy(maps_to_unit(real[1])),
        condition_mask=torch.ones(GRID_COLUMNS, dtype=bool),
        condition_scale=cfg.diffusion.condition_scale,
    )


def _grid_decoder(cfg: ExperimentConfig, model: Any, device: Any) -> Any:
    """`Vae.decode` for a latent backbone (data.vae, checked against its channels), None in pixel space."""
    if model.config.in_channels == 3:
        return None
    if not cfg.data.vae:
        raise VaeError(
            f"the backbone is a latent one ({model.config.in_channels} channels): set data.vae to "
            "the VAE its shards were encoded with, so the report can decode its grids"
        )
    vae = load_vae(cfg.data.vae, cfg.data.vae_config or None, device=str(device))
    if vae.latent_channels != model.config.in_channels:
        raise VaeError(
            f"data.vae {cfg.data.vae} has {vae.latent_channels} latent channels, the backbone "
            f"{model.config.in_channels}"
        )
    return vae.decode


def _real_maps(cfg: ExperimentConfig, task: str, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The first `count` eval images of a conditional task and their maps (uint8 (N, S, S, 3), (N, C, S, S)),
    or None when the shards cannot be read or hold no maps."""
    from diffscaler.data import DatasetError, ShardError, dataset_dir, load_index, read_split

    try:
        directory = dataset_dir(cfg.data, task)
        latent = load_index(directory).sample_format.latent
        images, _labels, maps = read_split(directory, "eval", limit=count, pixels=latent, conditions=True)
    except (DatasetError, ShardError, OSError):
        return None
    if len(images) < count:  # a short eval split: the maps cycle, as the sampling side does
        take = np.arange(count) % len(images)
        images, maps = images[take], maps[take]
    return images, maps


def _condition_grid(maps: np.ndarray, generated: np.ndarray, real: np.ndarray, path: Path) -> Path:
    """Rows of map | generated | real (maps shown grey, a 3-channel map as its colours)."""
    shown = np.repeat(maps[:, :1], 3, axis=1) if maps.shape[1] == 1 else maps[:, :3]  # (N, 3, S, S)
    shown = shown.transpose(0, 2, 3, 1)  # (N, S, S, 3)
    n = min(len(shown), len(generated), len(real))
    if generated.shape[1:3] != shown.shape[1:3]:  # cannot happen for a pixel backbone; decoded latents match too
        raise ValueError(f"maps are {shown.shape[1:3]}, generated images {generated.shape[1:3]}")
    rows = np.stack([shown[:n], generated[:n], real[:n]], axis=1).reshape(3 * n, *shown.shape[1:])
    return _save_grid(rows, 3, path)


def _real_images(cfg: ExperimentConfig, task: str, count: int) -> np.ndarray | None:
    """The first `count` images of a task's eval split (the encoded images for latent shards), or None
    when its shards cannot be read."""
    try:
        directory = dataset_dir(cfg.data, task)
        latent = load_index(directory).sample_format.latent
        images, _labels = read_split(directory, "eval", limit=count, pixels=latent)
    except (DatasetError, ShardError, OSError):
        return None
    return images


# ------------------------------------------------------------------------------------------------
# Loss curves
# ------------------------------------------------------------------------------------------------


def _loss_curves(inputs: ReportInputs) -> Path | None:
    pretrain = []
    if inputs.pretrain_metrics is not None:
        pretrain = [
            (r["step"], r["loss"])
            for r in read_jsonl(inputs.pretrain_metrics)
            if r.get("loss") is not None and "step" in r
        ]
    finetune: dict[str, list[tuple[int, float]]] = {}
    logs = inputs.finetune_logs
    if logs is not None and Path(logs).is_dir():
        for log in sorted(Path(logs).glob("*/*.jsonl")):
            points = [(r["step"], r["loss"]) for r in read_jsonl(log) if r.get("kind") == "train" and "loss" in r]
            if points:
                finetune[f"{log.parent.name}/{log.stem}"] = points
    if not pretrain and not finetune:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [p for p in (("pretraining", pretrain), ("fine-tunes", finetune)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels):
        series = {"backbone": data} if isinstance(data, list) else data
        for label, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, linewidth=1.3)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (MSE of predicted noise)")
        ys = [y for pts in series.values() for _, y in pts]
        if min(ys) > 0 and max(ys) / min(ys) > 10:  # log scale only where the loss spans decades
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    path = Path(inputs.out_dir) / "loss_curves.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
