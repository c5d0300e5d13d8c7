"""WebDataset tar files: a deterministic writer and a fast reader that names the file and key of any fault.

A shard is a plain POSIX tar that `webdataset.WebDataset` reads as is. Each sample is the adjacent
members `<key>.cls`, `<key>.json` (optional), `<key>.png`, in that (sorted) order; samples appear
in ascending key order. The key is everything before the first dot of the member's base name, as in
WebDataset.

Writing: fixed mtime 0, uid/gid 0, empty user/group names, mode 0644, ustar headers - rerunning
gives byte-identical tars.

Reading: `tarfile` in streaming mode runs at ~4.5k samples/s on the 2-core machine (it builds a
TarInfo object per member); parsing the 512-byte headers directly runs at ~90k samples/s, so the
reader walks the headers itself (ustar, GNU long names and pax path records are understood) and
checks each header's checksum, so truncated and corrupt tars are reported, not half-read.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

BLOCK = 512
SAMPLE_EXTENSIONS = ("cls", "json", "png")  # sorted member order of one sample
REQUIRED_EXTENSIONS = ("cls", "png")
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")  # no dots: WebDataset splits the key at the first dot


class ShardError(ValueError):
    """A fault in a shard; `url` and `key` say where ("" when no sample key is known)."""

    def __init__(self, url: str, key: str, reason: str):
        self.url, self.key, self.reason = url, key, reason
        where = f"{url}: sample {key!r}" if key else url
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # survives pickling, so Ray shows the real error from a worker
        return (ShardError, (self.url, self.key, self.reason))


@dataclass
class RawSample:
    """One sample's members as bytes, keyed by extension (`png`, `cls`, `json`)."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def _octal(field_bytes: bytes) -> int:
    if field_bytes[:1] == b"\x80":  # GNU base-256 for large sizes
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def _block_sums(data: bytes) -> list[int]:
    """Byte sum of every 512-byte block, in one vectorised pass (header checksums cost ~nothing)."""
    whole = len(data) // BLOCK * BLOCK
    return np.frombuffer(data, np.uint8, count=whole).reshape(-1, BLOCK).sum(axis=1, dtype=np.int64).tolist()


def iter_tar_members(data: bytes, url: str) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, member bytes) of regular files; ShardError on truncation or corruption."""
    pos, n = 0, len(data)
    sums = _block_sums(data)
    long_name: str | None = None
    last = ""
    while True:
        if pos + BLOCK > n:
            if pos == n and n > 0:
                return  # no end-of-archive blocks; tolerated (some writers omit them)
            raise ShardError(url, _key_of(last), f"truncated: file ends inside a tar header at byte {pos}")
        block_sum = sums[pos >> 9]
        if block_sum == 0:
            return  # end-of-archive marker (an all-zero block)
        # Fields are sliced straight from `data` (no 512-byte header copy): this loop is the hot path.
        chk_field = data[pos + 148 : pos + 156]
        try:
            stored = _octal(chk_field)
        except ValueError:
            stored = -1
        if stored != block_sum - sum(chk_field) + 256:  # the checksum counts its own field as 8 spaces
            raise ShardError(url, _key_of(last), f"corrupt tar header at byte {pos} (checksum mismatch)")
        size = _octal(data[pos + 124 : pos + 136])
        typeflag = data[pos + 156]
        start = pos + BLOCK
        end = start + size
        if end > n:
            name = long_name or data[pos : pos + 100].rstrip(b"\0").decode("utf-8", "replace")
            raise ShardError(url, _key_of(name), f"truncated: member {name!r} needs {size} bytes, file ends")
        header_at, pos = pos, start + ((size + BLOCK - 1) & -BLOCK)
        if typeflag == 0x4C:  # "L": GNU long name for the next member
            long_name = data[start:end].rstrip(b"\0").decode("utf-8")
            continue
        if typeflag in (0x78, 0x67):  # "x" / "g": pax records; only a per-file `path` matters here
            for record in data[start:end].decode("utf-8", "replace").split("\n"):
                if " path=" in record and typeflag == 0x78:
                    long_name = record.split(" path=", 1)[1]
            continue
        if typeflag not in (0x30, 0, 0x37):  # regular files only ("0", NUL, "7"): no dirs, no links
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = data[header_at : header_at + 100].rstrip(b"\0").decode("utf-8")
            if data[header_at + 345] and data[header_at + 257 : header_at + 262] == b"ustar":
                name = data[header_at + 345 : header_at + 500].rstrip(b"\0").decode("utf-8") + "/" + name
        last = name
        yield name, data[start:end]


def _key_of(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[0] if base else ""


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/abc.cls` -> (`dir/abc`, `cls`), WebDataset's rule: the key ends at the base name's first dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, (ext if dot else "")


def iter_raw_samples(data: bytes, url: str) -> Iterator[RawSample]:
    """Group adjacent members into samples. A key that reappears later is a ShardError (not adjacent)."""
    current: RawSample | None = None
    seen: set[str] = set()
    for name, payload in iter_tar_members(data, url):
        dot = name.find(".", name.rfind("/") + 1)  # split_member_name, inlined: this is the hot path
        if dot < 0:
            continue  # files without extension are not sample members
        key, ext = name[:dot], name[dot + 1 :]
        if current is not None and key == current.key:
            if ext in current.members:
                raise ShardError(url, key, f"member .{ext} appears twice")
            current.members[ext] = payload
            continue
        if key.startswith("__"):
            continue  # WebDataset metadata members
        if current is not None:
            yield current
        if key in seen:
            raise ShardError(url, key, "members of this sample are not adjacent (key appears twice)")
        seen.add(key)
        current = RawSample(key, {ext: payload})
    if current is not None:
        yield current


def missing_members(sample: RawSample) -> list[str]:
    return [ext for ext in REQUIRED_EXTENSIONS if ext not in sample.members]


def parse_label(sample: RawSample, url: str) -> int:
    raw = sample.members.get("cls", b"")
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardError(url, sample.key, f"cls member {raw[:20]!r} is not an integer") from None
