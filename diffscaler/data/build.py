"""Build every dataset a config names - the pretraining set and each target task - optionally in parallel.

    build_all(cfg.data)                       # Ray tasks, one per dataset (joins a cluster if none: diffscaler.cluster)
    build_all(cfg.data, ["emoji"], parallel=False)
    dataset_dir(cfg.data, "emoji")            # -> "<shards_root>/emoji", where readers look

Names: the pretraining set is named after its source (`openclipart`, or a folder's base name);
a target is named after its task (`TaskSpec.name`), its source being `TaskSpec.source_name`.
A `webdataset:` target is indexed where it lies, or with data.vae encoded into latent shards as a folder is
(diffscaler.data.user_shards).
A dataset whose index.json already records the same build parameters and tool version is kept
(`force=True` rebuilds). Ray is imported only when `parallel=True`: this package stays usable
without a cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from diffscaler.cluster import connect_ray
from diffscaler.config import WEBDATASET_PREFIX, DataConfig, TaskSpec
from diffscaler.data import storage
from diffscaler.data.conditions import ConditionError, ConditionSpec, check_condition_source
from diffscaler.data.encode import encode_shards, latent_parameters
from diffscaler.data.index import SPLITS, DatasetError, DatasetIndex, load_index
from diffscaler.data.indexer import index_shards, shard_urls, shards_fingerprint
from diffscaler.data.sources import dataset_name, select_balanced, split_train_eval
from diffscaler.data.writer import build_parameters, is_up_to_date, make_shards, open_source, tool_version
from diffscaler.vae import configured_vae_hash


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


def dataset_task(data: DataConfig, name: str) -> TaskSpec | None:
    """The target task a dataset belongs to (None for the pretraining set)."""
    return next((t for t in data.targets if t.name == name), None)


def dataset_condition(data: DataConfig, name: str) -> ConditionSpec | None:
    """The condition map a dataset's shards carry: its task's (TaskSpec.condition), none for the pretraining set."""
    task = dataset_task(data, name)
    return ConditionSpec.from_config(task.condition, data) if task is not None else None


def dataset_parameters(data: DataConfig, name: str) -> dict:
    """The index fields a current build of dataset `name` records: shards made from its source (latent
    builds: with data.vae's hash; a webdataset: target's are encoded too, recording its shards' files and
    keys), or for a webdataset: target of a pixel backbone the options its shards are indexed with."""
    source = dataset_jobs(data)[name]
    task = dataset_task(data, name)
    if task is not None and task.webdataset and not data.vae:
        return webdataset_parameters(data, task)
    condition = dataset_condition(data, name)
    if data.vae:
        return latent_parameters(
            source,
            data.image_size,
            data.samples_per_shard,
            data.eval_fraction,
            data.limit,
            data.seed,
            configured_vae_hash(data.vae, data.vae_config),
            condition,
            **_read_with(task),
        )
    return build_parameters(
        source, data.image_size, data.samples_per_shard, data.eval_fraction, data.limit, data.seed, condition
    )


def _read_with(task: TaskSpec | None) -> dict[str, str]:
    """How a latent build reads a webdataset: target's samples (encode_shards' image_key, label_key)."""
    if task is None or not task.webdataset:
        return {}
    return {"image_key": task.image_key, "label_key": task.label_key}


def webdataset_parameters(data: DataConfig, task: TaskSpec) -> dict:
    """What an index of users' shards is made with: their files, and the options `shards index` takes
    (the size is the backbone's data.image_size; the eval split is per sample, data.eval_fraction)."""
    options = {
        "label_key": task.label_key,
        "image_key": task.image_key,
        "size": data.image_size,
        "eval_fraction": data.eval_fraction,
        "condition": task.condition,
        "skip_bad": data.skip_bad_samples,
    }
    return {
        "source": task.source_name,
        "index_options": options,
        "source_files": shards_fingerprint(task.source_name[len(WEBDATASET_PREFIX) :]),
        "tool": tool_version(),
    }


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
        task = dataset_task(data, name)
        try:
            if not force and is_up_to_date(dataset_dir(data, name), dataset_parameters(data, name)):
                continue  # built as configured: its source is not read again
            if task is not None and task.webdataset:
                shard_urls(source[len(WEBDATASET_PREFIX) :])  # the shards are there (each is read when indexed)
                continue
            src, catalog = open_source(source)
            check_condition_source(condition, source, src, catalog)  # a mask needs alpha: refused before any build
        except (ValueError, FileNotFoundError) as err:  # DatasetError, SourceMissingError, ConditionError included
            where = "data.pretrain_source" if name == next(iter(jobs)) else "data.targets"
            what = f" (condition {condition.kind})" if isinstance(err, ConditionError) and condition else ""
            raise DatasetError(f"{where}: dataset {name!r}{what}: {err}") from None


def _build_one(data: DataConfig, name: str, source: str, force: bool) -> DatasetIndex:
    out = dataset_dir(data, name)
    condition = dataset_condition(data, name)
    params = dataset_parameters(data, name)
    if not force and is_up_to_date(out, params):
        print(f"shards {name}: up to date at {out}", file=sys.stderr)
        return load_index(out)
    task = dataset_task(data, name)
    if task is not None and task.webdataset and not data.vae:  # users' shards stay: index.json goes to `out`
        o = params["index_options"]
        return index_shards(
            source[len(WEBDATASET_PREFIX) :],
            out,
            image_key=o["image_key"],
            label_key=o["label_key"],
            size=o["size"],
            eval_fraction=o["eval_fraction"],
            skip_bad=o["skip_bad"],
            condition=o["condition"],
            record=params,
        )
    if data.vae:
        return encode_shards(
            source,
            out,
            data.vae,
            vae_config=data.vae_config or None,
            size=data.image_size,
            samples_per_shard=data.samples_per_shard,
            eval_fraction=data.eval_fraction,
            limit=data.limit,
            seed=data.seed,
            actors=data.encode_actors,
            gpus_per_actor=data.encode_gpus_per_actor,
            skip_bad=data.skip_bad_samples,
            condition=condition,
            **_read_with(task),
        )
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


def planned_counts(data: DataConfig, name: str) -> dict[str, int] | None:
    """{"train": n, "eval": m} that dataset `name` holds, known before any stage runs: from its index when it is
    built as configured, else from its source's catalog, limit and split (inputs that turn out undecodable
    when built may lower them); None for WebDataset shards not indexed yet (counted by the shards stage)."""
    folder = dataset_dir(data, name)
    if is_up_to_date(folder, dataset_parameters(data, name)):
        index = load_index(folder)
        return {split: index.num_samples(split) for split in SPLITS}
    task = dataset_task(data, name)
    if task is not None and task.webdataset:
        return None
    _, catalog = open_source(dataset_jobs(data)[name])
    train, evals = split_train_eval(select_balanced(catalog, data.limit, data.seed), data.eval_fraction, data.seed)
    return {"train": len(train), "eval": len(evals)}


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

    connect_ray()  # not Ray's implicit init, which joins whatever cluster /tmp/ray names
    # One CPU each: decoding is single-threaded Pillow/zlib work; Ray packs as many as the cluster has.
    remote = ray.remote(num_cpus=1, max_retries=0)(_build_one)
    refs = [remote.remote(data, n, jobs[n], force) for n in chosen]
    return dict(zip(chosen, ray.get(refs)))
