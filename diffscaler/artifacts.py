"""Files that cross stage boundaries (public, versioned contracts): backbones and adapters.

- Backbone: `backbone.safetensors` + `backbone.json` (format, version, model config, provenance,
  content hash). `load_backbone` also reads public facebookresearch/DiT checkpoints (`*.pt`, a plain
  state dict, loaded with `weights_only=True`) and infers the model config from tensor shapes.
- Adapter: `<task>.safetensors` + `<task>.json` (task, method, rank, targets, classes, backbone
  hash). Loading onto another backbone, shape or method is a clear `AdapterLoadError`. A task with a
  condition map also carries its condition path (tensors `condition.*`; JSON `condition`: kind,
  channels, map size, how the map enters, the extractor record) and is written as format version 2,
  so a reader that knows no condition path refuses it instead of dropping it.
- Adapter bank: `bank.safetensors` + `bank.json`, every task of one method (written and read by
  `diffscaler.bank_file`; recognised here so a folder's adapters leave the bank out).

Writes are atomic: a temp name, then a rename, JSON last, so a crash never leaves a pair that looks
complete.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffscaler.adapters.bank import AdapterBank, AdapterLoadError, TaskInfo
from diffscaler.atomic import atomic_path
from diffscaler.backbones import attach_bank, bank_of, build_backbone
from diffscaler.config import ModelConfig, from_dict
from diffscaler.errors import rust_os_error
from diffscaler.models.dit import DIT_SIZES, DiT, parse_preset

BACKBONE_FORMAT = "diffscaler-backbone"
BACKBONE_FORMAT_VERSION = 1
ADAPTER_FORMAT = "diffscaler-adapter"
ADAPTER_FORMAT_VERSION = 2  # 2: a conditional task's condition path; unconditional adapters are still written as 1
BANK_FORMAT = "diffscaler-adapter-bank"  # every task's adapter in one file pair: diffscaler.bank_file
BANK_FORMAT_VERSION = 1


class BackboneLoadError(ValueError):
    """A backbone file that is missing, malformed or does not match the expected model."""


def content_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes: equal weights give equal hashes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def backbone_state(model: DiT) -> dict[str, torch.Tensor]:
    """The backbone's own tensors in DiT key layout (adapters, if attached, are not part of it)."""
    if bank_of(model) is not None:
        raise ValueError("export the backbone before attaching adapters (its weights are wrapped)")
    return {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}


def write_file_pair(
    tensors: dict[str, torch.Tensor], st_path: Path, meta: dict[str, Any], st_meta: dict[str, str]
) -> None:
    """Write `X.safetensors` + `X.json` atomically: both written under temp names, then renamed, the JSON last."""
    from safetensors import SafetensorError

    js_path = st_path.with_suffix(".json")
    with atomic_path(js_path) as tmp_js, atomic_path(st_path) as tmp_st:  # exits inner first: tensors, then JSON
        try:
            save_file(tensors, str(tmp_st), metadata=st_meta)
        except SafetensorError as err:  # a full disk comes as text, "I/O error: ... (os error 28)"
            if (os_error := rust_os_error(err, st_path)) is not None:
                raise os_error from None
            raise
        tmp_js.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def check_safetensors(path: Path, error: type[ValueError]) -> None:
    """The file's header parses and its tensors' byte ranges lie inside the file (no tensor is read: the
    header and the file size, milliseconds even for a 2.7 GB DiT-XL), else `error` naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise error(
            f"{path}: not a readable safetensors file ({err}): it is truncated or corrupt, e.g. a copy "
            "that did not finish; copy or write it again"
        ) from None


def _read_tensors(path: Path, error: type[ValueError]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise error(
            f"{path}: not a readable safetensors file ({err}): it is truncated or corrupt, e.g. a copy "
            "that did not finish; copy or write it again"
        ) from None


def read_format_json(path: Path, fmt: str, version: int, what: str, error: type[ValueError]) -> dict[str, Any]:
    """A versioned JSON of ours: parses, names `fmt`, and is no newer than `version` - else `error`."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise error(f"{path}: not a DiffScaler {what} (format={found!r})")
    if meta.get("format_version", 0) > version:
        raise error(f"{path}: format version {meta['format_version']} is newer than this DiffScaler reads ({version})")
    return meta


# ------------------------------------------------------------------------------------------------
# Backbone
# ------------------------------------------------------------------------------------------------


def save_backbone(
    model: DiT | dict[str, torch.Tensor],
    path: str | Path,
    config: ModelConfig | None = None,
    provenance: dict[str, Any] | None = None,
) -> str:
    """Write `path` (.safetensors) and the JSON beside it; returns the content hash."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a backbone file ends in .safetensors")
    if isinstance(model, nn.Module):
        state, config = backbone_state(model), model.config
    else:
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.items()}
    if config is None:
        raise ValueError("save_backbone needs the model config with a bare state dict")
    digest = content_hash(state)
    meta = {
        "format": BACKBONE_FORMAT,
        "format_version": BACKBONE_FORMAT_VERSION,
        "model": asdict(config),
        "content_hash": digest,
        "num_parameters": sum(v.numel() for k, v in state.items() if k != "pos_embed"),
        "provenance": provenance or {},
    }
    write_file_pair(state, path, meta, {"format": BACKBONE_FORMAT, "content_hash": digest})
    return digest


def read_backbone_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise BackboneLoadError(f"backbone file not found: {path}")
    if not meta_path.is_file():
        raise BackboneLoadError(f"{path}: its config {meta_path.name} is missing beside it")
    meta = read_format_json(meta_path, BACKBONE_FORMAT, BACKBONE_FORMAT_VERSION, "backbone config", BackboneLoadError)
    check_safetensors(path, BackboneLoadError)  # every preflight reads the meta: a truncated file is found there
    return meta


def load_backbone(
    path: str | Path, expect: ModelConfig | None = None, verify_hash: bool = True, num_classes: int | None = None
) -> tuple[DiT, dict[str, Any]]:
    """Load a backbone file (ours, or a public DiT `.pt`). Returns (model, meta with `content_hash`).

    `expect` (a model config) makes a mismatch in size, patch, input or channels a clear error.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return load_public_dit(path, expect=expect)
    meta = read_backbone_meta(path)
    config = from_dict(ModelConfig, meta["model"], "backbone.model")
    if expect is not None:
        check_model_matches(config, expect, str(path))
    state = _read_tensors(path, BackboneLoadError)
    if verify_hash:
        digest = content_hash(state)
        if digest != meta["content_hash"]:
            raise BackboneLoadError(
                f"{path}: content hash {digest} does not match its JSON "
                f"({meta['content_hash']}); the file is corrupt or was replaced"
            )
    model = build_backbone(config)
    _load_state(model, state, str(path))
    return model, meta


def check_model_matches(actual: ModelConfig, expected: ModelConfig, where: str) -> None:
    keys = ("name", "input_size", "in_channels", "learn_sigma")
    diff = {k: (getattr(actual, k), getattr(expected, k)) for k in keys if getattr(actual, k) != getattr(expected, k)}
    if diff:
        raise BackboneLoadError(
            f"{where}: backbone does not match the model config: "
            + ", ".join(f"{k} file={a!r} config={b!r}" for k, (a, b) in diff.items())
        )


def _load_state(model: DiT, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise BackboneLoadError(
            f"{where}: keys do not match {model.config.name}: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BackboneLoadError(
                f"{where}: {k} has shape {tuple(v.shape)}, {model.config.name} needs {tuple(own[k].shape)}"
            )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def infer_dit_config(state: dict[str, torch.Tensor], class_dropout_prob: float = 0.1) -> ModelConfig:
    """Model config of a facebookresearch/DiT state dict, from its tensor shapes."""
    try:
        hidden, in_ch, patch, _ = state["x_embedder.proj.weight"].shape
        depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        num_tokens = state["pos_embed"].shape[1]
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
        out_dim = state["final_layer.linear.weight"].shape[0]
    except KeyError as err:
        raise BackboneLoadError(f"not a DiT state dict: missing {err}") from None
    size = next((name for name, s in DIT_SIZES.items() if (s.depth, s.hidden_size) == (depth, hidden)), None)
    if size is None:
        raise BackboneLoadError(f"no DiT preset has depth {depth} and width {hidden}")
    grid = int(round(num_tokens**0.5))
    learn_sigma = out_dim == patch * patch * in_ch * 2
    return ModelConfig(
        name=f"DiT-{size}/{patch}",
        input_size=grid * patch,
        in_channels=in_ch,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob,
    )


def _torch_load_plain(path: Path) -> Any:
    """torch.load with weights_only=True (tensors and containers only, never arbitrary objects).

    The one class allowed besides: argparse.Namespace, the `args` entry of checkpoints written by the
    reference train.py ({"model", "ema", "opt", "args"}). Anything else is "not a plain state dict";
    torch's own text is not passed on, as it advises weights_only=False (arbitrary code execution).
    """
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except torch.serialization.pickle.UnpicklingError as err:  # what weights_only raises; nothing is unpickled
        # torch <= 2.12: "Unsupported global: GLOBAL x.y"; 2.13, for os/sys/posix/nt: "unsupported GLOBAL x.y whose
        # module x is blocked" (a pickle that calls os.system, say)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(err))
        why = f"it holds a pickled {found.group(1)} object" if found else "it is not a readable torch file"
        raise BackboneLoadError(
            f"{path}: not a plain state dict ({why}); DiffScaler loads tensors only, never arbitrary pickled objects"
        ) from None
    except (RuntimeError, EOFError) as err:  # a truncated or foreign zip archive
        raise BackboneLoadError(
            f"{path}: not a plain state dict (not a readable torch file: {str(err).splitlines()[0]})"
        ) from None


def load_public_dit(path: str | Path, expect: ModelConfig | None = None) -> tuple[DiT, dict[str, Any]]:
    """Load e.g. `DiT-XL-2-256x256.pt` (a plain state dict in facebookresearch/DiT's key layout)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneLoadError(f"DiT checkpoint not found: {path}")
    state = _torch_load_plain(path)
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]  # a training checkpoint of the reference code: take the EMA weights
    if not isinstance(state, dict):
        raise BackboneLoadError(f"{path}: expected a state dict, got {type(state).__name__}")
    config = infer_dit_config(state)
    if expect is not None:
        check_model_matches(config, expect, str(path))
    model = DiT(config)
    _load_state(model, {k: v.float() for k, v in state.items()}, str(path))
    digest = content_hash(backbone_state(model))
    return model, {
        "format": "facebookresearch-dit",
        "model": asdict(config),
        "content_hash": digest,
        "provenance": {"source": str(path)},
    }


# ------------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------------


def condition_meta(bank: AdapterBank, info: TaskInfo) -> dict[str, Any] | None:
    """The adapter JSON's `condition` record of a task (None for a task without a map)."""
    if not info.has_condition:
        return None
    return {
        "kind": info.condition,
        "channels": info.condition_channels,
        "size": bank.condition_size,  # the map's side in pixels (the DiT's input side times the VAE factor)
        "blocks": bank.condition_blocks,  # the tokens also enter every block's input
        "controlnet_blocks": bank.controlnet_blocks,
        "extractor": dict(info.condition_extractor),
        "params": bank.condition_parameters_per_task(info.name),
    }


def task_info_from_meta(meta: dict[str, Any]) -> TaskInfo:
    """The TaskInfo an adapter's (or a bank manifest's task) JSON describes, its condition included."""
    cond = meta.get("condition") or {}
    return TaskInfo(
        meta["task"],
        meta["num_classes"],
        meta["conditional"],
        meta["rank"],
        tuple(meta.get("class_names", ())),
        condition=cond.get("kind", ""),
        condition_channels=int(cond.get("channels", 0)),
        condition_size=int(cond.get("size", 0)),
        condition_extractor=dict(cond.get("extractor", {})),
    )


def save_adapter(
    bank: AdapterBank, task: str | int, out_dir: str | Path, backbone_hash: str, extra: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write `<task>.safetensors` + `<task>.json` for one task of `bank` (a conditional task's condition
    path and its `condition` record included: kind, channels, size, TaskInfo.condition_extractor)."""
    info = bank.tasks[task if isinstance(task, int) else bank.task_index(task)]
    cond = condition_meta(bank, info)
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION if cond else 1,
        "task": info.name,
        "method": bank.method,
        "rank": info.rank,
        "targets": list(bank.targets),
        "conditional": info.conditional,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "backbone_hash": backbone_hash,
        "model": asdict(bank.model.config),
        "trainable_params": bank.trainable_parameters_per_task(info.name),
        "backbone_params": bank.backbone_parameters(),
        "condition": cond,
        **(extra or {}),
    }
    st_path = Path(out_dir) / f"{info.name}.safetensors"
    write_file_pair(bank.task_state(info.name), st_path, meta, {"format": ADAPTER_FORMAT, "task": info.name})
    return st_path, st_path.with_suffix(".json")


def read_adapter_file(file: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(file)
    if path.suffix != ".safetensors":
        raise AdapterLoadError(f"{path}: an adapter file ends in .safetensors")
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise AdapterLoadError(f"adapter file not found: {path}")
    if not meta_path.is_file():
        raise AdapterLoadError(f"{path}: its config {meta_path.name} is missing beside it")
    meta = read_format_json(meta_path, ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, "adapter config", AdapterLoadError)
    return meta, _read_tensors(path, AdapterLoadError)


def read_adapter_meta(file: str | Path) -> dict[str, Any]:
    """The JSON beside an adapter file (no tensors read); AdapterLoadError when it is missing or foreign."""
    path = Path(file)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise AdapterLoadError(f"adapter file not found: {path}")
    if not meta_path.is_file():
        raise AdapterLoadError(f"{path}: its config {meta_path.name} is missing beside it")
    meta = read_format_json(meta_path, ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, "adapter config", AdapterLoadError)
    check_safetensors(path, AdapterLoadError)
    return meta


def _bank_tasks(path: Path) -> list[str] | None:
    """The task names of a bank file pair (bank.json / bank.safetensors), or None when `path` is no bank."""
    meta_path = path.with_suffix(".json")
    try:
        fmt = json.loads(meta_path.read_text()).get("format")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if fmt != BANK_FORMAT:
        return None
    meta = read_format_json(meta_path, BANK_FORMAT, BANK_FORMAT_VERSION, "adapter bank", AdapterLoadError)
    return [m["task"] for m in meta["tasks"]]


def adapter_files(paths: Sequence[str | Path]) -> list[Path]:
    """The per-task adapter files that `paths` name, in order: `<task>.safetensors` files; folders (their
    `*.safetensors` adapters, not the bank written beside them, not sub-folders); bank files
    (`bank.json` / `bank.safetensors`: the per-task files beside it, in bank order). A fine-tune's
    output folder, its files by glob and its bank all work. AdapterLoadError names what is missing."""
    out: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            found = [f for f in sorted(p.glob("*.safetensors")) if _bank_tasks(f) is None]
            if not found:
                raise AdapterLoadError(f"{p}: no <task>.safetensors adapter files")
            out += found
        elif p.suffix in (".json", ".safetensors") and (tasks := _bank_tasks(p)) is not None:
            files = [p.with_name(f"{t}.safetensors") for t in tasks]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise AdapterLoadError(f"{p}: the bank's per-task file(s) {missing} are not beside it")
            out += files
        elif p.suffix == ".json" and p.with_suffix(".safetensors").is_file():
            out.append(p.with_suffix(".safetensors"))  # the JSON half of an adapter pair
        else:
            out.append(p)  # read_adapter_file / read_adapter_meta say what is wrong with it
    return list(dict.fromkeys(out))  # once each: `DIR/*.safetensors` names the bank and its files too


def _check_adapter_fits(
    meta: dict[str, Any], file: str | Path, model_cfg: ModelConfig, backbone_hash: str | None
) -> None:
    if backbone_hash is not None and meta.get("backbone_hash") != backbone_hash:
        raise AdapterLoadError(
            f"{file}: trained on backbone {meta.get('backbone_hash')!r}, but the loaded backbone is "
            f"{backbone_hash!r}; an adapter only works on the backbone it was trained on"
        )
    theirs, mine = meta.get("model", {}), asdict(model_cfg)
    arch = theirs.get("arch", "dit")  # files written before model.arch existed are DiT adapters
    if arch != model_cfg.arch:
        raise AdapterLoadError(
            f"{file}: an adapter of a {arch!r} backbone (model.arch), but the loaded backbone is a "
            f"{model_cfg.arch!r}; DiT and U-Net adapters do not load onto each other"
        )
    keys = ("name", "input_size", "in_channels", "learn_sigma")
    diff = {k: (theirs.get(k), mine[k]) for k in keys if theirs.get(k) != mine[k]}
    if diff:
        raise AdapterLoadError(
            f"{file}: model config differs from the backbone's: "
            + ", ".join(f"{k} adapter={a!r} backbone={b!r}" for k, (a, b) in diff.items())
        )


def check_condition_fits(meta: dict[str, Any], file: str | Path, model_cfg: ModelConfig) -> None:
    """AdapterLoadError when a conditional adapter's condition path cannot run on this backbone."""
    cond = meta.get("condition")
    if not cond:
        return
    from diffscaler.adapters.condition import stem_factor

    try:
        stem_factor(int(cond.get("size") or model_cfg.input_size), model_cfg.input_size)
    except ValueError as err:
        raise AdapterLoadError(f"{file}: its condition path ({cond.get('kind')}) cannot run here: {err}") from None
    depth = parse_preset(model_cfg.name)[0].depth
    if meta.get("method") == "controlnet" and not 1 <= int(cond.get("controlnet_blocks", 0)) <= depth:
        raise AdapterLoadError(
            f"{file}: its ControlNet copies {cond.get('controlnet_blocks')} blocks; {model_cfg.name} has {depth}"
        )


def attach_described(model: DiT, metas: Sequence[dict[str, Any]], names: Sequence[str]) -> AdapterBank:
    """Attach an empty bank for the tasks these adapter JSONs describe (one method and target set; the
    conditional ones taking their maps alike), `names` naming each in errors; the caller loads the tensors."""
    conds = [(f, m["condition"]) for f, m in zip(names, metas, strict=True) if m.get("condition")]
    for key in ("size", "blocks", "controlnet_blocks"):
        if len({json.dumps(c.get(key)) for _, c in conds}) > 1:
            raise AdapterLoadError(
                f"conditional adapters disagree on condition {key}: "
                + ", ".join(f"{Path(f).name}={c.get(key)}" for f, c in conds)
                + "; one bank takes every map the same way"
            )
    tasks = [task_info_from_meta(m) for m in metas]
    first = conds[0][1] if conds else {}
    return attach_bank(
        model,
        tasks,
        method=metas[0]["method"],
        rank=max(t.rank for t in tasks),
        targets=tuple(metas[0]["targets"]),
        condition_blocks=bool(first.get("blocks")),
        controlnet_blocks=int(first.get("controlnet_blocks") or 0),
    )


def load_adapters(model: DiT, files: Sequence[str | Path], backbone_hash: str | None) -> AdapterBank:
    """Attach a bank holding the tasks of `files` to `model`, in the order given.

    Tasks of different ranks share a bank (smaller ranks are zero-padded, exactly); they must share
    the method and the target set, and conditional tasks how their maps enter (size, `blocks`,
    `controlnet_blocks`).
    """
    if not files:
        raise AdapterLoadError("no adapter files given")
    metas, states = [], []
    for f in files:
        meta, state = read_adapter_file(f)
        _check_adapter_fits(meta, f, model.config, backbone_hash)
        check_condition_fits(meta, f, model.config)
        metas.append(meta)
        states.append(state)
    for key in ("method", "targets"):
        if len({json.dumps(m[key]) for m in metas}) > 1:
            raise AdapterLoadError(
                f"adapters disagree on {key}: "
                + ", ".join(f"{Path(f).name}={m[key]}" for f, m in zip(files, metas, strict=True))
                + "; one bank holds one method and one target set"
            )
    bank = attach_described(model, metas, [str(f) for f in files])
    for i, (f, state) in enumerate(zip(files, states, strict=True)):
        bank.load_task_state(i, state, f)
    return bank


# ------------------------------------------------------------------------------------------------
# Task models: a whole DiT trained for one task (the comparison's `scratch` row)
# ------------------------------------------------------------------------------------------------

TASK_MODEL_KEY = "task_model"  # backbone.json provenance key that marks a file as one task's own model


def save_task_model(
    model: DiT,
    info: TaskInfo,
    out_dir: str | Path,
    backbone_hash: str,
    backbone_params: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `<task>.safetensors` + `.json` in the backbone format, with the adapter-like description of
    the task (method, classes, the backbone it is compared against) under provenance[TASK_MODEL_KEY]."""
    described = {
        "task": info.name,
        "method": "scratch",
        "rank": 0,
        "targets": [],
        "conditional": info.conditional,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "backbone_hash": backbone_hash,
        "model": asdict(model.config),
        "trainable_params": model.num_parameters(trainable_only=True),
        "backbone_params": backbone_params,
        **(extra or {}),
    }
    path = Path(out_dir) / f"{info.name}.safetensors"
    save_backbone(model, path, provenance={TASK_MODEL_KEY: described})
    return path


def read_trained_meta(file: str | Path) -> dict[str, Any]:
    """The adapter JSON of `file`, or for a task model (scratch) its description with `task_model: True`.
    AdapterLoadError when the file is neither."""
    path = Path(file)
    meta_path = path.with_suffix(".json")
    try:
        fmt = json.loads(meta_path.read_text()).get("format")
    except (OSError, json.JSONDecodeError, AttributeError):
        fmt = None
    if fmt == BACKBONE_FORMAT and path.is_file():
        try:
            meta = read_backbone_meta(path)
        except BackboneLoadError as err:
            raise AdapterLoadError(str(err)) from None
        described = meta.get("provenance", {}).get(TASK_MODEL_KEY)
        if not isinstance(described, dict):
            raise AdapterLoadError(f"{path}: a backbone, not an adapter or a task's own model")
        return {**described, TASK_MODEL_KEY: True, "content_hash": meta["content_hash"]}
    return read_adapter_meta(path)


def is_task_model(file: str | Path) -> bool:
    try:
        return bool(read_trained_meta(file).get(TASK_MODEL_KEY))
    except (AdapterLoadError, OSError):
        return False
