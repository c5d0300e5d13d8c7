"""Frozen dataclass configs, loaded from YAML with `key=value` overrides and validated up front.

    cfg = load_config("ray_jobs/configs/tiny.yaml", ["pretrain.steps=50", "model.name=DiT-S/2"])
    cfg.pretrain.steps  # 50

Every field has a one-line comment. Validation runs before any cluster resource is taken and
raises `ConfigError` naming the field (dotted path) and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot run; the message names the field."""


MODEL_NAME_PATTERN = re.compile(r"^DiT-(T|S|B|L|XL)/(2|4|8)$")
MODEL_ARCHS = ("dit", "unet")  # model.arch: the DiT, or diffusers' UNet2DModel (the paper's CNN baseline)
UNET_NAMES = ("UNet-T", "UNet-S")  # U-Net size presets (diffscaler.models.unet.UNET_SIZES)
UNET_DOWNSAMPLE = 4  # the presets' three resolution levels halve the input twice
# The methods a U-Net takes: bias and scale act on convolution channels; the Affiner's and LoRA's rank-r
# branches are defined on the DiT's linears (diffscaler.adapters.conv refuses them).
UNET_METHODS = ("full", "difffit", "bitfit", "scratch")
# controlnet: the spatial-control baseline (a trainable copy of the first blocks fed with the map; see
# diffscaler.adapters.condition); on a task without a condition map it trains only the task's rows.
ADAPTER_METHODS = ("affiner", "difffit", "lora", "bitfit", "full", "controlnet")
# What a fine-tune row can be: an adapter method, or the same DiT trained from random init on the task alone.
FINETUNE_METHODS = (*ADAPTER_METHODS, "scratch")
ADAPTER_TARGETS = ("qkv", "proj", "fc1", "fc2", "adaLN")
FINETUNE_LR_SCHEDULES = ("constant", "cosine")
SAMPLERS = ("ddim", "ddpm")
FEATURE_NETWORKS = ("efficientnet-lite0", "inception-v3-compat")
BUNDLED_SOURCES = ("openclipart", "emoji", "icons", "tiles", "textiles", "fashion-mnist")
# Spatial conditions a task may take (TaskSpec.condition): computed at shard time from each image, or
# `key:<member>`, a map the user's own WebDataset shards hold (diffscaler/data/conditions.py).
CONDITION_KINDS = ("canny", "mask")
CONDITION_KEY_PREFIX = "key:"
WEBDATASET_PREFIX = "webdataset:"  # a source that is users' own WebDataset shards (a folder, URL or brace pattern)
CONDITION_MAP_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # a key: member is an image webdataset decodes
# Bundled sources whose images have no alpha channel: `mask` (the alpha foreground) cannot be computed.
OPAQUE_SOURCES = ("tiles", "textiles", "fashion-mnist")


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    name: str = "DiT-T/4"  # size/patch preset: DiT-{T,S,B,L,XL}/{2,4,8}; with arch unet: UNet-{T,S}
    input_size: int = 32  # square input side in pixels (or latent cells)
    in_channels: int = 3  # 3 for pixel space, 4 for VAE latents
    num_classes: int = 22  # backbone classes; the label table has one extra null row for CFG
    learn_sigma: bool = False  # predict the variance too (doubles output channels, hybrid loss)
    class_dropout_prob: float = 0.1  # label dropout to the null row during training (for CFG)
    arch: str = "dit"  # dit | unet (diffusers' UNet2DModel, class-conditional: the CNN baseline)


@dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = 1000  # training diffusion steps
    beta_start: float = 1e-4  # linear beta schedule start
    beta_end: float = 0.02  # linear beta schedule end
    sampler: str = "ddim"  # ddim | ddpm
    sampling_steps: int = 50  # respaced steps used at sampling time
    ddim_eta: float = 0.0  # DDIM stochasticity (0 = deterministic)
    cfg_scale: float = 1.0  # classifier-free guidance scale (1 = off)
    condition_scale: float = 1.0  # guidance on a task's condition map at sampling, independent of cfg_scale (1 = off)


@dataclass(frozen=True)
class AdapterConfig:
    method: str = "affiner"  # affiner | difffit | lora | bitfit | full
    rank: int = 8  # rank r of the new subspace (affiner, lora)
    targets: tuple[str, ...] = ADAPTER_TARGETS  # wrapped linears: qkv, proj, fc1, fc2, adaLN
    branch_scale_init: float = 1.0  # initial s_t of the rank-r branch (its U starts at zero)
    condition_blocks: bool = False  # a map's tokens also enter every block's input (gated)
    controlnet_blocks: int = 0  # method controlnet: frozen blocks copied for the map (0 = half the backbone's blocks)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # task name; adapter files are <name>.safetensors
    source: str = ""  # shard-building source: a bundled name or folder:PATH (default: name)
    conditional: bool = False  # one conditioning row per class instead of a single learned row
    condition: str = ""  # spatial condition map per image: "" (none) | canny | mask | key:<member> (e.g. key:depth.png)
    label_key: str = ""  # webdataset: sources: the label, cls | json:FIELD | none ("" = cls if every sample has one)
    image_key: str = ""  # webdataset: sources: the image member(s), e.g. jpg or jpg;png ("" = the extensions found)

    @property
    def source_name(self) -> str:
        return self.source or self.name

    @property
    def webdataset(self) -> bool:
        """Users' own WebDataset shards, indexed (not rebuilt) by the shards stage."""
        return self.source_name.startswith(WEBDATASET_PREFIX)


@dataclass(frozen=True)
class DataConfig:
    shards_root: str = "shards"  # folder or fsspec URL holding <dataset>/<split>-NNNNNN.tar
    image_size: int = 32  # square side images are resized and centre-cropped to
    samples_per_shard: int = 1000  # samples per tar shard
    eval_fraction: float = 0.1  # share held out as the eval split
    limit: int = 0  # cap on images per source (0 = all)
    pretrain_source: str = "openclipart"  # class-conditional pretraining set
    targets: tuple[TaskSpec, ...] = (  # fine-tune datasets, one task each
        TaskSpec("emoji"),
        TaskSpec("icons"),
        TaskSpec("tiles"),
        TaskSpec("textiles"),
    )
    shuffle_buffer: int = 1000  # samples in the shuffle buffer
    hflip: bool = True  # random horizontal flip augmentation
    loader_workers: int = 0  # DataLoader worker processes per rank
    skip_bad_samples: bool = False  # skip and count undecodable samples instead of stopping
    seed: int = 0  # shuffle and split seed
    vae: str = ""  # local diffusers AutoencoderKL (folder, or weights file + vae_config): latent shards ("" = pixels)
    vae_config: str = ""  # config.json of a single-file vae
    encode_actors: int = 1  # Ray Data actors encoding images through the vae
    encode_gpus_per_actor: float = 0.0  # GPUs per encoding actor (0 = CPU)
    # Condition extractors (TaskSpec.condition), recorded in index.json; defaults chosen on 16-32 px emoji/icons.
    canny_low: float = 100.0  # condition canny: OpenCV Canny hysteresis low threshold (L2 Sobel gradient magnitude)
    canny_high: float = 200.0  # condition canny: high threshold (edges start above it, continue above canny_low)
    canny_blur: float = 0.0  # condition canny: Gaussian sigma in pixels before Canny (0 = none)
    mask_alpha_threshold: int = 32  # condition mask: a pixel is foreground when its resized alpha is >= this (1-255)
    mask_white_threshold: int = 24  # mask of an RGB image (fidelity): background = within this of white (0-254)


@dataclass(frozen=True)
class PretrainConfig:
    num_workers: int = 2  # Ray Train workers (one DeepSpeed rank each)
    use_gpu: bool = False  # one GPU per worker, NCCL, bf16
    cpus_per_worker: float = 1.0  # CPU resource request per worker
    global_batch_size: int = 32  # images per optimizer step over all workers
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer step
    steps: int = 200  # optimizer steps
    lr: float = 3e-4  # peak AdamW learning rate
    warmup_steps: int = 20  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip (0 = off)
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 0, 1, 2 or 3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    ema_decay: float = 0.999  # EMA decay of the weights (fp32)
    grad_checkpointing: bool = False  # recompute block activations in backward
    log_every: int = 10  # steps between logged metrics
    checkpoint_every: int = 50  # steps between checkpoints
    sample_every: int = 100  # steps between sample grids (0 = off)
    max_failures: int = 2  # automatic restarts from the last checkpoint
    storage_path: str = "runs/ray"  # Ray Train storage: local dir, NFS or s3://
    run_name: str = "pretrain"  # Ray run name; rerun with the same name resumes
    peak_tflops: float = 0.0  # device peak for MFU (0 = pick by device: 989 H100 bf16, 1 CPU)
    seed: int = 0  # model init and data order seed


@dataclass(frozen=True)
class FinetuneConfig:
    methods: tuple[str, ...] = ("affiner",)  # methods run per task (comparison-table rows); + scratch
    method_lrs: dict[str, float] = field(default_factory=dict)  # per-method lr, e.g. {full: 1.0e-4} (else lr)
    extra_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # more seeds, e.g. {affiner: [1]}
    method_ranks: dict[str, int] = field(default_factory=dict)  # per-method rank, e.g. {lora: 2} (else adapter.rank)
    # per-method wrapped linears, e.g. {lora: [qkv, proj]} (else adapter.targets)
    method_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lr_from_sweep: bool = False  # the pipeline takes each method's lr from the sweep's best.json (sweep first)
    steps: int = 200  # optimizer steps per task
    batch_size: int = 32  # images per step
    lr: float = 1e-3  # AdamW learning rate for adapter parameters
    warmup_steps: int = 10  # linear warm-up steps
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (decays to 0 at the last step)
    grad_clip: float = 1.0  # gradient-norm clip (0 = off)
    use_gpu: bool = False  # one GPU per fine-tune
    cpus_per_task: float = 0.5  # CPU resource request per fine-tune (fractional packs a node)
    mixed: bool = False  # one run trains all tasks together from interleaved shards
    compile: str = "auto"  # torch.compile each block: auto (inductor on a GPU, off on CPU) | off | inductor | aot_eager
    log_every: int = 10  # steps between loss log lines
    val_samples: int = 128  # eval-split images in the validation diffusion loss
    condition_dropout: float = 0.1  # share of a map task's images trained without it (guidance)
    seed: int = 0  # init and data seed


@dataclass(frozen=True)
class SweepConfig:
    ranks: tuple[int, ...] = (2, 4, 8, 16, 32)  # adapter ranks searched
    methods: tuple[str, ...] = ()  # methods swept, each on its own (empty = adapter.method)
    lrs: tuple[float, ...] = ()  # a grid of learning rates (empty = log-uniform in [lr_min, lr_max])
    lr_min: float = 1e-4  # log-uniform learning-rate range, low end
    lr_max: float = 1e-2  # log-uniform learning-rate range, high end
    num_samples: int = 4  # trials per dataset
    max_steps: int = 100  # steps of the longest trial
    rung_steps: int = 25  # steps between validation reports (ASHA rungs)
    grace_period: int = 1  # ASHA: rungs before a trial may be stopped
    reduction_factor: int = 2  # ASHA reduction factor
    cpus_per_trial: float = 0.5  # CPU request per trial
    max_concurrent_trials: int = 0  # 0 = from the cluster's resources
    datasets: tuple[str, ...] = ()  # tasks swept (empty = all data.targets; see swept_datasets)
    fid_samples: int = 64  # generated images for the final FID of the best trials
    fid_candidates: int = 2  # best trials per dataset (by validation loss) scored by FID (0 = no FID)
    storage_path: str = ""  # Tune storage (local dir, NFS or s3://); empty = <out>/tune


@dataclass(frozen=True)
class EvalConfig:
    feature_network: str = "efficientnet-lite0"  # efficientnet-lite0 | inception-v3-compat
    feature_weights_path: str = ""  # weights file (required for inception-v3-compat)
    num_samples: int = 256  # generated images per task
    num_reference: int = 0  # reference images from the reference split (0 = all)
    reference_split: str = "eval"  # real images scored against: eval | train (the floor row uses the other)
    reference_rows: bool = True  # add the floor (real vs real) and no-adapter rows and the task accuracy
    num_actors: int = 2  # actors in the evaluation pool
    cpus_per_actor: float = 0.5  # CPU request per actor
    gpus_per_actor: float = 0.0  # GPU request per actor
    batch_size: int = 64  # images per sampling batch
    sampling_steps: int = 25  # sampler steps for evaluation
    kid_subset_size: int = 100  # KID subset size (capped at the sample count)
    cache_dir: str = "runs/fid-cache"  # reference statistics cache
    seed: int = 0  # first per-sample seed


@dataclass(frozen=True)
class GenerateConfig:
    tasks: tuple[str, ...] = ()  # tasks generated (empty = every adapter in --adapters)
    images_per_task: int = 1000  # images per task (a conditional task: split over its classes in turn)
    images_per_class: int = 0  # conditional tasks: images per class instead (0 = images_per_task in turn)
    class_label: int = -1  # only this class of every conditional task (-1 = all classes)
    batch_size: int = 32  # images per mixed-task sampling batch (one map_batches call)
    num_actors: int = 1  # Ray Data actors, each holding the backbone and the bank
    use_gpu: bool = False  # one GPU per actor (CPU otherwise)
    cpus_per_actor: float = 1.0  # CPU request per actor
    sampling_steps: int = 50  # sampler steps per image
    sampler: str = "ddim"  # ddim | ddpm
    guidance: float = 1.0  # classifier-free guidance scale (1 = off; conditional tasks only)
    # tasks with a condition map: image k takes map k mod M of the first M maps of this split of the task's
    # shards (data.shards_root/<task>, as evaluate reads eval.reference_split)
    condition_split: str = "eval"
    condition_scale: float = 1.0  # guidance on the condition map (1 = off), independent of guidance
    samples_per_shard: int = 1000  # images per output tar shard (the unit of resume)
    seed: int = 0  # image i of task t, class c is seeded by (seed, t, c, i) only
    progress_every: int = 0  # also log every N images inside a shard (0 = one line per shard)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # the Serve proxy's address (0.0.0.0 to serve other machines)
    port: int = 8000  # the Serve proxy's HTTP port
    route_prefix: str = "/"  # the app's route prefix on the proxy
    max_batch_size: int = 32  # images per mixed-task batch (@serve.batch over single images)
    batch_wait_s: float = 0.01  # longest wait for a batch to fill after its first image
    max_resident_tasks: int = 64  # adapters on the device at once; the rest wait in host memory (LRU)
    max_ongoing_requests: int = 32  # requests a replica works on at once (Serve's max_ongoing_requests)
    max_queued_requests: int = 64  # requests waiting for a replica; beyond that the proxy answers 503
    max_images_per_request: int = 16  # cap on a request's num (above it: 400)
    max_steps: int = 250  # cap on a request's steps (above it: 400)
    sampling_steps: int = 50  # steps of a request that names none
    sampler: str = "ddim"  # ddim | ddpm
    guidance: float = 1.0  # guidance of a request that names none (1 = off)
    condition_scale: float = 1.0  # guidance on the condition map of a request that names none (1 = off)
    num_replicas: int = 1  # fixed replica count when autoscaling is off
    autoscaling: bool = False  # scale replicas between min_replicas and max_replicas on ongoing requests
    min_replicas: int = 1  # autoscaling: fewest replicas
    max_replicas: int = 1  # autoscaling: most replicas
    target_ongoing_requests: float = 8.0  # autoscaling: ongoing requests per replica it aims for
    use_gpu: bool = False  # one GPU per replica (on the GPU worker types of cluster.yaml)
    cpus_per_replica: float = 1.0  # CPU request per replica
    threads: int = 0  # torch threads per replica (0 = torch's default)
    # every replica checks the adapters folder's names, sizes and mtimes this often and re-reads it on a change
    # (new, changed, removed adapters served everywhere without a POST); 0 = off (start, POST /v1/reload, 404 only)
    watch_interval_s: float = 2.0


@dataclass(frozen=True)
class PipelineConfig:
    # stages to run, in run order; empty = every stage. The names are the registry's (diffscaler.stages.STAGES),
    # checked by the pipeline: config imports no stage (they import torch and Ray, seconds)
    stages: tuple[str, ...] = ()
    backbone: str = ""  # start from this backbone file (or a public DiT .pt) instead of pretraining
    ray_address: str = ""  # empty = local ray.init(); "auto" inside ray job submit


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def validate(self) -> ExperimentConfig:
        validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


# ------------------------------------------------------------------------------------------------
# Building from dicts (YAML / JSON), with type checking per field
# ------------------------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, str) and annotation is TaskSpec:
            return TaskSpec(name=value)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {annotation.__name__}, got {value!r}")
        return from_dict(annotation, value, path)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_type, *_rest) = get_args(annotation)
        return tuple(_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = get_args(annotation)
        return {_coerce(k, key_type, f"{path}"): _coerce(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is False:  # YAML 1.1 reads a bare off / no as false; "off" is what was meant
            value = "off"
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


# Keys earlier versions wrote into config.json / backbone.json: dropped on load, so their runs still read.
RETIRED_KEYS: dict[str, frozenset[str]] = {"PretrainConfig": frozenset({"fail_at_step"})}  # now a test hook


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are an error naming the allowed ones."""
    retired = RETIRED_KEYS.get(cls.__name__, frozenset())
    data = {k: v for k, v in data.items() if k not in retired}
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = path or "config"
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["a.b=3", "c.d=[x, y]"]` -> nested dict; values parse as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. pretrain.steps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {err}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load YAML (or JSON) at `path`, apply `key=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    data = _merge(data, parse_overrides(list(overrides)))
    return from_dict(ExperimentConfig, data).validate()


def config_from_json(text_or_dict: str | dict[str, Any]) -> ExperimentConfig:
    data = json.loads(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
    return from_dict(ExperimentConfig, data).validate()


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _require(cond: bool, field_path: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_path}: {message}")


def _one_of(value: Any, allowed: tuple[Any, ...], field_path: str) -> None:
    _require(value in allowed, field_path, f"{value!r} is not one of {list(allowed)}")


# Upper bounds for sizes: far above any real run, low enough that a typo fails here, not as an allocation
# of terabytes (a 100000 px image is 30 GB) or an embedding table that never fits, minutes into a run.
MAX_IMAGE_SIDE = 8192  # pixels (data.image_size)
MAX_TOKENS = 65536  # patches per image: (input_size / patch)^2 (DiT-XL/2 at 512 px has 1024)
MAX_CHANNELS = 64  # model.in_channels (RGB 3, SD VAE 4, SD3/FLUX VAE 16)
MAX_CLASSES = 1_000_000  # model.num_classes (ImageNet-21k has 21841)
MAX_TIMESTEPS = 100_000  # diffusion.num_timesteps
MAX_RANK = 4096  # adapter ranks (DiT-XL's width is 1152)
MAX_ITEMS = 10_000_000  # counts of samples or images held in memory at once (shuffle buffer, shard size, ...)


def _finite_numbers(section: Any, prefix: str) -> None:
    """Every float of a config section (in lists and mappings too) is finite: inf and NaN pass every
    `x >= 0` test that NaN fails by accident, and then fail far from their field (or never)."""
    for f in fields(section):
        value = getattr(section, f.name)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, tuple) else None
        for key, v in items if items is not None else [(None, value)]:
            where = f"{prefix}.{f.name}" + ("" if key is None else f"[{key!r}]" if isinstance(key, int) else f".{key}")
            _require(not isinstance(v, float) or math.isfinite(v), where, f"{v} is not a finite number")


def _resource(value: float, field_path: str, *, gpu: bool = False, positive: bool = False) -> None:
    """A Ray resource request: >= 0 (> 0 where `positive`), no finer than Ray's 0.0001 unit, whole GPUs above 1."""
    sign = "positive" if positive else ">= 0"
    _require(value > 0 if positive else value >= 0, field_path, f"{value:g} must be {sign}")
    _require(value == 0 or value >= 1e-4, field_path, f"{value:g} is finer than Ray's resource unit 0.0001")
    _require(not gpu or value <= 1 or value == int(value), field_path, f"{value:g} GPUs: more than one must be whole")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    _one_of(m.arch, MODEL_ARCHS, f"{prefix}.arch")
    if m.arch == "unet":
        _one_of(m.name, UNET_NAMES, f"{prefix}.name")
        side = 0 < m.input_size <= MAX_IMAGE_SIDE and m.input_size % UNET_DOWNSAMPLE == 0
        _require(
            side,
            f"{prefix}.input_size",
            f"{m.input_size} must be a multiple of {UNET_DOWNSAMPLE} in "
            f"[{UNET_DOWNSAMPLE}, {MAX_IMAGE_SIDE}] (the U-Net halves it twice)",
        )
        _model_common(m, prefix)
        return
    match = MODEL_NAME_PATTERN.match(m.name)
    _require(
        match is not None,
        f"{prefix}.name",
        f"{m.name!r} is not a preset; allowed: DiT-{{T,S,B,L,XL}}/{{2,4,8}}",
    )
    patch = int(match.group(2))  # type: ignore[union-attr]
    _require(m.input_size > 0, f"{prefix}.input_size", "must be positive")
    _require(
        m.input_size % patch == 0,
        f"{prefix}.input_size",
        f"{m.input_size} is not divisible by the patch size {patch} of {m.name}",
    )
    tokens = (m.input_size // patch) ** 2
    _require(
        tokens <= MAX_TOKENS,
        f"{prefix}.input_size",
        f"{m.input_size} gives {tokens} tokens with patch {patch} "
        f"(at most {MAX_TOKENS}); input_size counts latent cells for a VAE backbone, not pixels",
    )
    _model_common(m, prefix)


def _model_common(m: ModelConfig, prefix: str) -> None:
    _require(0 < m.in_channels <= MAX_CHANNELS, f"{prefix}.in_channels", f"must be in [1, {MAX_CHANNELS}]")
    _require(1 <= m.num_classes <= MAX_CLASSES, f"{prefix}.num_classes", f"must be in [1, {MAX_CLASSES}]")
    _require(0.0 <= m.class_dropout_prob < 1.0, f"{prefix}.class_dropout_prob", "must be in [0, 1)")


def validate_condition(task: TaskSpec, prefix: str) -> None:
    """A known condition kind, and `mask` only on a source whose images can have alpha (known opaque
    bundled sets are refused here; a folder is probed when the shards are built)."""
    c = task.condition
    if not c:
        return
    if c.startswith(CONDITION_KEY_PREFIX):
        member = c[len(CONDITION_KEY_PREFIX) :]
        _require(
            re.fullmatch(r"([A-Za-z0-9_-]+\.)*[A-Za-z0-9_-]+", member) is not None
            and member.rsplit(".", 1)[-1].lower() in CONDITION_MAP_EXTENSIONS,
            f"{prefix}.condition",
            f"{c!r}: key:<member> names an image member of the shards' samples (what follows the key: "
            f"depth.png, seg.webp), ending in one of {', '.join(CONDITION_MAP_EXTENSIONS)}",
        )
        return
    _require(
        c in CONDITION_KINDS,
        f"{prefix}.condition",
        f"{c!r} is not a condition kind; allowed: {', '.join(CONDITION_KINDS)}, {CONDITION_KEY_PREFIX}<member> "
        "(a map in your own WebDataset shards, e.g. key:depth.png), or empty for none",
    )
    _require(
        c != "mask" or task.source_name not in OPAQUE_SOURCES,
        f"{prefix}.condition",
        f"mask is the alpha foreground, and source {task.source_name!r} has no alpha channel (opaque images); "
        "use canny, or a source with transparency (emoji, icons, openclipart, a folder of RGBA PNGs)",
    )


def validate_webdataset_target(task: TaskSpec, prefix: str, data: DataConfig) -> None:
    """label_key / image_key belong to webdataset: sources; such shards are indexed as they are (with data.vae:
    their images encoded into latent shards), so the maps they carry (key:<member>) are their only condition."""
    if not task.webdataset:
        _require(
            not task.label_key and not task.image_key,
            f"{prefix}.label_key",
            "label_key and image_key are for webdataset: sources (a folder's labels are its class folders)",
        )
        _require(
            not task.condition.startswith(CONDITION_KEY_PREFIX),
            f"{prefix}.condition",
            f"{task.condition!r} reads a member of your own WebDataset shards: use source: webdataset:DIR",
        )
        return
    _require(
        len(task.source_name) > len(WEBDATASET_PREFIX),
        f"{prefix}.source",
        "webdataset: needs the shards, e.g. webdataset:/data/pets-wds or 'webdataset:s3://b/{00000..00099}.tar'",
    )
    _require(
        not task.condition or task.condition.startswith(CONDITION_KEY_PREFIX),
        f"{prefix}.condition",
        f"{task.condition!r} is computed when shards are built from images; webdataset: shards are indexed "
        "as they are: give your maps as a member of each sample (key:depth.png)",
    )
    label = task.label_key
    _require(
        label in ("", "cls", "none") or (label.startswith("json:") and len(label) > 5),
        f"{prefix}.label_key",
        f"{label!r}: use cls, json:FIELD (a class number or name) or none"
        + ("; a txt member holds free text (captions), not a class label" if label == "txt" else ""),
    )
    _require(
        not data.vae or "npy" not in task.image_key.lower().split(";"),
        f"{prefix}.image_key",
        f"{task.image_key!r}: with data.vae the shards stage encodes your images into latents; npy latents "
        "are not encoded again: name the image member (jpg, png or webp)",
    )


def validate(cfg: ExperimentConfig) -> None:
    for section in fields(cfg):
        _finite_numbers(getattr(cfg, section.name), section.name)
    validate_model(cfg.model)

    d = cfg.diffusion
    _require(2 <= d.num_timesteps <= MAX_TIMESTEPS, "diffusion.num_timesteps", f"must be in [2, {MAX_TIMESTEPS}]")
    _require(0 < d.beta_start < d.beta_end < 1, "diffusion.beta_start", "need 0 < beta_start < beta_end < 1")
    _one_of(d.sampler, SAMPLERS, "diffusion.sampler")
    _require(
        1 <= d.sampling_steps <= d.num_timesteps,
        "diffusion.sampling_steps",
        f"must be in [1, {d.num_timesteps}]",
    )
    _require(d.ddim_eta >= 0, "diffusion.ddim_eta", "must be >= 0")
    _require(d.cfg_scale >= 0, "diffusion.cfg_scale", "must be >= 0")
    _require(d.condition_scale >= 0, "diffusion.condition_scale", "must be >= 0")

    a = cfg.adapter
    _one_of(a.method, ADAPTER_METHODS, "adapter.method")
    _require(1 <= a.rank <= MAX_RANK, "adapter.rank", f"must be in [1, {MAX_RANK}]")
    _require(len(a.targets) > 0, "adapter.targets", f"must name at least one of {list(ADAPTER_TARGETS)}")
    for t in a.targets:
        _one_of(t, ADAPTER_TARGETS, "adapter.targets")
    _require(len(set(a.targets)) == len(a.targets), "adapter.targets", "has duplicates")
    _require(a.controlnet_blocks >= 0, "adapter.controlnet_blocks", "must be >= 0 (0 = half the backbone's blocks)")

    data = cfg.data
    _require(0 < data.image_size <= MAX_IMAGE_SIDE, "data.image_size", f"must be in [1, {MAX_IMAGE_SIDE}] pixels")
    _require(0 < data.samples_per_shard <= MAX_ITEMS, "data.samples_per_shard", f"must be in [1, {MAX_ITEMS}]")
    _require(0 <= data.shuffle_buffer <= MAX_ITEMS, "data.shuffle_buffer", f"must be in [0, {MAX_ITEMS}]")
    _require(data.seed >= 0, "data.seed", "must be >= 0")
    _require(0.0 <= data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
    _require(data.limit >= 0, "data.limit", "must be >= 0 (0 = no limit)")
    names = [t.name for t in data.targets]
    _require(len(set(names)) == len(names), "data.targets", f"task names repeat: {names}")
    for i, t in enumerate(data.targets):
        _require(
            re.fullmatch(r"[A-Za-z0-9_.-]+", t.name) is not None,
            f"data.targets[{i}].name",
            f"{t.name!r} must be letters, digits, '_', '.', '-' (it names files)",
        )
        validate_condition(t, f"data.targets[{i}]")
        validate_webdataset_target(t, f"data.targets[{i}]", data)
    _require(
        not data.pretrain_source.startswith(WEBDATASET_PREFIX),
        "data.pretrain_source",
        "webdataset: sources are fine-tuning targets only; the pretraining set is built from images (a "
        "bundled name or folder:DIR)",
    )
    _require(data.canny_low >= 0, "data.canny_low", "must be >= 0")
    _require(data.canny_high >= data.canny_low, "data.canny_high", f"must be >= data.canny_low ({data.canny_low})")
    _require(data.canny_blur >= 0 and math.isfinite(data.canny_blur), "data.canny_blur", "must be >= 0 (0 = none)")
    _require(1 <= data.mask_alpha_threshold <= 255, "data.mask_alpha_threshold", "must be in [1, 255]")
    _require(0 <= data.mask_white_threshold <= 254, "data.mask_white_threshold", "must be in [0, 254]")
    _require(data.loader_workers >= 0, "data.loader_workers", "must be >= 0")
    _require(not data.vae_config or bool(data.vae), "data.vae_config", "needs data.vae (the weights file it describes)")
    _require(data.encode_actors >= 1, "data.encode_actors", "must be at least 1")
    _resource(data.encode_gpus_per_actor, "data.encode_gpus_per_actor", gpu=True)

    p = cfg.pretrain
    _require(p.num_workers >= 1, "pretrain.num_workers", "must be at least 1")
    _resource(p.cpus_per_worker, "pretrain.cpus_per_worker", positive=True)
    _require(p.grad_accum_steps >= 1, "pretrain.grad_accum_steps", "must be at least 1")
    per_step = p.num_workers * p.grad_accum_steps
    _require(
        p.global_batch_size > 0 and p.global_batch_size % per_step == 0,
        "pretrain.global_batch_size",
        f"{p.global_batch_size} is not divisible by num_workers x grad_accum_steps = {per_step}",
    )
    _require(p.steps >= 1, "pretrain.steps", "must be at least 1")
    _require(p.lr > 0 and math.isfinite(p.lr), "pretrain.lr", "must be positive and finite")
    _require(p.warmup_steps >= 0, "pretrain.warmup_steps", "must be >= 0")
    _require(p.weight_decay >= 0, "pretrain.weight_decay", "must be >= 0 (a negative decay grows the weights)")
    _require(p.grad_clip >= 0, "pretrain.grad_clip", "must be >= 0")
    _require(p.peak_tflops >= 0, "pretrain.peak_tflops", "must be >= 0 (0 = pick by device)")
    _require(p.seed >= 0, "pretrain.seed", "must be >= 0")
    _one_of(p.zero_stage, (0, 1, 2, 3), "pretrain.zero_stage")
    _one_of(p.precision, ("auto", "bf16", "fp32"), "pretrain.precision")
    _require(0.0 <= p.ema_decay < 1.0, "pretrain.ema_decay", "must be in [0, 1)")
    for name in ("log_every", "checkpoint_every"):
        _require(getattr(p, name) >= 1, f"pretrain.{name}", "must be at least 1")
    _require(p.sample_every >= 0, "pretrain.sample_every", "must be >= 0")
    _require(p.max_failures >= 0, "pretrain.max_failures", "must be >= 0")
    _require(bool(p.storage_path), "pretrain.storage_path", "must be set")
    _require(
        re.fullmatch(r"[A-Za-z0-9_.-]+", p.run_name) is not None,
        "pretrain.run_name",
        "letters, digits, '_', '.', '-' only",
    )

    f = cfg.finetune
    if cfg.model.arch == "unet":
        for m in f.methods:
            _require(
                m in UNET_METHODS,
                "finetune.methods",
                f"{m!r} does not apply to a U-Net (model.arch unet); "
                f"its methods: {list(UNET_METHODS)} (bias and scale act on convolution channels)",
            )
        for i, task in enumerate(cfg.data.targets):
            _require(
                not task.condition,
                f"data.targets[{i}].condition",
                f"{task.condition!r}: spatial conditions enter the DiT's tokens; the U-Net baseline "
                "(model.arch unet) takes none",
            )
        _require(not f.lr_from_sweep, "finetune.lr_from_sweep", "the U-Net baseline has no sweep stage to read")
    _require(len(f.methods) > 0, "finetune.methods", f"must name at least one of {list(ADAPTER_METHODS)}")
    for m in f.methods:
        _one_of(m, FINETUNE_METHODS, "finetune.methods")
    for m, seeds in f.extra_seeds.items():
        _require(m in f.methods, "finetune.extra_seeds", f"{m!r} is not one of finetune.methods {list(f.methods)}")
        _require(all(x >= 0 for x in seeds), f"finetune.extra_seeds.{m}", f"seeds must be >= 0, got {list(seeds)}")
    for m, r in f.method_ranks.items():
        _one_of(m, ADAPTER_METHODS, "finetune.method_ranks")
        _require(isinstance(r, int) and 1 <= r <= MAX_RANK, f"finetune.method_ranks.{m}", f"must be in [1, {MAX_RANK}]")
    for m, ts in f.method_targets.items():
        _one_of(m, ADAPTER_METHODS, "finetune.method_targets")
        _require(m != "full", "finetune.method_targets.full", "full fine-tuning trains every linear: no targets")
        _require(len(ts) > 0, f"finetune.method_targets.{m}", f"must name at least one of {list(ADAPTER_TARGETS)}")
        for t in ts:
            _one_of(t, ADAPTER_TARGETS, f"finetune.method_targets.{m}")
        _require(len(set(ts)) == len(ts), f"finetune.method_targets.{m}", "has duplicates")
    for m, lr in f.method_lrs.items():
        _one_of(m, FINETUNE_METHODS, "finetune.method_lrs")
        _require(lr > 0 and math.isfinite(lr), f"finetune.method_lrs.{m}", "must be a positive number")
    _require(f.steps >= 1, "finetune.steps", "must be at least 1")
    _require(f.batch_size >= 1, "finetune.batch_size", "must be at least 1")
    _require(f.lr > 0 and math.isfinite(f.lr), "finetune.lr", "must be positive and finite")
    _require(f.warmup_steps >= 0, "finetune.warmup_steps", "must be >= 0")
    _one_of(f.lr_schedule, FINETUNE_LR_SCHEDULES, "finetune.lr_schedule")
    _require(f.grad_clip >= 0, "finetune.grad_clip", "must be >= 0 (0 = off)")
    _resource(f.cpus_per_task, "finetune.cpus_per_task", positive=True)
    _require(f.log_every >= 1, "finetune.log_every", "must be at least 1")
    _require(f.seed >= 0, "finetune.seed", "must be >= 0")
    _require(f.val_samples >= 1, "finetune.val_samples", "must be at least 1")
    _require(
        0.0 <= f.condition_dropout < 1.0,
        "finetune.condition_dropout",
        "must be in [0, 1): the share of a conditional task's images trained without their map",
    )
    _one_of(f.compile, ("auto", "off", "inductor", "aot_eager"), "finetune.compile")

    s = cfg.sweep
    _require(len(s.ranks) > 0, "sweep.ranks", "the search space is empty: give at least one rank")
    for r in s.ranks:
        _require(isinstance(r, int) and 1 <= r <= MAX_RANK, "sweep.ranks", f"{r!r} is not in [1, {MAX_RANK}]")
    _require(
        0 < s.lr_min <= s.lr_max and math.isfinite(s.lr_max),
        "sweep.lr_min",
        f"need 0 < lr_min <= lr_max, got [{s.lr_min}, {s.lr_max}]",
    )
    _require(s.num_samples >= 1, "sweep.num_samples", "must be at least 1")
    _require(s.rung_steps >= 1, "sweep.rung_steps", "must be at least 1")
    _require(s.max_steps >= s.rung_steps, "sweep.max_steps", "must be >= sweep.rung_steps")
    _require(s.grace_period >= 1, "sweep.grace_period", "must be at least 1 (rungs)")
    _require(s.reduction_factor >= 2, "sweep.reduction_factor", "must be at least 2")
    _resource(s.cpus_per_trial, "sweep.cpus_per_trial", positive=True)
    _require(s.max_concurrent_trials >= 0, "sweep.max_concurrent_trials", "must be >= 0 (0 = from the cluster)")
    _require(s.fid_samples >= 2, "sweep.fid_samples", "must be at least 2 (FID needs a covariance)")
    _require(s.fid_candidates >= 0, "sweep.fid_candidates", "must be >= 0 (0 = choose by validation loss)")
    for m in s.methods:
        _one_of(m, FINETUNE_METHODS, "sweep.methods")
    for lr in s.lrs:
        _require(lr > 0 and math.isfinite(lr), "sweep.lrs", f"{lr!r} is not a positive number")

    e = cfg.eval
    _one_of(e.feature_network, FEATURE_NETWORKS, "eval.feature_network")
    _require(
        e.feature_network != "inception-v3-compat" or bool(e.feature_weights_path),
        "eval.feature_weights_path",
        "inception-v3-compat needs a weights file (its download is not available offline)",
    )
    _require(e.num_samples >= 2, "eval.num_samples", "must be at least 2")
    _require(e.num_reference >= 0, "eval.num_reference", "must be >= 0 (0 = all)")
    _one_of(e.reference_split, ("eval", "train"), "eval.reference_split")
    _require(e.num_actors >= 1, "eval.num_actors", "must be at least 1")
    _resource(e.cpus_per_actor, "eval.cpus_per_actor", positive=True)
    _resource(e.gpus_per_actor, "eval.gpus_per_actor", gpu=True)
    _require(e.kid_subset_size >= 2, "eval.kid_subset_size", "must be at least 2 (KID compares pairs within a subset)")
    _require(e.seed >= 0, "eval.seed", "must be >= 0")
    _require(e.batch_size >= 1, "eval.batch_size", "must be at least 1")
    _require(
        1 <= e.sampling_steps <= d.num_timesteps,
        "eval.sampling_steps",
        f"must be in [1, diffusion.num_timesteps={d.num_timesteps}]",
    )

    g = cfg.generate
    for i, t in enumerate(g.tasks):
        _require(re.fullmatch(r"[A-Za-z0-9_.-]+", t) is not None, f"generate.tasks[{i}]", f"{t!r} is not a task name")
    _require(len(set(g.tasks)) == len(g.tasks), "generate.tasks", f"repeats a task: {list(g.tasks)}")
    _require(1 <= g.images_per_task <= MAX_ITEMS, "generate.images_per_task", f"must be in [1, {MAX_ITEMS}]")
    _require(0 <= g.images_per_class <= MAX_ITEMS, "generate.images_per_class", f"must be in [0, {MAX_ITEMS}]")
    _require(g.class_label >= -1, "generate.class_label", "must be a class index, or -1 for every class")
    _require(g.batch_size >= 1, "generate.batch_size", "must be at least 1")
    _require(g.num_actors >= 1, "generate.num_actors", "must be at least 1")
    _resource(g.cpus_per_actor, "generate.cpus_per_actor", positive=True)
    steps_range = f"must be in [1, diffusion.num_timesteps={d.num_timesteps}]"
    _require(1 <= g.sampling_steps <= d.num_timesteps, "generate.sampling_steps", steps_range)
    _one_of(g.sampler, SAMPLERS, "generate.sampler")
    _require(g.guidance >= 0, "generate.guidance", "must be >= 0 (1 = off)")
    _one_of(g.condition_split, ("eval", "train"), "generate.condition_split")
    _require(g.condition_scale >= 0, "generate.condition_scale", "must be >= 0 (1 = off)")
    _require(0 < g.samples_per_shard <= MAX_ITEMS, "generate.samples_per_shard", f"must be in [1, {MAX_ITEMS}]")
    _require(g.seed >= 0, "generate.seed", "must be >= 0")
    _require(g.progress_every >= 0, "generate.progress_every", "must be >= 0 (0 = per shard only)")

    v = cfg.serve
    _require(bool(v.host), "serve.host", "must be set (127.0.0.1, or 0.0.0.0 for every interface)")
    _require(0 <= v.port <= 65535, "serve.port", "must be in [0, 65535]")
    _require(v.route_prefix.startswith("/"), "serve.route_prefix", f"{v.route_prefix!r} must start with '/'")
    _require(1 <= v.max_batch_size <= MAX_ITEMS, "serve.max_batch_size", f"must be in [1, {MAX_ITEMS}]")
    _require(0 <= v.batch_wait_s <= 60, "serve.batch_wait_s", "must be in [0, 60] seconds")
    _require(v.max_resident_tasks >= 1, "serve.max_resident_tasks", "must be at least 1")
    _require(v.max_ongoing_requests >= 1, "serve.max_ongoing_requests", "must be at least 1")
    _require(v.max_queued_requests >= 1, "serve.max_queued_requests", "must be at least 1 (beyond it: 503)")
    _require(1 <= v.max_images_per_request <= MAX_ITEMS, "serve.max_images_per_request", f"must be in [1, {MAX_ITEMS}]")
    # a cap, taken with diffusion.num_timesteps (the server answers min of the two), so a section written for
    # one backbone's schedule does not make every other config invalid
    _require(1 <= v.max_steps <= MAX_TIMESTEPS, "serve.max_steps", f"must be in [1, {MAX_TIMESTEPS}]")
    _require(
        1 <= v.sampling_steps <= v.max_steps, "serve.sampling_steps", f"must be in [1, serve.max_steps={v.max_steps}]"
    )
    _one_of(v.sampler, SAMPLERS, "serve.sampler")
    _require(v.guidance >= 0, "serve.guidance", "must be >= 0 (1 = off)")
    _require(0 <= v.condition_scale <= 100, "serve.condition_scale", "must be in [0, 100] (1 = off)")
    _require(v.num_replicas >= 1, "serve.num_replicas", "must be at least 1")
    _require(v.min_replicas >= 0, "serve.min_replicas", "must be >= 0")
    _require(
        v.max_replicas >= max(1, v.min_replicas),
        "serve.max_replicas",
        f"must be >= serve.min_replicas ({v.min_replicas}) and at least 1",
    )
    _require(v.target_ongoing_requests > 0, "serve.target_ongoing_requests", "must be positive")
    _resource(v.cpus_per_replica, "serve.cpus_per_replica", positive=True)
    _require(v.threads >= 0, "serve.threads", "must be >= 0 (0 = torch's default)")
    _require(0 <= v.watch_interval_s <= 3600, "serve.watch_interval_s", "must be in [0, 3600] seconds (0 = off)")

    stages = cfg.pipeline.stages
    for st in stages:
        _require(st.isidentifier(), "pipeline.stages", f"{st!r} is not a stage name (e.g. shards, finetune)")
    _require(len(set(stages)) == len(stages), "pipeline.stages", f"repeats a stage: {list(stages)}")


def swept_datasets(cfg: ExperimentConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tasks the sweep searches, sweep.datasets names that are not targets). Only the sweep reads
    sweep.datasets: names missing from data.targets are skipped, so a config's sweep section keeps working
    when data.targets is overridden; when none remains the sweep takes the first target."""
    targets = [t.name for t in cfg.data.targets]
    if not cfg.sweep.datasets:
        return tuple(targets), ()
    kept = tuple(d for d in cfg.sweep.datasets if d in targets)
    missing = tuple(d for d in cfg.sweep.datasets if d not in targets)
    return (kept or tuple(targets[:1])), missing
