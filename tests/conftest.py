"""Shared fixtures. One local Ray cluster per test session (ray.init costs 2-6 s)."""

from __future__ import annotations

import os

import pytest

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
    names = ("diffscaler.cluster", "diffscaler.train.pretrain", "diffscaler.train.sweep", "diffscaler.train.finetune")
    modules = [importlib.import_module(name) for name in names]
    monkeypatch.setattr(ray, "init", refuse)
    for module in modules:
        monkeypatch.setattr(module, "connect_ray", refuse)
