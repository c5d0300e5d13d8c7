"""`FidWorker`, the Ray actor of the FID pool: it holds the backbone and the feature network, samples
chunks of a request and extracts their features. Sample k of a request always has seed index k and label
k % num_classes, so its features do not depend on which actor drew it or how the request was split.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import numpy as np

from diffscaler.artifacts import load_adapters, load_backbone
from diffscaler.config import config_from_json
from diffscaler.data.conditions import maps_to_unit, spec_from_record
from diffscaler.diffusion.gaussian import GaussianDiffusion
from diffscaler.diffusion.sampling import sample_images
from diffscaler.eval.fidelity import condition_fidelity
from diffscaler.vae import load_vae


class FidWorker:
    """Holds the backbone and the feature network; samples chunks and extracts features."""

    def __init__(self, backbone_path: str, cfg_dict: dict[str, Any]):
        import torch

        from diffscaler.eval.features import build_feature_extractor

        cfg = config_from_json(cfg_dict)
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.eval.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.eval.cpus_per_actor)))  # Ray's CPU share, not the whole node
        model, meta = load_backbone(backbone_path)
        self.backbone = model.to(self.device).eval()
        self.backbone_hash = meta["content_hash"]
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion, learn_sigma=self.backbone.config.learn_sigma)
        self.extractor = build_feature_extractor(cfg.eval.feature_network, cfg.eval.feature_weights_path, self.device)
        self.vae = None  # a latent backbone's samples are decoded here, next to the feature network
        if self.backbone.config.in_channels != 3:
            self.vae = load_vae(cfg.data.vae, cfg.data.vae_config or None, device=str(self.device))
        self._adapted: tuple[str, Any] | None = None  # (adapter key, model) of the last adapter used

    def pid(self) -> int:
        return os.getpid()

    def _model_for(self, adapter_path: str | None, task_model: bool = False):
        if not adapter_path:
            return self.backbone
        st = os.stat(adapter_path)
        key = f"{os.path.abspath(adapter_path)}|{st.st_size}|{st.st_mtime_ns}"
        if self._adapted is None or self._adapted[0] != key:
            self._adapted = None  # free the previous copy first
            if task_model:  # a whole model of its own (scratch): no backbone underneath
                model, _meta = load_backbone(adapter_path)
            else:
                model = copy.deepcopy(self.backbone)
                load_adapters(model, [adapter_path], self.backbone_hash)
            self._adapted = (key, model.to(self.device).eval())
        return self._adapted[1]

    def sample_features(self, job: dict[str, Any]) -> dict[str, Any]:
        """Samples [start, start + count) of one request -> features (count, D) float32."""
        import torch

        from diffscaler.eval.features import extract_features

        t0 = time.perf_counter()
        task_model = bool(job.get("task_model"))
        model = self._model_for(job["adapter_path"], task_model)
        start, count, num_classes = job["start"], job["count"], job["num_classes"]
        labels = [(start + k) % num_classes for k in range(count)]  # by global index: split-independent
        task_ids = [0] * count if job["adapter_path"] and not task_model else None  # task 0 of its bank
        autocast = torch.bfloat16 if self.device.type == "cuda" else None
        extra: dict[str, Any] = {}
        maps = job.get("maps")  # uint8 (count, C_cond, S, S): this chunk's maps (conditioned or not)
        if maps is not None:
            extra = dict(
                conditions=torch.from_numpy(maps_to_unit(maps)),  # (count, C_cond, S, S) in [-1, 1]
                condition_mask=torch.full((count,), bool(job["conditioned"])),  # False: sampled without
                condition_scale=job["condition_scale"],
            )
        images = sample_images(
            model,
            self.diffusion,
            num=count,
            seed=job["seed"],
            labels=labels,
            task_ids=task_ids,
            start_index=start,
            batch_size=self.cfg.eval.batch_size,
            steps=job["steps"],
            sampler=job["sampler"],
            cfg_scale=job["cfg_scale"],
            eta=self.cfg.diffusion.ddim_eta,
            autocast_dtype=autocast,
            decode=self.vae.decode if self.vae is not None else None,
            **extra,
        )  # (count, H, W, C) uint8 (decoded through data.vae for a latent backbone)
        t1 = time.perf_counter()
        feats = extract_features(self.extractor, images, self.cfg.eval.batch_size)  # (count, D)
        t2 = time.perf_counter()
        fidelity = None
        if maps is not None and job.get("condition_extractor"):
            score = condition_fidelity(spec_from_record(job["condition_extractor"]), images, maps)
            fidelity = None if score is None else list(score.per_image)  # per image, in sample order
        return {
            "features": feats,
            "sample_seconds": t1 - t0,
            "feature_seconds": t2 - t1,
            "pid": os.getpid(),
            "fidelity": fidelity,
        }

    def image_features(self, images: np.ndarray) -> dict[str, Any]:
        """Reference images uint8 (N, H, W, 3) -> features (N, D) float32."""
        from diffscaler.eval.features import extract_features

        t0 = time.perf_counter()
        feats = extract_features(self.extractor, images, self.cfg.eval.batch_size)
        return {"features": feats, "feature_seconds": time.perf_counter() - t0, "pid": os.getpid()}
