import json

import pytest

from diffscaler.config import ConfigError, ExperimentConfig, config_from_json, load_config, swept_datasets


def test_defaults_validate_and_round_trip_through_json():
    cfg = ExperimentConfig().validate()
    again = config_from_json(cfg.to_json())
    assert again == cfg


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: DiT-S/2\npretrain:\n  steps: 7\n")
    cfg = load_config(path, ["pretrain.steps=9", "adapter.targets=[qkv, fc1]", "data.targets=[emoji, icons]"])
    assert cfg.model.name == "DiT-S/2"
    assert cfg.pretrain.steps == 9
    assert cfg.adapter.targets == ("qkv", "fc1")
    assert [t.name for t in cfg.data.targets] == ["emoji", "icons"]


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("model.name=DiT-Q/2", "model.name", "DiT-{T,S,B,L,XL}/{2,4,8}"),
        ("model.input_size=30", "model.input_size", "not divisible by the patch size 4"),
        ("pretrain.zero_stage=4", "pretrain.zero_stage", "[0, 1, 2, 3]"),
        ("pretrain.global_batch_size=33", "pretrain.global_batch_size", "not divisible"),
        ("adapter.method=prefix", "adapter.method", "affiner"),
        ("adapter.targets=[qkv, conv]", "adapter.targets", "qkv"),
        ("diffusion.sampler=euler", "diffusion.sampler", "ddim"),
        ("sweep.ranks=[]", "sweep.ranks", "empty"),
        ("pipeline.stages=[shards, shards]", "pipeline.stages", "repeats a stage"),
        ("pipeline.stages=[shards, 'pre train']", "pipeline.stages", "not a stage name"),
        ("eval.feature_network=inception-v3-compat", "eval.feature_weights_path", "weights file"),
        ("pretrain.steps=ten", "pretrain.steps", "integer"),
        ("model.colour=3", "model", "unknown key"),
    ],
)
def test_bad_values_name_the_field_and_allowed_values(override, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)
    assert words in str(err.value)


def test_exponent_floats_without_a_dot_parse(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  lr: 1e-3\n")  # YAML 1.1 reads this as a string
    cfg = load_config(path, ["finetune.lr=2e-4"])
    assert cfg.pretrain.lr == 1e-3 and cfg.finetune.lr == 2e-4


def test_override_syntax_error_is_clear():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["pretrain.steps"])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_saved_json_is_plain_json(tmp_path):
    cfg = ExperimentConfig()
    cfg.save_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["model"]["name"] == "DiT-T/4"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("pretrain.lr=.inf", "pretrain.lr"),
        ("pretrain.lr=.nan", "pretrain.lr"),
        ("finetune.lr=.inf", "finetune.lr"),
        ("sweep.lr_max=.inf", "sweep.lr_max"),
    ],
)
def test_learning_rates_must_be_finite(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("diffusion.cfg_scale=.inf", "diffusion.cfg_scale", "not a finite number"),
        ("adapter.branch_scale_init=.nan", "adapter.branch_scale_init", "not a finite number"),
        ("finetune.method_lrs={lora: .nan}", "finetune.method_lrs.lora", "not a finite number"),
        ("pretrain.weight_decay=-1", "pretrain.weight_decay", ">= 0"),
        ("data.encode_gpus_per_actor=.inf", "data.encode_gpus_per_actor", "not a finite number"),
        ("eval.cpus_per_actor=-1", "eval.cpus_per_actor", "positive"),
        ("eval.gpus_per_actor=-1", "eval.gpus_per_actor", ">= 0"),
        ("eval.gpus_per_actor=1.5", "eval.gpus_per_actor", "whole"),
        ("eval.kid_subset_size=0", "eval.kid_subset_size", "at least 2"),
        ("data.image_size=100000", "data.image_size", "8192"),
        ("model.input_size=4096", "model.input_size", "tokens"),
        ("finetune.grad_clip=-1", "finetune.grad_clip", ">= 0"),
        ("sweep.grace_period=0", "sweep.grace_period", "at least 1"),
        ("eval.sampling_steps=5000", "eval.sampling_steps", "num_timesteps"),
        ("finetune.condition_dropout=1", "finetune.condition_dropout", "[0, 1)"),
        ("finetune.condition_dropout=-0.1", "finetune.condition_dropout", "[0, 1)"),
        ("adapter.controlnet_blocks=-1", "adapter.controlnet_blocks", ">= 0"),
    ],
)
def test_values_that_cannot_work_are_refused(override, field, words):
    """Each passed validation before and failed later (or never): inf/NaN, negative counts, absurd sizes."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(field + ":") and words in str(err.value)


def test_the_readme_targets_override_of_tiny_yaml_validates():
    """tiny.yaml sweeps [emoji]; the README's own-data override replaces data.targets (issue 27 item 6)."""
    cfg = load_config("ray_jobs/configs/tiny.yaml", ['data.targets=[{name: mine, source: "folder:/data/mine"}]'])
    assert [t.name for t in cfg.data.targets] == ["mine"] and cfg.sweep.datasets == ("emoji",)
    assert swept_datasets(cfg) == (("mine",), ("emoji",))


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("generate.images_per_task=0", "generate.images_per_task", "must be in [1,"),
        ("generate.num_actors=0", "generate.num_actors", "at least 1"),
        ("generate.sampling_steps=0", "generate.sampling_steps", "num_timesteps"),
        ("generate.sampler=euler", "generate.sampler", "not one of"),
        ("generate.samples_per_shard=0", "generate.samples_per_shard", "must be in [1,"),
        ("generate.tasks=[a, a]", "generate.tasks", "repeats"),
        ("generate.cpus_per_actor=0", "generate.cpus_per_actor", "positive"),
        ("serve.port=70000", "serve.port", "65535"),
        ("serve.max_batch_size=0", "serve.max_batch_size", "must be in [1,"),
        ("serve.batch_wait_s=-1", "serve.batch_wait_s", "[0, 60]"),
        ("serve.max_resident_tasks=0", "serve.max_resident_tasks", "at least 1"),
        ("serve.max_steps=0", "serve.max_steps", "must be in [1,"),
        ("serve.sampling_steps=300", "serve.sampling_steps", "serve.max_steps=250"),
        ("serve.max_replicas=0", "serve.max_replicas", "at least 1"),
        ("serve.guidance=-1", "serve.guidance", ">= 0"),
        ("serve.route_prefix=v1", "serve.route_prefix", "start with '/'"),
        ("serve.watch_interval_s=-1", "serve.watch_interval_s", "[0, 3600] seconds (0 = off)"),
    ],
)
def test_generate_and_serve_sections_are_validated(override, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(field + ":") and words in str(err.value)


def test_generate_and_serve_sections_load_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generate: {images_per_task: 8, num_actors: 2}\nserve: {port: 8123, max_resident_tasks: 4}\n")
    cfg = load_config(path, ["serve.batch_wait_s=0.05"])
    assert (cfg.generate.images_per_task, cfg.generate.num_actors) == (8, 2)
    assert (cfg.serve.port, cfg.serve.max_resident_tasks, cfg.serve.batch_wait_s) == (8123, 4, 0.05)
