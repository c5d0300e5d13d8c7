"""Samples of any WebDataset shard, read through the webdataset library.

    for sample in iter_samples("s3://bucket/ds/train-000003.tar"):   # {"__key__", "__url__", "jpg": b"..."}
        image, label = fmt.decode(sample)                            # fmt: SampleFormat, from index.json

- `open_shard(url)`: `wds.gopen` for local paths, `file://`, `pipe:` and http(s); fsspec for every
  other URL scheme (`s3://`, `gs://`, `memory://`, ...), which webdataset 1.0.2's gopen does not cover.
- `iter_samples(url)`: webdataset's own tar iteration (`tar_file_iterator`) and grouping
  (`group_by_keys`): a sample's key is everything before the first dot of a member's base name, so
  folders may hold dots (`a.b/c/000001.jpg` -> key `a.b/c/000001`); members of one sample come in any
  order but are adjacent, as WebDataset requires. A truncated or corrupt tar raises ShardError naming
  the file and the last key read.
- `SampleFormat`: which members hold the image (`png`, `jpg`/`jpeg`, `webp`, or an `npy` latent) and
  the label (`cls`, a field of `json`, or none), and how they decode: images through webdataset's
  `imagehandler("rgb8")` (Pillow), labels and latents through its basic handlers. An index.json
  records the format, so a reader never guesses. A conditional dataset's samples also hold a condition
  map (`condition_key`: `cond.png` computed by `shards make`, or the user's own member such as
  `depth.png`), decoded by Pillow and cropped/resized like the image (diffscaler.data.conditions).
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import webdataset as wds
from webdataset import autodecode, tariterators

from diffscaler.data import storage
from diffscaler.data.conditions import ConditionError, decode_map, prepare_map
from diffscaler.data.sources import prepare_image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")  # decoded to RGB by webdataset's image handler
LATENT_EXTENSION = "npy"  # a float (C, H, W) or (H, W, C) array, e.g. VAE latents
NO_LABEL = ""  # label_key of an unconditional dataset: every sample is class 0
_GOPEN_SCHEMES = ("", "file", "pipe", "http", "https")  # opened by wds.gopen; any other scheme by fsspec
_RGB8 = autodecode.imagehandler("rgb8")


class ShardError(ValueError):
    """A fault in a shard; `url` and `key` say where ("" when no sample key is known)."""

    def __init__(self, url: str, key: str, reason: str):
        self.url, self.key, self.reason = url, key, reason
        where = f"{url}: sample {key!r}" if key else url
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # survives pickling, so Ray shows the real error from a worker
        return (ShardError, (self.url, self.key, self.reason))


class SampleError(ValueError):
    """One sample that cannot be used (missing member, undecodable image, bad label); the reason."""


def url_scheme(url: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", url)
    return match.group(1).lower() if match and len(match.group(1)) > 1 else ""  # "C:" is a drive


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of the shard; FileNotFoundError when a local or fsspec file is missing."""
    if url_scheme(url) in _GOPEN_SCHEMES:
        return wds.gopen(url, "rb")
    fs, path = storage.filesystem(url)
    return fs.open(path, "rb")


class _CountingReader(io.RawIOBase):
    """Counts the bytes tarfile pulls, so a tar that ends off a 512-byte block is called truncated."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.count = stream, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)

    def drain(self) -> bytes:
        rest = self.stream.read()
        self.count += len(rest)
        return rest


def iter_samples(url: str, *, check_end: bool = True) -> Iterator[dict[str, Any]]:
    """Samples of one shard in tar order: {"__key__", "__url__", extension: bytes, ...}.

    ShardError names the file and the last key on a tar that cannot be read to its end. With
    `check_end`, once tarfile stops, the rest of the file must be end-of-archive zeros and the
    length whole 512-byte blocks (tarfile itself treats a truncated or corrupt header as the end).
    """
    try:
        raw = open_shard(url)
    except FileNotFoundError:
        raise ShardError(url, "", "shard file missing") from None
    except OSError as err:
        raise ShardError(url, "", f"cannot open shard: {err}") from None
    stream = _CountingReader(raw)
    last = ""  # the key of the last member read: the sample being read, or the last one yielded
    members = tariterators.tar_file_iterator(stream)

    def tagged() -> Iterator[dict[str, Any]]:
        nonlocal last
        for member in members:
            last = tariterators.base_plus_ext(member["fname"])[0] or last
            yield {**member, "__url__": url}

    try:
        yield from tariterators.group_by_keys(tagged())
        if not check_end:
            return
        rest = stream.drain()
        if rest.strip(b"\0"):
            raise ShardError(url, last, f"corrupt or truncated tar: {len(rest)} bytes after this sample unread")
        if stream.count % 512:
            raise ShardError(url, last, f"truncated tar: {stream.count} bytes is not a whole number of 512-byte blocks")
    except ShardError:
        raise
    except Exception as err:  # tarfile.ReadError, EOFError, the duplicate-member ValueError, I/O errors
        detail = str(err.args[0]).split(" @ ")[0] if err.args else ""  # webdataset appends the stream's repr
        if isinstance(err, (tarfile.ReadError, EOFError)):
            reason = f"truncated or corrupt tar at or after this sample ({detail or type(err).__name__})"
        else:
            reason = f"unreadable tar at or after this sample: {type(err).__name__}: {detail}"
        raise ShardError(url, last, reason) from None
    finally:
        raw.close()


@dataclass(frozen=True)
class SampleFormat:
    """How one dataset's samples become (image, label); recorded in index.json."""

    image_keys: tuple[str, ...] = ("png",)  # members tried in order; the first present is the image
    label_key: str = "cls"  # "cls" | "json:<field>" (dotted path) | "" (none: every label is 0)
    class_names: tuple[str, ...] = ()
    label_values: str = "index"  # "index": the label is the class number | "name": an entry of class_names
    image_size: int = 32  # square side (latents: cells)
    channels: int = 3  # 3 for RGB images, C for npy latents
    resize: bool = False  # fit images of other sizes (short side resized, centre crop)
    flip_key: str = ""  # latents: the member holding the flipped image's latent ("" = mirror the latent)
    pixels_key: str = ""  # latents: the member holding the image that was encoded ("" = none)
    condition_key: str = ""  # the member holding the spatial condition map ("" = unconditional dataset)
    condition_channels: int = 1  # the map's channels: 1 grey, 3 RGB
    condition_size: int = 0  # the map's side in pixels (latent shards: the encoded images'; 0 = image_size)

    @property
    def latent(self) -> bool:
        return self.image_keys == (LATENT_EXTENSION,)

    def image_member(self, sample: dict[str, Any]) -> tuple[str, bytes]:
        for ext in self.image_keys:
            if ext in sample:
                return ext, sample[ext]
        have = ", ".join("." + k for k in sorted(sample) if not k.startswith("__")) or "nothing"
        raise SampleError(f"missing member(s) {' / '.join('.' + e for e in self.image_keys)} (has {have})")

    def label(self, sample: dict[str, Any]) -> int:
        if not self.label_key:
            return 0
        value = raw_label(sample, self.label_key)
        if self.label_values == "name":
            try:
                return self.class_names.index(str(value))
            except ValueError:
                raise SampleError(f"label {value!r} is not one of the indexed classes") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise SampleError(f"label {value!r} is not a class number")
        if not 0 <= value < len(self.class_names):
            raise SampleError(f"label {value} outside [0, {len(self.class_names)})")
        return value

    def decode_image(self, ext: str, data: bytes) -> np.ndarray:
        """uint8 (S, S, 3) for an image, float32 (C, S, S) for a latent; SampleError if it cannot be."""
        size = self.image_size
        if ext == LATENT_EXTENSION:
            array = decode_latent(data)
            if array.shape == (size, size, self.channels) and self.channels != size:
                array = array.transpose(2, 0, 1)
            if array.shape != (self.channels, size, size):
                raise SampleError(f"latent is {array.shape}, index says ({self.channels}, {size}, {size})")
            return np.ascontiguousarray(array, dtype=np.float32)
        return self._fit(decode_rgb8(ext, data))

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """A decoded uint8 RGB image at the index's size (resized when the index says so)."""
        size = self.image_size
        if image.shape != (size, size, 3):
            if not self.resize:
                raise SampleError(f"image is {image.shape}, index says ({size}, {size}, 3)")
            from PIL import Image

            image = prepare_image(Image.fromarray(image), size)
        return image

    def decode(self, sample: dict[str, Any]) -> tuple[np.ndarray, int]:
        label = self.label(sample)
        return self.decode_image(*self.image_member(sample)), label

    def decode_flip_pair(self, sample: dict[str, Any]) -> tuple[np.ndarray, int]:
        """Latents with a flip member: float32 (2, C, S, S) = (latent, latent of the flipped image)."""
        latent, label = self.decode(sample)
        if self.flip_key not in sample:
            raise SampleError(f"missing member .{self.flip_key} (the flipped image's latent)")
        return np.stack([latent, self.decode_image(LATENT_EXTENSION, sample[self.flip_key])]), label

    def decode_condition(self, sample: dict[str, Any], source_hw: tuple[int, int] | None = None) -> np.ndarray:
        """The condition map, uint8 (C, S, S). `source_hw`: the (height, width) of the sample's image as
        stored (before any resize); a map of another size is a SampleError, else it is cropped and resized
        like the image."""
        key = self.condition_key
        if key not in sample:
            raise SampleError(f"missing member .{key} (the condition map)")
        side = self.condition_size or self.image_size
        try:
            image = decode_map(key.rsplit(".", 1)[-1], sample[key], self.condition_channels)
        except ConditionError as err:
            raise SampleError(f".{key}: {err}") from None
        want = (source_hw[1], source_hw[0]) if source_hw is not None else (side, side)
        if image.size != want:
            raise SampleError(
                f"condition map .{key} is {image.size[0]}x{image.size[1]} px, its image "
                f"{want[0]}x{want[1]}: a map must have its image's size"
            )
        return prepare_map(image, side, self.condition_channels)

    def decode_with_condition(self, sample: dict[str, Any]) -> tuple[np.ndarray, int, np.ndarray]:
        """(image or latent(s) as decode / decode_flip_pair give them, label, condition map uint8 (C, S, S))."""
        label = self.label(sample)
        ext, data = self.image_member(sample)
        if ext == LATENT_EXTENSION:
            return self.decode_image(ext, data), label, self.decode_condition(sample)
        raw = decode_rgb8(ext, data)  # as stored: the map must match this size before any resize
        return self._fit(raw), label, self.decode_condition(sample, raw.shape[:2])

    def decode_pixels(self, sample: dict[str, Any]) -> tuple[np.ndarray, int]:
        """Latent shards: the encoded image uint8 (H, W, 3) from the pixels member, and the label."""
        if not self.pixels_key or self.pixels_key not in sample:
            raise SampleError(f"missing member .{self.pixels_key or 'png'} (the image that was encoded)")
        return decode_rgb8(self.pixels_key, sample[self.pixels_key]), self.label(sample)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": ";".join(self.image_keys),
            "label": self.label_key,
            "label_values": self.label_values,
            "channels": self.channels,
            "resize": self.resize,
            **({"flip": self.flip_key} if self.flip_key else {}),
            **({"pixels": self.pixels_key} if self.pixels_key else {}),
            **(
                {"condition": self.condition_key, "condition_channels": self.condition_channels}
                if self.condition_key
                else {}
            ),
        }


def decode_rgb8(ext: str, data: bytes) -> np.ndarray:
    """uint8 (H, W, 3) through webdataset's image handler; SampleError naming Pillow's complaint."""
    try:
        image = _RGB8("." + ext, data)
    except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise SampleError(f"unreadable image .{ext}: {type(err).__name__}: {err}") from None
    if image is None:
        raise SampleError(f".{ext} is not an image extension webdataset decodes")
    return image


def decode_latent(data: bytes) -> np.ndarray:
    try:
        array = autodecode.basichandlers(".npy", data)  # numpy.lib.format.read_array: no pickle
    except Exception as err:
        raise SampleError(f"unreadable .npy: {type(err).__name__}: {err}") from None
    if not isinstance(array, np.ndarray) or array.ndim != 3 or not np.issubdtype(array.dtype, np.number):
        raise SampleError(
            f".npy holds {getattr(array, 'dtype', type(array))} {getattr(array, 'shape', '')}, not a 3-d numeric array"
        )
    return array


def raw_label(sample: dict[str, Any], label_key: str) -> Any:
    """The label as stored: an int for `cls`, any JSON value for `json:<field>`; SampleError if absent."""
    if label_key == "cls" or not label_key.startswith("json:"):
        ext = label_key or "cls"
        if ext not in sample:
            raise SampleError(f"missing member(s) .{ext}")
        try:
            return autodecode.basichandlers("." + ext, sample[ext])
        except (ValueError, UnicodeDecodeError):
            raise SampleError(f".{ext} member {sample[ext][:20]!r} is not an integer") from None
    if "json" not in sample:
        raise SampleError("missing member(s) .json")
    try:
        value = autodecode.basichandlers(".json", sample["json"])
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SampleError(f".json does not parse: {err}") from None
    for part in label_key[len("json:") :].split("."):
        if not isinstance(value, dict) or part not in value:
            raise SampleError(f".json has no field {label_key[len('json:') :]!r}")
        value = value[part]
    return value
