"""Our own shards' tar bytes: a deterministic writer, and the same samples read back from memory.

A shard is a plain POSIX tar that `webdataset.WebDataset` reads as is. Each sample is the adjacent
members `<key>.cls`, `<key>.json` (optional), `<key>.png`, in that (sorted) order; samples appear
in ascending key order. The key is everything before the first dot of the member's base name, as in
WebDataset.

Writing: fixed mtime 0, uid/gid 0, empty user/group names, mode 0644, ustar headers - rerunning
gives byte-identical tars. Reading goes through the webdataset library (diffscaler.data.samples).
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from webdataset import tariterators

from diffscaler.data.samples import ShardError

__all__ = ["RawSample", "ShardError", "check_key", "iter_raw_samples", "write_tar"]

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")  # no dots: WebDataset splits the key at the first dot


@dataclass
class RawSample:
    """One sample's members as bytes, keyed by extension (`png`, `cls`, `json`)."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)


def check_key(key: str) -> str:
    if not _KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} must be letters, digits, '_' or '-' (no dots, no slashes)")
    return key


def write_tar(samples: Iterable[RawSample]) -> bytes:
    """Samples -> tar bytes, members of each sample adjacent in sorted extension order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            check_key(sample.key)
            for ext in sorted(sample.members):
                data = sample.members[ext]
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def iter_raw_samples(data: bytes, url: str) -> Iterator[RawSample]:
    """The samples of tar bytes in memory (webdataset's tar iteration); ShardError names file and key."""
    last = ""
    try:
        members = tariterators.tar_file_iterator(io.BytesIO(data))
        for sample in tariterators.group_by_keys({**m, "__url__": url} for m in members):
            last = sample["__key__"]
            yield RawSample(last, {k: v for k, v in sample.items() if not k.startswith("__")})
    except Exception as err:  # tarfile.ReadError ("unexpected end of data" when truncated), ValueError
        raise ShardError(url, last, f"truncated or unreadable tar after this sample: {err}") from None
