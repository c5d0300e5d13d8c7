"""Shared fixtures. One local Ray cluster per test session (ray.init costs 2-6 s).

Helpers that tests call with arguments live in tests/support/ (by topic); test modules never import each other.
"""

from __future__ import annotations

import os

import pytest

# the shared helpers hold assertions (e.g. `check_full_run`): rewritten like a test module's, for the same messages
pytest.register_assert_rewrite("tests.support")

# Ray Train's controller polls every 2 s by default; every ray.train.report waits on it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Token auth is the product default; tests on a throwaway local cluster turn it off.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster with 2 CPUs, started and stopped by this test session."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # "local": always a new cluster, never one named by /tmp/ray/ray_current_cluster
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


class JoinedRay(BaseException):
    """Raised by `refuse_ray`: a BaseException, so no program's `except Exception` can swallow it."""


@pytest.fixture
def refuse_ray(monkeypatch):
    """Joining or starting Ray fails the test: for input that must be refused before any Ray resource.

    (`ray.is_initialized()` cannot tell: the session's `ray_local` cluster may already be up.)"""
    import importlib

    import ray

    def refuse(*_args, **_kwargs):
        raise JoinedRay("this input should have been refused before joining Ray")

    # Import every module first: one imported after the patch would bind `refuse` as its own connect_ray.
    names = (
        "diffscaler.cluster",
        "diffscaler.train.pretrain",
        "diffscaler.train.sweep",
        "diffscaler.train.finetune",
        "diffscaler.data.build",
        "diffscaler.data.encode",
        "diffscaler.data.cli",
    )
    modules = [importlib.import_module(name) for name in names]
    monkeypatch.setattr(ray, "init", refuse)
    for module in modules:
        monkeypatch.setattr(module, "connect_ray", refuse)


@pytest.fixture
def one_torch_thread():
    """torch on one thread (the fine-tune tests: the tiny model gains nothing from threads; on a busy 2-core
    machine they only contend). A module takes it with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def backbone_and_adapters(tmp_path):
    """A DiT-T/8 backbone, adapters a and b in a fine-tune-style folder (with the bank beside them)."""
    from diffscaler.adapters import AdapterBank, TaskInfo
    from diffscaler.artifacts import save_adapter, save_backbone
    from diffscaler.bank_file import save_bank
    from diffscaler.config import ModelConfig
    from diffscaler.models import build_model

    path = tmp_path / "b.safetensors"
    model = build_model(ModelConfig(name="DiT-T/8", input_size=16, num_classes=10), seed=0)
    digest = save_backbone(model, path)
    bank = AdapterBank.attach(model, [TaskInfo("a"), TaskInfo("b")], rank=2)
    files = [save_adapter(bank, t, tmp_path / "ad", backbone_hash=digest)[0] for t in ("a", "b")]
    save_bank(files, tmp_path / "ad")
    return path, tmp_path / "ad"
