"""Parallel adapter fine-tunes on a local Ray cluster: files, bank equivalence, failure isolation, reruns.

A tiny DiT-T/4 backbone (16 px) and tiny shard sets built from synthetic PNG folders with the data
package; every fine-tune is a real Ray task reading real tar shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffscaler.artifacts import load_adapters, load_backbone, read_adapter_file
from diffscaler.bank_file import load_bank
from diffscaler.config import ConfigError
from diffscaler.train.finetune import (
    FinetuneInputError,
    fingerprint,
    format_table,
    plan_finetunes,
    run_finetunes,
)
from diffscaler.train.finetune_loop import AdapterRun, AdapterRunSpec, lr_factor
from tests.support.finetune import IMAGE_SIZE, TWO_TASKS, make_work, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("finetune"))


def _outputs(model, task_ids, y=(1, 0, 0, 0)) -> torch.Tensor:
    """Model output for 4 fixed inputs; by default sample 0 uses class 1 of the conditional task "ta"."""
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))  # (4, 3, H, W)
    t = torch.tensor([10, 300, 600, 900])
    y = torch.tensor(y)
    model.eval()
    with torch.no_grad():
        return model(x, t, y, task_ids)


# ------------------------------------------------------------------------------------------------
# Without Ray
# ------------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error_before_anything_runs(work):
    out = work.root / "bad"
    cfg = tiny_config(work.shards, "[{name: ta}, {name: missing}]")
    with pytest.raises(FinetuneInputError, match=r"task 'missing': no shards at .*missing.*shards make"):
        plan_finetunes(cfg, work.backbone, out)
    cfg = tiny_config(work.shards, TWO_TASKS, "adapter.rank=500")
    with pytest.raises(FinetuneInputError, match=r"rank 500 is larger than the layer width 192 of DiT-T/4"):
        plan_finetunes(cfg, work.backbone, out)
    # bitfit has no rank-r branch: the same rank is fine there
    assert plan_finetunes(
        tiny_config(work.shards, TWO_TASKS, "adapter.rank=500", "finetune.methods=[bitfit]"), work.backbone, out
    ).jobs
    with pytest.raises(FinetuneInputError, match=r"backbone file not found: .*nope.safetensors"):
        plan_finetunes(tiny_config(work.shards, TWO_TASKS), work.root / "nope.safetensors", out)
    with pytest.raises(FinetuneInputError, match=r"batch_size 1 is smaller than the 2 tasks"):
        plan_finetunes(
            tiny_config(work.shards, TWO_TASKS, "finetune.mixed=true", "finetune.batch_size=1"), work.backbone, out
        )
    with pytest.raises(FinetuneInputError, match=r"task 'ta': 18 train images at .*, fewer than the 64 one batch"):
        plan_finetunes(tiny_config(work.shards, TWO_TASKS, "finetune.batch_size=64"), work.backbone, out)
    with pytest.raises(ConfigError, match=r"finetune.methods: 'dora' is not one of"):
        tiny_config(work.shards, TWO_TASKS, "finetune.methods=[dora]")
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resumed_run_continues_exactly(work, tmp_path, schedule):
    cfg = tiny_config(work.shards, TWO_TASKS, f"finetune.lr_schedule={schedule}")
    (task,) = plan_finetunes(cfg, work.backbone, tmp_path, force=True).jobs[0].spec.tasks
    spec = AdapterRunSpec((task,), "affiner", 4, 0.01, 4, str(work.backbone), cfg.to_dict(), str(tmp_path / "a.jsonl"))
    straight = AdapterRun(spec)
    straight.train_until(4)
    first = AdapterRun(spec)
    first.train_until(2)
    first.save_state(tmp_path / "state")
    resumed = AdapterRun(spec)
    resumed.load_state(tmp_path / "state")
    resumed.train_until(4)
    for a, b in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(a, b)
    assert resumed.last_window_loss == straight.last_window_loss
    assert any(not torch.equal(p, q) for p, q in zip(straight.params, AdapterRun(spec).params, strict=True))
    assert straight.scheduler.get_last_lr()[0] == (0.0 if schedule == "cosine" else 0.01)  # cosine: 0 at the end
    val = straight.validation_loss()
    assert val == straight.validation_loss() and 0 < val["ta"] < 10  # fixed timesteps and noise: repeatable


def test_a_cosine_schedule_warms_up_decays_to_zero_and_is_a_new_adapter(work, tmp_path):
    factors = [lr_factor(k, warmup=2, steps=6, schedule="cosine") for k in range(6)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] == 0.0
    assert all(a > b for a, b in zip(factors[1:], factors[2:], strict=False))  # falls every step after the warm-up
    assert [lr_factor(k, warmup=2, steps=6, schedule="constant") for k in range(6)] == [0.5, 1, 1, 1, 1, 1]
    cosine = tiny_config(work.shards, TWO_TASKS, "finetune.lr_schedule=cosine")
    (task,) = plan_finetunes(cosine, work.backbone, tmp_path, force=True).jobs[0].spec.tasks
    constant = tiny_config(work.shards, TWO_TASKS)
    assert fingerprint(cosine, "affiner", 4, (task,), "h") != fingerprint(constant, "affiner", 4, (task,), "h")
    with pytest.raises(ConfigError, match=r"finetune.lr_schedule: 'linear' is not one of \['constant', 'cosine'\]"):
        tiny_config(work.shards, TWO_TASKS, "finetune.lr_schedule=linear")


def test_compiled_blocks_train_like_eager(work, tmp_path):
    import torch._dynamo

    def trained(compile_setting: str) -> AdapterRun:
        cfg = tiny_config(work.shards, TWO_TASKS, f"finetune.compile={compile_setting}")
        (task,) = plan_finetunes(cfg, work.backbone, tmp_path / compile_setting, force=True).jobs[0].spec.tasks
        spec = AdapterRunSpec(
            (task,),
            "affiner",
            4,
            0.01,
            2,
            str(work.backbone),
            cfg.to_dict(),
            str(tmp_path / f"{compile_setting}.jsonl"),
        )
        run = AdapterRun(spec)
        run.train_until(2)
        return run

    eager = trained("off")
    assert eager.compile_backend is None  # "auto" on the CPU too
    torch._dynamo.reset()
    try:
        compiled = trained("aot_eager")  # traces forward and backward as inductor would, without codegen
        assert compiled.compile_backend == "aot_eager"
        for a, b in zip(eager.params, compiled.params, strict=True):  # two AdamW steps of 0.01: to 0.1 % of one
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        assert compiled.last_window_loss == pytest.approx(eager.last_window_loss, rel=1e-5)
    finally:
        torch._dynamo.reset()
    with pytest.raises(ConfigError, match=r"finetune.compile: 'fast' is not one of"):
        tiny_config(work.shards, TWO_TASKS, "finetune.compile=fast")


# ------------------------------------------------------------------------------------------------
# On Ray
# ------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_two_datasets_in_parallel_give_a_bank_that_reproduces_each_task(ray_local, work):
    out = work.root / "adapters"
    cfg = tiny_config(work.shards, TWO_TASKS)
    said: list[str] = []
    summary = run_finetunes(cfg, work.backbone, out, log=said.append)
    table = format_table(summary)
    print("\n".join(said), table, sep="\n")
    assert [(r.task, r.method, r.status) for r in summary.rows] == [("ta", "affiner", "ok"), ("tb", "affiner", "ok")]
    for r in summary.rows:
        assert r.steps == 4 and 0 < r.final_loss < 10 and r.wall_s > 0
        assert 0 < r.trainable_params < r.backbone_params and 0 < r.trainable_pct < 100
        lines = [json.loads(x) for x in Path(r.log).read_text().splitlines()]
        assert [x["step"] for x in lines if x["kind"] == "train"] == [2, 4]
        assert lines[-1]["kind"] == "val"
    assert "trainable params" in table and "% of backbone" in table and "final loss" in table
    # Both handed to Ray before the first result came back: running them side by side is then Ray's scheduling.
    # (Comparing their start and end times was flaky: a 1-s fine-tune can finish before a cold worker starts.)
    submitted = next(i for i, line in enumerate(said) if "2 run(s) submitted" in line)
    assert all(" ok, " not in line for line in said[:submitted]), said
    ta_meta, _ = read_adapter_file(out / "ta.safetensors")
    assert ta_meta["conditional"] and ta_meta["num_classes"] == 2 and ta_meta["backbone_hash"] == work.hash
    assert json.loads((out / "summary.json").read_text())["rows"][1]["task"] == "tb"

    files = [out / "ta.safetensors", out / "tb.safetensors"]
    both, _ = load_backbone(work.backbone)
    load_adapters(both, files, work.hash)
    mixed = _outputs(both, torch.tensor([0, 1, 0, 1]))  # one batch, two tasks
    bank_model, _ = load_backbone(work.backbone)
    load_bank(bank_model, out / "bank.json", work.hash)
    assert torch.equal(_outputs(bank_model, torch.tensor([0, 1, 0, 1])), mixed)
    for i, f in enumerate(files):
        single, _ = load_backbone(work.backbone)
        load_adapters(single, [f], work.hash)
        alone = _outputs(single, 0, y=(1, 0, 0, 0) if i == 0 else (0, 0, 0, 0))  # the single-task fast path
        rows = [k for k in range(4) if k % 2 == i]
        torch.testing.assert_close(mixed[rows], alone[rows], rtol=1e-5, atol=1e-5)
    untrained, _ = load_backbone(work.backbone)
    from diffscaler.adapters import AdapterBank, TaskInfo

    AdapterBank.attach(untrained, [TaskInfo("ta", 2, True), TaskInfo("tb")], rank=8)
    assert not torch.allclose(_outputs(untrained, torch.tensor([0, 1, 0, 1])), mixed, atol=1e-4)  # it trained

    # A rerun finds both adapters current (same backbone, same fingerprint) and trains nothing.
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = run_finetunes(cfg, work.backbone, out, log=print)
    assert [r.status for r in again.rows] == ["reused", "reused"]
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    changed = run_finetunes(tiny_config(work.shards, TWO_TASKS, "finetune.steps=2"), work.backbone, out, log=print)
    assert [(r.status, r.steps) for r in changed.rows] == [("ok", 2), ("ok", 2)]  # new settings: retrained


@pytest.mark.ray
def test_a_failing_finetune_is_reported_and_the_other_finishes(ray_local, work, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(work.shards / "ta", shards / "ta")
    shutil.copytree(work.shards / "tb", shards / "tbad")
    tar = shards / "tbad" / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:1300])  # truncated mid-sample: index.json still looks fine
    cfg = tiny_config(shards, "[{name: ta, conditional: true}, {name: tbad}]", "finetune.steps=2")
    out = tmp_path / "adapters"
    summary = run_finetunes(cfg, work.backbone, out, log=print)
    print(format_table(summary))
    ok, bad = summary.rows
    assert (ok.task, ok.status) == ("ta", "ok") and (bad.task, bad.status) == ("tbad", "failed")
    assert "ShardError" in bad.reason and "train-000000.tar" in bad.reason
    assert "FAILED: ShardError" in format_table(summary)
    assert not summary.ok and not (out / "tbad.safetensors").exists()
    assert json.loads(Path(bad.log).read_text().splitlines()[-1])["kind"] == "error"
    assert [m["task"] for m in json.loads((out / "bank.json").read_text())["tasks"]] == ["ta"]
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert rows[1]["status"] == "failed" and "ShardError" in rows[1]["reason"]

    # Repaired shards: the rerun redoes only the failed fine-tune.
    shutil.rmtree(shards / "tbad")
    shutil.copytree(work.shards / "tb", shards / "tbad")
    again = run_finetunes(cfg, work.backbone, out, log=print)
    assert [(r.task, r.status) for r in again.rows] == [("ta", "reused"), ("tbad", "ok")]
    assert [m["task"] for m in json.loads((out / "bank.json").read_text())["tasks"]] == ["ta", "tbad"]


@pytest.mark.ray
def test_cli_mixed_training_with_two_methods(ray_local, work, tmp_path):
    from ray_jobs.finetune import main

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {name: DiT-T/4, input_size: 16, num_classes: 3}\n"
        f"data: {{image_size: 16, shards_root: {work.shards}, targets: [{{name: ta, conditional: true}}, tb]}}\n"
        "finetune: {steps: 2, batch_size: 6, log_every: 1, warmup_steps: 1, mixed: true, methods: [affiner, lora]}\n"
        "adapter: {rank: 4}\n"
    )
    out = tmp_path / "adapters"
    assert main(["--config", str(config), "--backbone", str(work.backbone), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["task"], r["method"], r["mixed"], r["status"]) for r in summary["rows"]] == [
        ("ta", "affiner", True, "ok"),
        ("tb", "affiner", True, "ok"),
        ("ta", "lora", True, "ok"),
        ("tb", "lora", True, "ok"),
    ]
    assert read_adapter_file(out / "ta.safetensors")[0]["method"] == "affiner"
    assert read_adapter_file(out / "lora" / "tb.safetensors")[0]["method"] == "lora"
    assert read_adapter_file(out / "lora" / "tb.safetensors")[0]["finetune"]["mixed_with"] == ["ta", "tb"]
    assert json.loads((out / "lora" / "bank.json").read_text())["method"] == "lora"
    log = [json.loads(x) for x in (out / "logs" / "lora" / "mixed.jsonl").read_text().splitlines()]
    assert set(log[0]["task_loss"]) == {"ta", "tb"}  # each mixed batch holds both tasks


@pytest.mark.ray
def test_a_request_no_node_can_hold_fails_instead_of_hanging(ray_local, work, tmp_path, capsys):
    from ray_jobs.finetune import main

    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{name: DiT-T/4, input_size: 16, num_classes: 3}}\n"
        f"data: {{image_size: 16, shards_root: {work.shards}, targets: [ta]}}\n"
        "finetune: {batch_size: 6}\n"
    )
    code = main(
        [
            "--config",
            str(config),
            "--backbone",
            str(work.backbone),
            "--out",
            str(tmp_path / "o"),
            "finetune.cpus_per_task=3",
        ]
    )
    assert code == 2
    assert "needs 3 CPU and 0 GPU, but no node has that" in capsys.readouterr().err
