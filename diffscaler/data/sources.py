"""Image sources: the bundled sets (Debian / PyPI packages, see ../shared/DATASETS.md) and any folder.

    get_source("openclipart")        # 22 folder categories = class labels (pretraining set)
    get_source("emoji")              # Noto Color Emoji, rendered at size 109; one class
    get_source("icons")              # famfamfam Silk, 16x16 base64 PNGs in a Perl module; one class
    get_source("tiles")              # Dungeon Crawl floor tiles, fully opaque 32-px cells; one class
    get_source("textiles")           # simulated textile images; classes nominal/local/global
    get_source("fashion-mnist")      # 70,000 28x28 grey images (train + t10k pooled); 10 classes
    get_source("folder:PATH")        # PATH/<class>/<image> gives labels; a flat folder is one class

A source lists its items cheaply (`catalog()`: paths or names, no decoding) and decodes one on
demand (`load(ref)` -> PIL image), so `--limit` picks a deterministic, class-balanced subset
before any pixel is decoded. Sources are small picklable objects: decoded resources (font, icon
table, tile sheet, idx arrays) are cached per process, so a pool of decode processes works.

`prepare_image(image, size)` is the one place images become shard pixels: transparency composited
on white, grey and palette to RGB, shorter side resized to `size` (Lanczos), centre crop;
`prepare_image_alpha` also returns the alpha through the same box and resample (the `mask` condition).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib
import io
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffscaler.config import BUNDLED_SOURCES  # defined once, where config validation reads it
from diffscaler.data import storage

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class SourceMissingError(FileNotFoundError):
    """A bundled source whose package is not installed; the message names the package."""


@dataclass(frozen=True)
class SourceItem:
    ref: str  # what `load` takes: a relative path, an icon name, a tile cell, an emoji code point
    label: int  # class index into the catalog's class names


@dataclass(frozen=True)
class Catalog:
    class_names: tuple[str, ...]  # label i is class_names[i]
    items: tuple[SourceItem, ...]  # sorted by ref: the listing order never depends on the file system


# ------------------------------------------------------------------------------------------------
# Turning any decoded image into shard pixels
# ------------------------------------------------------------------------------------------------


def _to_rgba_or_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    return image.convert("RGBA") if has_alpha else image.convert("RGB")


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """Any PIL image -> uint8 (size, size, 3): composited on white, short side resized, centre-cropped."""
    return prepare_image_alpha(image, size)[0]


def centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The crop box of prepare_image: the centred square of the short side."""
    side = min(width, height)
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def prepare_image_alpha(image: Image.Image, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """prepare_image's pixels and the alpha that went through the same box and resample: uint8
    (size, size) for an image with transparency (the `mask` condition), None for an opaque one."""
    image = _to_rgba_or_rgb(image)
    box = centre_square(*image.size)
    if image.mode == "RGBA":
        # Resize premultiplied so transparent pixels' hidden colour does not bleed into edges.
        small = image.convert("RGBa").resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
        arr = np.asarray(small, dtype=np.int16)  # (size, size, 4), colour premultiplied by alpha
        rgb = arr[..., :3] + (255 - arr[..., 3:4])  # over white: c*a + 255*(1-a)
        return np.clip(rgb, 0, 255).astype(np.uint8), arr[..., 3].astype(np.uint8)
    small = image.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    return np.asarray(small, dtype=np.uint8).copy(), None


def _hash_order(seed: int, tag: str, ref: str) -> bytes:
    return hashlib.sha256(f"{seed}/{tag}/{ref}".encode()).digest()[:8]


def select_balanced(catalog: Catalog, limit: int, seed: int) -> list[SourceItem]:
    """Class-interleaved order of the catalog, cut at `limit` (0 = all).

    Within each class items go in a seeded hash order; classes take turns, so a limited build has
    as equal a share per class as the class sizes allow, and the choice never depends on timing.
    """
    by_class: dict[int, list[SourceItem]] = {}
    for item in catalog.items:
        by_class.setdefault(item.label, []).append(item)
    queues = [
        sorted(items, key=lambda it: _hash_order(seed, "select", it.ref)) for _label, items in sorted(by_class.items())
    ]
    total = sum(len(q) for q in queues)
    want = total if limit <= 0 else min(limit, total)
    out: list[SourceItem] = []
    depth = 0
    while len(out) < want:
        for queue in queues:
            if depth < len(queue) and len(out) < want:
                out.append(queue[depth])
        depth += 1
    return out


def split_train_eval(
    selected: list[SourceItem], eval_fraction: float, seed: int
) -> tuple[list[SourceItem], list[SourceItem]]:
    """A stratified eval split: round(eval_fraction * N) items (at least 1 when eval_fraction > 0),
    shared among classes by largest remainder; a class keeps a train item unless eval would
    otherwise fall short (a limit below the class count).

    Each split is then put in a seeded hash order, so shards mix classes.
    """
    n = len(selected)
    n_eval = 0 if eval_fraction <= 0 or n < 2 else min(n - 1, max(1, round(eval_fraction * n)))
    by_class: dict[int, list[SourceItem]] = {}
    for item in selected:
        by_class.setdefault(item.label, []).append(item)
    quota = {c: eval_fraction * len(items) for c, items in by_class.items()}
    take = {c: min(int(q), len(by_class[c]) - 1) for c, q in quota.items()}
    # Remainders go to the largest fractional parts; ties broken by a seeded hash, not class order.
    ranked = sorted(by_class, key=lambda c: (-(quota[c] - int(quota[c])), _hash_order(seed, "eval-class", str(c))))
    short = n_eval - sum(take.values())
    for keep in (1, 0):  # first leave every class a train item; if eval is still short, stop caring
        while short > 0 and any(take[c] < len(by_class[c]) - keep for c in ranked):
            for c in ranked:
                if short > 0 and take[c] < len(by_class[c]) - keep:
                    take[c] += 1
                    short -= 1
    train, evals = [], []
    for c, items in by_class.items():
        ranked_items = sorted(items, key=lambda it: _hash_order(seed, "eval", it.ref))
        evals.extend(ranked_items[: take[c]])
        train.extend(ranked_items[take[c] :])

    def order(items: list[SourceItem]) -> list[SourceItem]:
        return sorted(items, key=lambda it: _hash_order(seed, "order", it.ref))

    return order(train), order(evals)


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def _require_path(path: Path, source: str, install: str) -> Path:
    if not path.exists():
        raise SourceMissingError(f"source {source!r} needs {path}, which is missing: install {install}")
    return path


@contextmanager
def _pixel_limit(limit: int | None) -> Iterator[None]:
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


@dataclass(frozen=True)
class OpenClipartSource:
    """OpenClipart PNGs; the 22 top-level folders are the class labels."""

    root: str = "/usr/share/openclipart/png"
    name: str = "openclipart"

    @property
    def detail(self) -> str:
        return f"{self.root} (Debian package openclipart-png)"

    def catalog(self) -> Catalog:
        root = _require_path(Path(self.root), self.name, "the Debian package openclipart-png")
        files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*.png"))
        classes = sorted({f.split("/", 1)[0] for f in files if "/" in f})
        label = {c: i for i, c in enumerate(classes)}
        items = tuple(SourceItem(f, label[f.split("/", 1)[0]]) for f in files if "/" in f)
        return Catalog(tuple(classes), items)

    def load(self, ref: str) -> Image.Image:
        # A few trusted package files (up to ~9 Mpx) trip Pillow's decompression-bomb guard; lift it
        # for this source only, leaving user folders protected.
        with _pixel_limit(None), Image.open(Path(self.root) / ref) as im:
            im.load()
            return im


EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
_EMOJI_SIZE = 109  # the one size of the font's colour bitmaps
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}


@functools.lru_cache(maxsize=2)
def _emoji_font(path: str):
    from PIL import ImageFont, features

    if not features.check("raqm"):
        raise SourceMissingError(
            "source 'emoji' needs Pillow with libraqm (emoji sequences need text shaping): "
            "install the Debian package libraqm0 and reinstall pillow"
        )
    return ImageFont.truetype(path, _EMOJI_SIZE, layout_engine=ImageFont.Layout.RAQM)


@dataclass(frozen=True)
class EmojiSource:
    """Noto Color Emoji, fully-qualified emoji without skin-tone variants that render as one glyph."""

    font_path: str = EMOJI_FONT
    name: str = "emoji"

    @property
    def detail(self) -> str:
        return f"{self.font_path} (Debian fonts-noto-color-emoji) + code points from pip emoji"

    def catalog(self) -> Catalog:
        _require_path(Path(self.font_path), self.name, "the Debian package fonts-noto-color-emoji")
        try:
            emoji = importlib.import_module("emoji")
        except ImportError:
            raise SourceMissingError("source 'emoji' needs the PyPI package emoji: pip install emoji") from None
        font = _emoji_font(self.font_path)
        qualified = emoji.STATUS["fully_qualified"]
        single_width = font.getbbox("\U0001f600")[2]  # one glyph's advance; wider = unsupported sequence
        refs = []
        for text, info in emoji.EMOJI_DATA.items():
            if info.get("status") != qualified or set(text) & _SKIN_TONES:
                continue
            left, _top, right, _bottom = font.getbbox(text)
            if right - left <= single_width:
                refs.append("-".join(f"{ord(ch):x}" for ch in text))
        return Catalog(("emoji",), tuple(SourceItem(r, 0) for r in sorted(refs)))

    def load(self, ref: str) -> Image.Image:
        from PIL import ImageDraw

        text = "".join(chr(int(cp, 16)) for cp in ref.split("-"))
        font = _emoji_font(self.font_path)
        left, top, right, bottom = font.getbbox(text)
        canvas = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((-left, -top), text, font=font, embedded_color=True)
        return canvas


SILK_MODULE = "/usr/share/perl5/Icon/FamFamFam/Silk.pm"


@functools.lru_cache(maxsize=2)
def _silk_icons(path: str) -> dict[str, bytes]:
    text = Path(path).read_text(encoding="ascii", errors="replace")
    _, sep, data = text.partition("__DATA__")
    if not sep:
        raise ValueError(f"{path}: no __DATA__ section; not the Icon::FamFamFam::Silk module")
    return {
        m.group(1): base64.b64decode(m.group(2))
        for m in re.finditer(r"^\s*([A-Za-z0-9_]+)\s*=>\s*'([A-Za-z0-9+/=\s]+)'", data, re.MULTILINE)
    }


@dataclass(frozen=True)
class SilkIconSource:
    """famfamfam Silk: 1,000 16x16 RGBA icons stored base64 after `__DATA__` in a Perl module."""

    module_path: str = SILK_MODULE
    name: str = "icons"

    @property
    def detail(self) -> str:
        return f"{self.module_path} (Debian package libicon-famfamfam-silk-perl)"

    def catalog(self) -> Catalog:
        _require_path(Path(self.module_path), self.name, "the Debian package libicon-famfamfam-silk-perl")
        return Catalog(("icon",), tuple(SourceItem(n, 0) for n in sorted(_silk_icons(self.module_path))))

    def load(self, ref: str) -> Image.Image:
        with Image.open(io.BytesIO(_silk_icons(self.module_path)[ref])) as im:
            im.load()
            return im


CRAWL_FLOOR = "/usr/share/crawl/dat/tiles/floor.png"
_TILE = 32  # the sheet's grid pitch in pixels


@functools.lru_cache(maxsize=2)
def _tile_sheet(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))  # (H, W, 4)


@dataclass(frozen=True)
class CrawlTileSource:
    """Dungeon Crawl floor tiles: the 32-px cells of floor.png whose alpha is 255 everywhere."""

    sheet_path: str = CRAWL_FLOOR
    name: str = "tiles"

    @property
    def detail(self) -> str:
        return f"{self.sheet_path} (Debian package crawl-tiles-data)"

    def catalog(self) -> Catalog:
        _require_path(Path(self.sheet_path), self.name, "the Debian package crawl-tiles-data")
        sheet = _tile_sheet(self.sheet_path)
        rows, cols = sheet.shape[0] // _TILE, sheet.shape[1] // _TILE
        cells = sheet[: rows * _TILE, : cols * _TILE].reshape(rows, _TILE, cols, _TILE, 4)
        opaque = (cells[..., 3] == 255).all(axis=(1, 3))  # (rows, cols)
        refs = [f"r{r:03d}c{c:03d}" for r, c in zip(*np.nonzero(opaque))]
        return Catalog(("tile",), tuple(SourceItem(r, 0) for r in sorted(refs)))

    def load(self, ref: str) -> Image.Image:
        r, c = int(ref[1:4]), int(ref[5:8])
        cell = _tile_sheet(self.sheet_path)[r * _TILE : (r + 1) * _TILE, c * _TILE : (c + 1) * _TILE]
        return Image.fromarray(np.ascontiguousarray(cell[..., :3]), "RGB")


FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_PARTS = ("train", "t10k")


@functools.lru_cache(maxsize=2)
def _fashion_arrays(root: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for part in _FASHION_PARTS:
        images = gzip.decompress((Path(root) / f"{part}-images-idx3-ubyte.gz").read_bytes())
        labels = gzip.decompress((Path(root) / f"{part}-labels-idx1-ubyte.gz").read_bytes())
        n, h, w = (int.from_bytes(images[i : i + 4], "big") for i in (4, 8, 12))
        if int.from_bytes(labels[4:8], "big") != n or len(images) != 16 + n * h * w:
            raise ValueError(f"{root}/{part}-*-ubyte.gz: idx headers disagree with the file sizes")
        out[part] = (
            np.frombuffer(images, np.uint8, offset=16).reshape(n, h, w),
            np.frombuffer(labels, np.uint8, offset=8),
        )
    return out


@dataclass(frozen=True)
class FashionMnistSource:
    """Fashion-MNIST idx files; the official train and t10k parts are pooled, then split like any set."""

    root: str = FASHION_ROOT
    name: str = "fashion-mnist"

    @property
    def detail(self) -> str:
        return f"{self.root} (Debian package dataset-fashion-mnist)"

    def catalog(self) -> Catalog:
        for part in _FASHION_PARTS:
            for kind in ("images-idx3", "labels-idx1"):
                _require_path(
                    Path(self.root) / f"{part}-{kind}-ubyte.gz", self.name, "the Debian package dataset-fashion-mnist"
                )
        arrays = _fashion_arrays(self.root)
        items = [
            SourceItem(f"{part}/{i:05d}", int(label))
            for part in _FASHION_PARTS
            for i, label in enumerate(arrays[part][1])
        ]
        return Catalog(FASHION_CLASSES, tuple(items))

    def load(self, ref: str) -> Image.Image:
        part, index = ref.split("/")
        return Image.fromarray(_fashion_arrays(self.root)[part][0][int(index)], "L")


@dataclass(frozen=True)
class FolderSource:
    """Any folder (local or fsspec URL): `<class>/<...>/<image>` gives labels; a flat folder is one class."""

    root: str
    name: str = "folder"
    install_hint: str = ""  # for bundled folders: which package provides them

    @property
    def detail(self) -> str:
        return self.root + (f" ({self.install_hint})" if self.install_hint else "")

    def _fs(self):
        return storage.filesystem(self.root)

    def _image_files(self) -> dict[str, dict]:
        """{path relative to the root: fsspec info} of every image file, sorted by path."""
        fs, root = self._fs()
        root = root.rstrip("/")
        if not fs.isdir(root):
            if self.install_hint:
                raise SourceMissingError(f"source {self.name!r} needs {self.root}: install {self.install_hint}")
            raise FileNotFoundError(f"folder source {self.root}: not a folder")
        found = fs.find(root, detail=True)
        return {
            p[len(root) + 1 :]: found[p]
            for p in sorted(found)
            if p.lower().endswith(IMAGE_EXTENSIONS) and not p[len(root) + 1 :].startswith(".")
        }

    def fingerprint(self) -> dict[str, object]:
        """What the folder holds, as names, sizes and modification times of its image files: a build
        records it, so a rerun notices files added, removed, renamed or rewritten (not their pixels)."""
        hasher = hashlib.sha256()
        files = self._image_files()
        for rel, info in files.items():
            mtime = info.get("mtime", info.get("LastModified", info.get("last_modified", "")))
            hasher.update(f"{rel}\t{info.get('size')}\t{mtime}\n".encode())
        return {"files": len(files), "names_sizes_mtimes": "sha256:" + hasher.hexdigest()}

    def catalog(self) -> Catalog:
        root = self._fs()[1].rstrip("/")
        rel = list(self._image_files())
        nested = [r for r in rel if "/" in r]
        flat = [r for r in rel if "/" not in r]
        if nested and flat:
            raise ValueError(
                f"folder source {self.root}: images at the top level (e.g. {flat[0]!r}) beside class "
                f"folders (e.g. {nested[0].split('/')[0]!r}); move them into a class folder"
            )
        if flat:
            class_name = root.rsplit("/", 1)[-1] or "images"
            return Catalog((class_name,), tuple(SourceItem(r, 0) for r in flat))
        classes = sorted({r.split("/", 1)[0] for r in nested})
        label = {c: i for i, c in enumerate(classes)}
        return Catalog(tuple(classes), tuple(SourceItem(r, label[r.split("/", 1)[0]]) for r in nested))

    def load(self, ref: str) -> Image.Image:
        fs, root = self._fs()
        data = fs.cat_file(f"{root.rstrip('/')}/{ref}")
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im


def _textile_source() -> FolderSource:
    try:
        ccd = importlib.import_module("conformal_clip_data")
    except ImportError:
        raise SourceMissingError(
            "source 'textiles' needs the PyPI package conformal-clip-data: pip install conformal-clip-data"
        ) from None
    return FolderSource(str(ccd.textile_simulated_root()), name="textiles", install_hint="pip conformal-clip-data")


ImageSource = OpenClipartSource | EmojiSource | SilkIconSource | CrawlTileSource | FashionMnistSource | FolderSource


def get_source(spec: str) -> ImageSource:
    """`openclipart`, `emoji`, `icons`, `tiles`, `textiles`, `fashion-mnist` or `folder:PATH`."""
    if spec.startswith(FOLDER_PREFIX):
        path = spec[len(FOLDER_PREFIX) :]
        if not path:
            raise ValueError("source 'folder:' needs a path, e.g. folder:/data/my_images")
        return FolderSource(path, name=dataset_name(spec))
    factories = {
        "openclipart": OpenClipartSource,
        "emoji": EmojiSource,
        "icons": SilkIconSource,
        "tiles": CrawlTileSource,
        "textiles": _textile_source,
        "fashion-mnist": FashionMnistSource,
    }
    if spec not in factories:
        raise ValueError(f"unknown source {spec!r}; use one of {list(BUNDLED_SOURCES)} or folder:PATH")
    return factories[spec]()


def dataset_name(spec: str) -> str:
    """The folder name a source's shards get by default: the bundled name, or the folder's base name."""
    if spec.startswith(FOLDER_PREFIX):
        base = spec[len(FOLDER_PREFIX) :].rstrip("/").rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "folder"
    return spec


UNLISTABLE = "unavailable"  # a folder that cannot be listed now: its existing build is trusted, not rebuilt


def source_fingerprint(spec: str) -> dict[str, object] | str | None:
    """A folder source's fingerprint (FolderSource.fingerprint), UNLISTABLE when the folder is gone (shards
    built from it stay usable); None for the bundled package sources, whose files change with their package."""
    source = get_source(spec)
    if not isinstance(source, FolderSource):
        return None
    try:
        return source.fingerprint()
    except (FileNotFoundError, SourceMissingError):
        return UNLISTABLE
