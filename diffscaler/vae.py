"""The latent space: a diffusers `AutoencoderKL` loaded from local files, with its identity and scaling.

    vae = load_vae("/data/weights/sd-vae-ft-ema")                  # a diffusers folder (config.json + weights)
    vae = load_vae("/data/vae.safetensors", config="/data/vae-config.json")   # one weights file + its config
    z = vae.encode(images)          # uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] -> (N, C, H/f, W/f)
    x = vae.decode(z)               # scaled latents -> float (N, 3, H, W) in [-1, 1]
    vae.identity                    # {"hash", "config_sha256", "weights_sha256", "scaling_factor", ...}

Latents are the posterior's mean times the VAE's own `scaling_factor` (0.18215 for Stable Diffusion's;
`(mean - shift_factor) * scaling_factor` where the config has a shift), as DiT, DiffFit and DiffScaler
train on. The scaling factor always comes from the VAE's config, never from a constant here.

Nothing is downloaded: a path that is missing, or that holds no VAE, is a `VaeError` naming the path
and what to put there. `identity["hash"]` (config + weights) goes into index.json of latent shards, so a
fine-tune, a sampler or an FID actor holding another VAE is refused instead of decoding garbage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffscaler.torchvision_compat import ensure_torchvision_importable

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_NAME = "config.json"
_WHAT_TO_PUT = (
    "give a local diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, e.g. "
    "stabilityai/sd-vae-ft-ema downloaded once) or a single .safetensors file with --vae-config / "
    "data.vae_config naming its config.json"
)


class VaeError(ValueError):
    """A VAE that cannot be used; the message names the path and what to put there."""


def import_diffusers() -> types.ModuleType:
    """`import diffusers` in this project's venv, e.g. in a script that prepares a VAE (README).

    diffusers imports torchvision, and the venv's torchvision (PyPI's 0.28.0, a CUDA build) does not import
    beside the CPU torch ("operator torchvision::nms does not exist"); the shim in
    diffscaler.torchvision_compat, active only where that happens, makes it importable first.
    """
    ensure_torchvision_importable()
    import diffusers

    return diffusers


def _autoencoder_class():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a hub download, whatever the path says
    return import_diffusers().AutoencoderKL


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _config_sha256(config: dict[str, Any]) -> str:
    """The architecture and scaling as configured; diffusers' bookkeeping keys (`_name_or_path`, ...) left out."""
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()


def _read_config(path: Path, where: str) -> dict[str, Any]:
    if not path.is_file():
        raise VaeError(f"{where}: no {path.name} at {path}; {_WHAT_TO_PUT}")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise VaeError(f"{path}: not a readable JSON config ({err}); {_WHAT_TO_PUT}") from None
    if (
        not isinstance(config, dict)
        or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL"
        or "latent_channels" not in config
    ):
        name = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise VaeError(f"{path}: not an AutoencoderKL config (class {name!r}, needs latent_channels); {_WHAT_TO_PUT}")
    return config


@dataclass
class Vae:
    """An AutoencoderKL in eval mode, with the identity that latent shards record."""

    model: Any  # diffusers.AutoencoderKL
    path: str  # what it was loaded from
    identity: dict[str, Any]

    @property
    def latent_channels(self) -> int:
        return int(self.identity["latent_channels"])

    @property
    def downsample(self) -> int:
        return int(self.identity["downsample"])

    @property
    def scaling_factor(self) -> float:
        return float(self.identity["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.identity["shift_factor"])

    @property
    def hash(self) -> str:
        return str(self.identity["hash"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Vae:
        self.model.to(device)
        return self

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise VaeError(
                f"{self.path}: image size {image_size} is not a multiple of the VAE's downsampling "
                f"factor {self.downsample}"
            )
        return self.latent_channels, image_size // self.downsample, image_size // self.downsample

    @staticmethod
    def _pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]; float input is taken as (N, 3, H, W) in [-1, 1]."""
        x = torch.as_tensor(images)
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)
        return x.float()

    @torch.no_grad()
    def encode_distribution(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's (mean, std), both (N, C, h, w), scaled into the diffusion model's latent space."""
        x = self._pixels(images).to(self.device)
        dist = self.model.encode(x).latent_dist
        mean = (dist.mean - self.shift_factor) * self.scaling_factor  # (N, C, h, w)
        return mean.float(), (dist.std * self.scaling_factor).float()

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scaled posterior means (N, C, h, w) float32: what latent shards store (as fp16)."""
        return self.encode_distribution(images)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, C, h, w) -> images float (N, 3, H, W) clamped to [-1, 1]."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.model.decode(z).sample.float().clamp(-1, 1)


def resolve_vae_files(path: str | os.PathLike, config: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(config.json, weights file) of a diffusers folder or of one weights file; VaeError when missing."""
    where = str(path)
    if not where:
        raise VaeError(f"no VAE path given; {_WHAT_TO_PUT}")
    p = Path(path).expanduser()
    if not p.exists():
        raise VaeError(f"VAE {where}: no such file or folder; {_WHAT_TO_PUT}")
    if p.is_dir():
        weights = next((p / n for n in WEIGHT_NAMES if (p / n).is_file()), None)
        if weights is None:
            raise VaeError(f"VAE {where}: folder holds none of {', '.join(WEIGHT_NAMES)}; {_WHAT_TO_PUT}")
        return (Path(config) if config else p / CONFIG_NAME), weights
    if config is None:
        beside = p.with_name(CONFIG_NAME)
        if not beside.is_file():
            raise VaeError(
                f"VAE {where}: a single weights file needs its config.json (none given, none at "
                f"{beside}); {_WHAT_TO_PUT}"
            )
        config = beside
    return Path(config), p


def vae_identity(path: str | os.PathLike, config: str | os.PathLike | None = None) -> dict[str, Any]:
    """What latent shards record about their VAE, from the files alone (no model is built): config and
    weights hashes, `hash` (both), scaling and shift factors, latent channels, downsampling factor."""
    config_path, weights = resolve_vae_files(path, config)
    cfg = _read_config(config_path, f"VAE {path}")
    identity = {
        "class": "AutoencoderKL",
        "config_sha256": _config_sha256(cfg),
        "weights_sha256": _sha256_file(weights),
        "scaling_factor": float(cfg.get("scaling_factor", 0.18215)),  # diffusers' default when absent
        "shift_factor": float(cfg.get("shift_factor") or 0.0),
        "latent_channels": int(cfg["latent_channels"]),
        "downsample": 2 ** (len(cfg.get("block_out_channels", [64])) - 1),
    }
    identity["hash"] = (
        "sha256:" + hashlib.sha256(f"{identity['config_sha256']}\n{identity['weights_sha256']}".encode()).hexdigest()
    )
    return identity


@functools.lru_cache(maxsize=8)
def _identity_cached(path: str, config: str, stamp: tuple) -> dict[str, Any]:
    return vae_identity(path, config or None)


def cached_vae_identity(path: str | os.PathLike, config: str | os.PathLike | None = None) -> dict[str, Any]:
    """vae_identity, hashed once per process while the files are unchanged (SD's weights are 335 MB)."""
    config_path, weights = resolve_vae_files(path, config)
    stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in (config_path, weights) if f.exists())
    return dict(_identity_cached(str(path), str(config or ""), stamp))


def configured_vae_hash(vae: str, vae_config: str = "") -> str:
    """The identity hash of a configured VAE (data.vae, data.vae_config); "" when none. VaeError when bad."""
    return str(cached_vae_identity(vae, vae_config or None)["hash"]) if vae else ""


def load_vae(path: str | os.PathLike, config: str | os.PathLike | None = None, device: str = "cpu") -> Vae:
    """A local AutoencoderKL: a diffusers folder, or one weights file plus `config` (its config.json).

    VaeError names the path and what to put there when it is missing or is not an AutoencoderKL.
    """
    identity = vae_identity(path, config)
    config_path, weights = resolve_vae_files(path, config)
    model = _build(_read_config(config_path, f"VAE {path}"), weights, str(path))
    return Vae(model.to(device).eval().requires_grad_(False), str(path), identity)


def _build(cfg: dict[str, Any], weights: Path, where: str):
    autoencoder = _autoencoder_class()
    try:
        model = autoencoder.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    except Exception as err:  # a config diffusers rejects
        raise VaeError(f"VAE {where}: config does not build an AutoencoderKL: {err}") from None
    state = _read_weights(weights, where)
    own = model.state_dict()
    if not set(state) & set(own):  # original LDM / SD checkpoint key names: diffusers converts them
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        try:
            state = convert_ldm_vae_checkpoint(state, dict(model.config))
        except Exception as err:
            raise VaeError(
                f"VAE {where}: {weights} holds no AutoencoderKL weights ({type(err).__name__}: {err}); {_WHAT_TO_PUT}"
            ) from None
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape of {wrong[:3]} differs from the config"
        raise VaeError(
            f"VAE {where}: {weights} does not match its config ({len(missing)} missing, {len(wrong)} "
            f"mis-shaped tensors: {detail}); {_WHAT_TO_PUT}"
        )
    model.load_state_dict({k: state[k] for k in own})
    return model


def _read_weights(weights: Path, where: str) -> dict[str, torch.Tensor]:
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(weights))
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:
        raise VaeError(
            f"VAE {where}: {weights} is not a readable weights file ({type(err).__name__}: "
            f"{str(err)[:200]}); {_WHAT_TO_PUT}"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VaeError(f"VAE {where}: {weights} is not a state dict of tensors; {_WHAT_TO_PUT}")
    return state


def check_latent_backbone(vae: Vae, in_channels: int, input_size: int, image_size: int, where: str) -> None:
    """A backbone that takes this VAE's latents of `image_size` images, else VaeError naming both."""
    shape = vae.latent_shape(image_size)
    if (in_channels, input_size, input_size) != shape:
        raise VaeError(
            f"{where}: the backbone takes {in_channels}x{input_size}x{input_size} inputs, the VAE "
            f"{vae.path} makes {shape[0]}x{shape[1]}x{shape[2]} latents of {image_size}x{image_size} "
            "images"
        )


def tiny_vae_config(latent_channels: int = 4) -> dict[str, Any]:
    """A randomly initialised, tiny AutoencoderKL config (downsample 2) for tests and benchmarks."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 4,
        "sample_size": 32,
        "scaling_factor": 0.5,
    }


def save_tiny_vae(folder: str | os.PathLike, latent_channels: int = 4, seed: int = 0) -> str:
    """Write a tiny random AutoencoderKL with `save_pretrained` (a diffusers folder); returns the folder."""
    autoencoder = _autoencoder_class()
    torch.manual_seed(seed)
    autoencoder(**tiny_vae_config(latent_channels)).save_pretrained(str(folder))
    return str(folder)
