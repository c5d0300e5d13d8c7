"""Build every dataset a config names - the pretraining set and each target task - optionally in parallel.

    build_all(cfg.data)                       # Ray tasks, one per dataset (ray.init() if needed)
    build_all(cfg.data, ["emoji"], parallel=False)
    dataset_dir(cfg.data, "emoji")            # -> "<shards_root>/emoji", where readers look

Names: the pretraining set is named after its source (`openclipart`, or a folder's base name);
a target is named after its task (`TaskSpec.name`), its source being `TaskSpec.source_name`.
A dataset whose index.json already records the same build parameters and tool version is kept
(`force=True` rebuilds). Ray is imported only when `parallel=True`: this package stays usable
without a cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from diffscaler.config import DataConfig
from diffscaler.data import storage
from diffscaler.data.conditions import ConditionError, ConditionSpec, check_condition_source
from diffscaler.data.index import DatasetError, DatasetIndex, load_index
from diffscaler.data.sources import dataset_name
from diffscaler.data.writer import build_parameters, is_up_to_date, make_shards, open_source


def dataset_jobs(data: DataConfig) -> dict[str, str]:
    """{dataset name: source spec}, pretraining set first, then the targets in config order."""
    jobs = {dataset_name(data.pretrain_source): data.pretrain_source}
    for task in data.targets:
        if task.name in jobs and jobs[task.name] != task.source_name:
            raise ValueError(
                f"data.targets: task {task.name!r} (source {task.source_name!r}) clashes with the dataset "
                f"{task.name!r} of source {jobs[task.name]!r}; rename the task"
            )
        jobs[task.name] = task.source_name
    return jobs


def dataset_dir(data: DataConfig, name: str) -> str:
    return storage.join(data.shards_root, name)


def pretrain_dataset_dir(data: DataConfig) -> str:
    return dataset_dir(data, dataset_name(data.pretrain_source))


def dataset_condition(data: DataConfig, name: str) -> ConditionSpec | None:
    """The condition map a dataset's shards carry: its task's (TaskSpec.condition), none for the pretraining set."""
    task = next((t for t in data.targets if t.name == name), None)
    return ConditionSpec.from_config(task.condition, data) if task is not None else None


def _parameters(data: DataConfig, source: str, condition: ConditionSpec | None = None) -> dict:
    """The index fields a current build of `source` records (latent builds: with data.vae's hash)."""
    if data.vae:
        from diffscaler.data.encode import latent_parameters
        from diffscaler.vae import configured_vae_hash

        return latent_parameters(source, data.image_size, data.samples_per_shard, data.eval_fraction, data.limit,
                                 data.seed, configured_vae_hash(data.vae, data.vae_config), condition)  # fmt: skip
    return build_parameters(source, data.image_size, data.samples_per_shard, data.eval_fraction, data.limit, data.seed,
                            condition)  # fmt: skip


def check_sources(data: DataConfig, names: Sequence[str] | None = None, *, force: bool = False) -> None:
    """Every source that a build of `names` (default: all) would read exists and holds images, else
    DatasetError naming the dataset and source - the checks of `shards make`, on the driver before
    any Ray task (a bad source inside a task fails as a task error, far from its cause)."""
    jobs = dataset_jobs(data)
    unknown = [n for n in names or () if n not in jobs]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; the config names {list(jobs)}")
    for name in names or jobs:
        source = jobs[name]
        condition = dataset_condition(data, name)
        try:
            if not force and is_up_to_date(dataset_dir(data, name), _parameters(data, source, condition)):
                continue  # built as configured: its source is not read again
            src, catalog = open_source(source)
            check_condition_source(condition, source, src, catalog)  # a mask needs alpha: refused before any build
        except (ValueError, FileNotFoundError) as err:  # DatasetError, SourceMissingError, ConditionError included
            where = "data.pretrain_source" if name == next(iter(jobs)) else "data.targets"
            what = f" (condition {condition.kind})" if isinstance(err, ConditionError) and condition else ""
            raise DatasetError(f"{where}: dataset {name!r}{what}: {err}") from None


def _build_one(data: DataConfig, name: str, source: str, force: bool) -> DatasetIndex:
    out = dataset_dir(data, name)
    condition = dataset_condition(data, name)
    params = _parameters(data, source, condition)
    if not force and is_up_to_date(out, params):
        print(f"shards {name}: up to date at {out}", file=sys.stderr)
        return load_index(out)
    if data.vae:
        from diffscaler.data.encode import encode_shards

        return encode_shards(source, out, data.vae, vae_config=data.vae_config or None, size=data.image_size,
                             samples_per_shard=data.samples_per_shard, eval_fraction=data.eval_fraction,
                             limit=data.limit, seed=data.seed, actors=data.encode_actors,
                             gpus_per_actor=data.encode_gpus_per_actor, skip_bad=data.skip_bad_samples,
                             condition=condition)  # fmt: skip
    return make_shards(
        source,
        out,
        size=data.image_size,
        samples_per_shard=data.samples_per_shard,
        eval_fraction=data.eval_fraction,
        limit=data.limit,
        seed=data.seed,
        skip_bad=data.skip_bad_samples,
        condition=condition,
    )


def build_all(
    data: DataConfig, names: Sequence[str] | None = None, *, parallel: bool = True, force: bool = False
) -> dict[str, DatasetIndex]:
    """Build the named datasets (default: all of `dataset_jobs`); returns {name: loaded index}."""
    jobs = dataset_jobs(data)
    chosen = list(jobs) if not names else list(names)
    unknown = [n for n in chosen if n not in jobs]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; the config names {list(jobs)}")
    check_sources(data, chosen, force=force)
    # With a VAE each dataset is already a Ray Data job over an actor pool: run them one after another on
    # the driver (a Ray task per dataset would hold the CPUs its own encoding actors wait for).
    if not parallel or len(chosen) == 1 or data.vae:
        return {n: _build_one(data, n, jobs[n], force) for n in chosen}
    import ray

    # One CPU each: decoding is single-threaded Pillow/zlib work; Ray packs as many as the cluster has.
    remote = ray.remote(num_cpus=1, max_retries=0)(_build_one)
    refs = [remote.remote(data, n, jobs[n], force) for n in chosen]
    return dict(zip(chosen, ray.get(refs)))
