"""The FID actor pool on a real local Ray cluster: correctness, determinism, dead actors, bad input, CLI.

    .venv/bin/python -m pytest tests/test_eval_pool.py -q

One pool (2 actors x 0.5 CPU) is shared by the module; a tiny DiT-T/8 at 32 px, 16 samples per request,
3 sampler steps, EfficientNet-Lite0 features. Actors are killed with SIGKILL (as the OOM killer would):
a new actor replaces each and the chunk runs again; the scores are those of the undisturbed run, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.support.evaluation import direct_fid, make_adapter, make_backbone, setup_project

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return setup_project(tmp_path_factory.mktemp("eval_pool"))


@pytest.fixture(scope="module")
def pool(ray_local, project):
    from diffscaler.eval import FidEvaluator

    ev = FidEvaluator(project["backbone"], project["cfg"], num_actors=2)
    yield ev
    ev.shutdown()


@pytest.fixture(scope="module")
def baseline(pool, project):
    """One undisturbed evaluation: the adapter on `dots` and the bare backbone on the pretraining set."""
    from diffscaler.eval import request_for_task

    cfg = project["cfg"]
    requests = [request_for_task(cfg, "dots", project["adapter"], label="affiner"), request_for_task(cfg, None)]
    return pool.evaluate(requests, return_features=True)


def test_pool_scores_equal_a_direct_scipy_computation(pool, project, baseline):
    adapted, bare = baseline
    for result in baseline:
        assert result.status == "ok", result.error
        assert result.feature_network == "efficientnet-lite0"
        assert result.num_generated == 16 and result.features.shape == (16, 1280)
        assert result.kid_mean is not None and result.kid_std is not None and result.kid_std >= 0
        assert result.fid > 1.0
    ref = pool.reference(adapted.dataset)  # from the cache now
    assert adapted.num_reference == ref.num_reference == len(ref.features) >= 10
    assert adapted.fid == pytest.approx(direct_fid(adapted.features, ref.features), rel=1e-5)
    assert adapted.task == "dots" and adapted.method == "affiner" and adapted.rank == 4
    assert bare.task is None and bare.adapter == "" and bare.dataset != adapted.dataset and bare.fid != adapted.fid
    d = adapted.to_dict()
    assert "features" not in d and json.loads(json.dumps(d))["fid"] == adapted.fid


def test_same_seeds_same_score_on_one_or_two_actors(ray_local, project, baseline):
    from diffscaler.eval import FidEvaluator, request_for_task

    cfg = project["cfg"]
    with FidEvaluator(project["backbone"], cfg, num_actors=1) as single:
        (one,) = single.evaluate([request_for_task(cfg, "dots", project["adapter"])], return_features=True)
    two = baseline[0]
    assert one.status == "ok"
    # Chunks differ (1 chunk of 16 vs 2 of 8) yet every sample has the same seed and label.
    np.testing.assert_allclose(one.features, two.features, rtol=1e-4, atol=1e-4)
    assert one.fid == pytest.approx(two.fid, rel=1e-4)


def test_killed_actor_is_replaced_and_its_chunk_retried(pool, project, baseline):
    from diffscaler.eval import request_for_task

    events = []
    replaced_before = pool.actors_replaced

    def kill_second_submission(event):
        events.append(event)
        submitted = [e for e in events if e["event"] == "submitted"]
        if event["event"] == "submitted" and len(submitted) == 2:
            os.kill(pool.actor_pid(event["slot"]), signal.SIGKILL)  # dies mid-evaluation, like an OOM kill

    cfg = project["cfg"]
    (result,) = pool.evaluate([request_for_task(cfg, "dots", project["adapter"])], progress=kill_second_submission)
    assert result.status == "ok", result.error
    assert [e["event"] for e in events].count("retry") == 1
    assert pool.actors_replaced == replaced_before + 1
    # the retried chunk gave the same samples: the scores of the undisturbed run, bit for bit
    assert (result.fid, result.kid_mean, result.kid_std) == (baseline[0].fid, baseline[0].kid_mean, baseline[0].kid_std)
    assert len(set(pool.actor_pids())) == 2  # the pool is whole again


def test_request_failing_twice_is_reported_failed_and_the_rest_completes(pool, project, baseline):
    from diffscaler.eval import request_for_task

    cfg = project["cfg"]
    requests = [
        request_for_task(cfg, "dots", project["adapter"], label="good"),
        request_for_task(cfg, "dots", project["adapter"], label="doomed", seed=7),
    ]

    def kill_doomed(event):
        if event["event"] == "submitted" and event["kind"] == "sample" and event["owner"] == 1:
            os.kill(pool.actor_pid(event["slot"]), signal.SIGKILL)

    good, doomed = pool.evaluate(requests, progress=kill_doomed)
    assert good.status == "ok" and good.fid == pytest.approx(baseline[0].fid, rel=1e-4)
    assert doomed.status == "failed" and doomed.fid is None
    assert "failed 2 times" in doomed.error and "actor died" in doomed.error
    assert doomed.feature_network == "efficientnet-lite0" and doomed.label == "doomed"


def test_an_actor_that_cannot_start_fails_its_request_after_bounded_tries_naming_the_cause(
    ray_local, project, tmp_path
):
    """A replacement lost before it started (on a spot node: scheduled on a node already gone) does not spend the
    chunk's retry; but one that can never start (here: its backbone file was removed) still ends the request,
    after MAX_UNSTARTED such losses plus the retry, with the constructor's error."""
    import shutil

    from diffscaler.eval import FidEvaluator, request_for_task
    from diffscaler.eval.pool import MAX_UNSTARTED

    shutil.copytree(Path(project["backbone"]).parent, tmp_path / "run")  # the weights and backbone.json beside
    backbone = tmp_path / "run" / Path(project["backbone"]).name
    events = []
    cfg = project["cfg"]
    with FidEvaluator(str(backbone), cfg, num_actors=1) as ev:
        ev.actor_pids()  # started: the kill below is a counted attempt

        def remove_backbone_and_kill(event):
            events.append(event)
            if event["event"] == "submitted" and len(events) == 1:
                backbone.unlink()
                os.kill(ev.actor_pid(event["slot"]), signal.SIGKILL)

        (result,) = ev.evaluate([request_for_task(cfg, "dots", project["adapter"])], progress=remove_backbone_and_kill)
        replaced = ev.actors_replaced
    assert result.status == "failed" and "failed 2 times" in result.error
    assert "backbone.safetensors" in result.error.split(" | ")[-1], result.error  # the constructor's error
    unstarted = [e for e in events if e["event"] == "retry" and "had not started" in e["reason"]]
    assert len(unstarted) == MAX_UNSTARTED and all(e["attempt"] == 2 for e in unstarted)
    assert replaced == 1 + MAX_UNSTARTED + 1


def test_bad_input_is_refused_before_any_work(pool, project, tmp_path):
    from diffscaler.config import load_config
    from diffscaler.eval import EvalInputError, EvalRequest, FidEvaluator, request_for_task

    cfg = project["cfg"]
    ghost = project["ghost"]
    # An adapter whose task is not in the config (so there are no shards to score it on).
    with pytest.raises(EvalInputError, match=rf"{re.escape(ghost)}.*'ghost'.*not in data.targets"):
        pool.evaluate([EvalRequest(task=None, adapter_path=ghost)])
    with pytest.raises(EvalInputError, match="task 'ghost' is not in data.targets"):
        request_for_task(cfg, "ghost", ghost)
    # An adapter trained on another backbone.
    other = tmp_path / "other" / "backbone.safetensors"
    make_backbone(cfg, other, seed=1)
    foreign = make_adapter(cfg, other, "dots", tmp_path / "foreign")
    with pytest.raises(EvalInputError, match=r"trained on backbone"):
        pool.evaluate([request_for_task(cfg, "dots", str(foreign))])
    # Missing files name themselves.
    with pytest.raises(EvalInputError, match="adapter file not found: .*nope.safetensors"):
        pool.evaluate([request_for_task(cfg, "dots", str(tmp_path / "nope.safetensors"))])
    with pytest.raises(EvalInputError, match="backbone file not found: .*missing.safetensors"):
        FidEvaluator(str(tmp_path / "missing.safetensors"), cfg)
    weights = tmp_path / "w" / "inception.pth"
    inception = load_config(None, ["eval.feature_network=inception-v3-compat", f"eval.feature_weights_path={weights}"])
    with pytest.raises(EvalInputError, match=re.escape(str(weights))):
        FidEvaluator(project["backbone"], inception)


def test_evaluate_program_writes_fid_json(ray_local, project, tmp_path, capsys):
    from ray_jobs import evaluate as program

    cfg = project["cfg"]
    config_file = tmp_path / "cfg.json"
    cfg.save_json(config_file)
    adapters = Path(project["adapter"]).parent
    out = tmp_path / "out"
    code = program.main(
        [
            "--config",
            str(config_file),
            "--backbone",
            project["backbone"],
            "--adapters",
            str(adapters),
            "--out",
            str(out),
            "eval.num_actors=1",
        ]
    )
    assert code == 0
    doc = json.loads((out / "fid.json").read_text())
    dots = doc["by_task"]["dots"]
    assert dots["status"] == "ok" and dots["feature_network"] == "efficientnet-lite0"
    assert dots["num_generated"] == 16 and dots["num_reference"] >= 10 and dots["seconds"] > 0
    assert isinstance(dots["fid"], float) and isinstance(dots["kid_mean"], float)
    printed = capsys.readouterr().out
    assert "efficientnet-lite0" in printed and re.search(r"dots\s", printed)
