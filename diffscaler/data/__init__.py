"""WebDataset shards: build them from image sources, check them, read them into training batches.

    diffscaler shards make --source emoji --out shards/emoji --limit 500
    diffscaler shards check shards/emoji
    diffscaler shards index /data/pets-wds --label-key json:label   # WebDataset shards made by other tools
    python -m ray_jobs.shards --config ray_jobs/configs/tiny.yaml      # every dataset, as Ray tasks

Modules: sources (bundled sets + folders), writer (make_shards, ShardWriter), index (index.json),
check (check_dataset), reader (ShardReader, MixedTaskReader, read_split), build (build_all),
samples (reading any WebDataset through the webdataset library), indexer (`shards index`: foreign shards
-> index.json), encode (latent shards through a VAE, on Ray), user_shards (users' WebDataset shards as the
source of a latent build), conditions (spatial condition maps: canny, alpha mask, key:<member>), pngcodec / tarformat
(our own bytes on disk), storage (local paths and fsspec URLs).
"""

from diffscaler.data.build import build_all, dataset_dir, dataset_jobs, pretrain_dataset_dir
from diffscaler.data.check import CheckReport, check_dataset
from diffscaler.data.index import DatasetError, DatasetIndex, load_index
from diffscaler.data.reader import MixedTaskReader, ShardReader, read_split
from diffscaler.data.samples import ShardError
from diffscaler.data.sources import BUNDLED_SOURCES, SourceMissingError, get_source
from diffscaler.data.writer import ShardWriter, make_shards

__all__ = [
    "BUNDLED_SOURCES",
    "CheckReport",
    "DatasetError",
    "DatasetIndex",
    "MixedTaskReader",
    "ShardError",
    "ShardReader",
    "ShardWriter",
    "SourceMissingError",
    "build_all",
    "check_dataset",
    "dataset_dir",
    "dataset_jobs",
    "get_source",
    "load_index",
    "make_shards",
    "pretrain_dataset_dir",
    "read_split",
]
