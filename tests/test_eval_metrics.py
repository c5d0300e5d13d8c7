"""FID/KID building blocks without Ray: the torchvision shim, feature networks, metrics, reference cache.

.venv/bin/python -m pytest tests/test_eval_metrics.py -q
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.evaluation import direct_fid, make_dataset, tiny_config

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# torchvision shim
# ------------------------------------------------------------------------------------------------


def test_torchvision_shim_makes_torch_fidelity_importable():
    from diffscaler.eval.torchvision_compat import import_torch_fidelity, workaround_status

    tf = import_torch_fidelity()
    assert hasattr(tf, "register_feature_extractor")
    import torchvision.transforms  # noqa: F401

    status = workaround_status()
    stub = sys.modules.get("torchvision._meta_registrations")
    # The empty module is there only when the compiled ops could not be loaded, and then nms is absent.
    if status["stubbed"]:
        assert stub is not None and not hasattr(stub, "register_meta")
        with pytest.raises((AttributeError, RuntimeError)):
            torch.ops.torchvision.nms  # noqa: B018
    else:  # the compiled ops loaded: no empty stub, and the ops are real (fails if the check lied)
        assert stub is None or hasattr(stub, "register_meta")
        assert callable(torch.ops.torchvision.nms)
    assert status["checked"] and status["reason"]  # the decision was made, and says why


def test_every_torch_fidelity_import_goes_through_the_shim():
    pattern = re.compile(r"^\s*(import torch_fidelity|from torch_fidelity)", re.M)
    offenders = []
    for folder in ("diffscaler", "ray_jobs", "bench", "tune"):
        for path in (REPO / folder).rglob("*.py") if (REPO / folder).is_dir() else []:
            text = path.read_text()
            first = pattern.search(text)
            if first is None or path.name == "torchvision_compat.py":
                continue
            shim = text.find("import_torch_fidelity()")
            if shim < 0 or shim > first.start():
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == [], f"import torch_fidelity only after import_torch_fidelity(): {offenders}"


# ------------------------------------------------------------------------------------------------
# Feature networks
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet():
    from diffscaler.eval.features import build_feature_extractor

    return build_feature_extractor("efficientnet-lite0")


def test_efficientnet_is_a_registered_torch_fidelity_extractor(effnet):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from diffscaler.eval.features import FeatureExtractorEfficientNetLite0, extract_features

    assert FEATURE_EXTRACTORS_REGISTRY["efficientnet-lite0"] is FeatureExtractorEfficientNetLite0
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    f = extract_features(effnet, images, batch_size=4)
    assert f.shape == (6, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    # Batch composition does not change a sample's features; different images differ.
    np.testing.assert_allclose(extract_features(effnet, images[3:4], batch_size=1)[0], f[3], rtol=1e-4, atol=1e-5)
    assert np.abs(f[0] - f[1]).max() > 1e-3
    grey = extract_features(effnet, images[:2, :, :, :1], batch_size=2)  # (N, H, W, 1) repeats to RGB
    rgb = extract_features(effnet, np.repeat(images[:2, :, :, :1], 3, axis=-1), batch_size=2)
    np.testing.assert_allclose(grey, rgb, rtol=1e-5, atol=1e-6)


def test_our_metrics_equal_torch_fidelity_calculate_metrics(effnet):
    """The pool's path (features -> torch-fidelity's statistics and metric functions) gives exactly what
    torch_fidelity.calculate_metrics gives on the same images with the registered extractor."""
    import torch_fidelity

    from diffscaler.eval.features import UInt8ImageDataset, extract_features
    from diffscaler.eval.stats import feature_statistics, frechet_distance, kid_from_features

    rng = np.random.RandomState(1)
    a = rng.randint(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.randint(-60, 60, a.shape), 0, 255).astype(np.uint8)
    ref = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(a),
        input2=UInt8ImageDataset(b),
        fid=True,
        kid=True,
        kid_subset_size=4,
        feature_extractor="efficientnet-lite0",
        cuda=False,
        verbose=False,
        save_cpu_ram=True,
        batch_size=8,
    )
    fa, fb = extract_features(effnet, a, 8), extract_features(effnet, b, 8)
    fid = frechet_distance(feature_statistics(fa), feature_statistics(fb))
    kid_mean, _std = kid_from_features(fa, fb, subset_size=4)
    assert fid == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert kid_mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-3, abs=1e-6)
    assert fid > 0.1


def _inception_weights(path: Path) -> Path:
    """A randomly initialised state dict of torch-fidelity's Inception (the real file is not reachable
    offline; any file of the right shapes exercises the user-provided-weights path)."""
    import io

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Probe(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random init
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    probe = _Probe("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    torch.save({k: v.clone() for k, v in probe.state_dict().items()}, path)
    return path


def test_inception_runs_from_a_user_weights_file(tmp_path):
    from diffscaler.eval.features import build_feature_extractor, extract_features

    weights = _inception_weights(tmp_path / "inception.pth")
    net = build_feature_extractor("inception-v3-compat", str(weights))
    f = extract_features(net, np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3), dtype=np.uint8), 2)
    assert f.shape == (2, 2048) and np.isfinite(f).all()


def test_missing_or_bad_weights_file_names_the_file(tmp_path):
    from diffscaler.eval.features import FeatureWeightsError, build_feature_extractor
    from diffscaler.eval.stats import reference_stats

    missing = tmp_path / "nowhere" / "weights-inception.pth"
    with pytest.raises(FeatureWeightsError, match=re.escape(str(missing))):
        build_feature_extractor("inception-v3-compat", str(missing))
    with pytest.raises(FeatureWeightsError, match="inception-v3-compat needs its weights file"):
        build_feature_extractor("inception-v3-compat", "")
    cfg = tiny_config(tmp_path, "eval.feature_network=inception-v3-compat", f"eval.feature_weights_path={missing}")
    make_dataset(tmp_path / "src" / "dots", tmp_path / "shards" / "dots", n=8)
    with pytest.raises(FeatureWeightsError, match=re.escape(str(missing))):
        reference_stats(str(tmp_path / "shards" / "dots"), cfg)
    # A pickle holding more than tensors is refused by the weights_only load, naming the file.
    bad = tmp_path / "bad.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, bad)
    with pytest.raises(FeatureWeightsError, match=re.escape(str(bad))):
        build_feature_extractor("efficientnet-lite0", str(bad))


# ------------------------------------------------------------------------------------------------
# Metrics on features
# ------------------------------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_and_the_formula():
    from diffscaler.eval.stats import feature_statistics, frechet_distance

    rng = np.random.RandomState(0)
    a = rng.randn(200, 24) @ rng.randn(24, 24)
    b = rng.randn(150, 24) @ rng.randn(24, 24) + 0.3
    fid = frechet_distance(feature_statistics(a), feature_statistics(b))
    assert fid == pytest.approx(direct_fid(a, b), rel=1e-6)
    # Identical sets score ~0.
    scale = np.trace(np.cov(a, rowvar=False))
    assert abs(frechet_distance(feature_statistics(a), feature_statistics(a))) < 1e-6 * scale
    # A set shifted by delta has the same covariance: FID = ||delta||^2 exactly.
    delta = rng.randn(24) * 0.7
    shifted = frechet_distance(feature_statistics(a), feature_statistics(a + delta))
    assert shifted == pytest.approx(float(delta @ delta), rel=1e-6)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    """The realistic case here (16-256 images, 1280-d features): rank-deficient covariances."""
    from diffscaler.eval.stats import feature_statistics, frechet_distance

    rng = np.random.RandomState(3)
    a, b = rng.rand(20, 300), rng.rand(30, 300) * 1.2
    assert frechet_distance(feature_statistics(a), feature_statistics(b)) == pytest.approx(direct_fid(a, b), rel=1e-5)
    delta = np.full(300, 0.1)
    assert frechet_distance(feature_statistics(a), feature_statistics(a + delta)) == pytest.approx(3.0, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Reference statistics and their cache
# ------------------------------------------------------------------------------------------------


def test_reference_stats_are_cached_and_keyed_by_the_dataset_content(tmp_path, effnet):
    from diffscaler.data.index import load_index
    from diffscaler.eval.features import extract_features
    from diffscaler.eval.stats import plan_reference, reference_stats

    cfg = tiny_config(tmp_path)
    shards = make_dataset(tmp_path / "src" / "dots", tmp_path / "shards" / "dots", n=16, seed=0)
    first = reference_stats(shards, cfg, num_reference=6)
    assert first.num_reference == 6 and first.features.shape == (6, 1280)
    assert first.feature_network == "efficientnet-lite0" and first.image_size == 32
    cache = Path(first.cache_path)
    assert cache.is_file() and cache.suffix == ".safetensors" and "n6" in cache.name
    # The features are those of the first 6 eval images.
    from diffscaler.data.reader import read_split

    images, _ = read_split(shards, "eval", limit=6)
    np.testing.assert_allclose(first.features, extract_features(effnet, images, 16), rtol=1e-4, atol=1e-5)

    # Second call: loaded from the cache (same file, untouched), same statistics.
    mtime = cache.stat().st_mtime_ns
    again = reference_stats(shards, cfg, num_reference=6)
    assert again.cache_path == first.cache_path and cache.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.mu, first.mu)

    # The key stored inside the file names what the statistics were computed from.
    from safetensors import safe_open

    with safe_open(str(cache), "np") as f:
        stored = json.loads(f.metadata()["key"])
    assert stored["dataset_hash"] == first.dataset_hash and stored["num_reference"] == 6
    assert stored["feature_network"] == "efficientnet-lite0" and stored["weights_hash"].startswith("sha256:")

    # Rebuilding the dataset with other images changes its content hash: new cache entry, new numbers.
    import shutil

    shutil.rmtree(tmp_path / "src" / "dots")
    make_dataset(tmp_path / "src" / "dots", tmp_path / "shards" / "dots", n=16, seed=9)
    changed = reference_stats(shards, cfg, num_reference=6)
    assert changed.dataset_hash != first.dataset_hash
    assert changed.cache_path != first.cache_path
    assert np.abs(changed.mu - first.mu).max() > 1e-4

    # eval.num_reference is a cap: a smaller eval split gives all its images (issue 27 item 5).
    available = load_index(shards).num_samples("eval")
    assert plan_reference(shards, cfg, num_reference=50).num_reference == available
    assert reference_stats(shards, cfg, num_reference=50).num_reference == available


def test_reference_of_a_folder_that_is_not_a_dataset(tmp_path):
    from diffscaler.eval.stats import EvalInputError, reference_stats

    cfg = tiny_config(tmp_path)
    with pytest.raises(EvalInputError, match="index.json"):
        reference_stats(str(tmp_path / "no_such_dataset"), cfg)


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


def _result(task, label, fid, status="ok", error=""):
    from diffscaler.eval import EvalResult

    return EvalResult(
        task=task,
        adapter=f"{task}.safetensors" if task else "",
        label=label,
        status=status,
        error=error,
        fid=fid,
        kid_mean=None if fid is None else 0.01,
        kid_std=None if fid is None else 0.001,
        feature_network="efficientnet-lite0",
        num_generated=16,
        num_reference=20,
        seconds=1.5,
        sample_seconds=1.0,
        feature_seconds=0.4,
        seed=0,
        steps=3,
        sampler="ddim",
        cfg_scale=1.0,
        dataset="shards/x",
        dataset_hash="h",
        image_size=32,
        method="affiner" if task else "",
        rank=4 if task else 0,
        features=np.zeros((16, 4)),
    )


def test_fid_json_and_table_name_network_counts_and_failures(tmp_path):
    from diffscaler.eval import format_table, write_fid_json

    results = [
        _result("emoji", "affiner", 12.5),
        _result("emoji", "lora", 14.0),
        _result("icons", "affiner", None, "failed", "failed 2 times: actor died (ActorDiedError: killed)"),
        _result(None, "", 30.0),
    ]
    out = tmp_path / "eval" / "fid.json"
    write_fid_json(results, out, extra={"backbone": "bb.safetensors"})
    doc = json.loads(out.read_text())
    assert sorted(doc["by_task"]) == ["(backbone)", "affiner/emoji", "icons", "lora/emoji"]
    assert doc["by_task"]["icons"]["fid"] is None and doc["by_task"]["icons"]["status"] == "failed"
    assert all(r["feature_network"] == "efficientnet-lite0" and r["num_generated"] == 16 for r in doc["results"])
    assert "features" not in doc["results"][0] and doc["backbone"] == "bb.safetensors"
    assert not list(out.parent.glob("*.tmp"))
    table = format_table(results)
    assert "efficientnet-lite0" in table and "FAILED: failed 2 times" in table and "(backbone)" in table
    assert re.search(r"emoji\s+affiner\s+affiner\s+4\s+12\.500", table)


def test_targets_built_from_the_same_images_are_one_task_accuracy_class():
    """The demo's emoji-mask scored 0.00 task accuracy, its real images included: its centroid and emoji's were
    the same images, so every image went to whichever came first."""
    from diffscaler.config import load_config
    from diffscaler.eval.requests import accuracy_classes

    targets = (
        "data.targets=[{name: emoji}, {name: tiles}, {name: emoji-mask, source: emoji, condition: mask},"
        " {name: icons-edges, source: icons, condition: canny}]"
    )
    class_of, first = accuracy_classes(load_config(None, [targets]))
    assert class_of == {"emoji": 0, "tiles": 1, "emoji-mask": 0, "icons-edges": 2}
    assert first == ["emoji", "tiles", "icons-edges"]
