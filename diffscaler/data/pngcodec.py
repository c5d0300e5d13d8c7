"""Deterministic PNG encoding and a fast batch decoder for the shards' small RGB images (and the 8-bit
grey condition maps beside them, `cond.png`).

Why not Pillow: for images this small its per-file plugin dispatch costs more than the pixels, and the
reader fell short of what one GPU needs per CPU core (bench/RESULTS.md, "Shard reading"). The shards' PNGs are
written here with one filter type for every row (None, Sub or Up, whichever compresses smallest);
those three filters undo with a wrapping cumulative sum, so a whole batch decodes with a few numpy
calls after one `zlib.decompress` per image. The files are ordinary PNGs (any decoder reads them);
anything this decoder does not recognise (interlaced, palette, Paeth rows, 16-bit) goes to Pillow.

Encoding is byte-identical across runs on one machine: fixed zlib level, no time or text chunks.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_NONE, _FILTER_SUB, _FILTER_UP = 0, 1, 2
_ZLIB_LEVEL = 9


class PngError(ValueError):
    """A PNG that cannot be decoded; the message says what is wrong with it."""


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB or (H, W) grey -> PNG bytes, one filter type for all rows, deterministic."""
    grey = image.ndim == 2
    if image.dtype != np.uint8 or not (grey or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"encode_png wants uint8 (H, W, 3) or (H, W), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    bpp = 1 if grey else 3  # bytes per pixel
    rows = image.reshape(h, w * bpp)
    sub = rows.copy()
    sub[:, bpp:] -= rows[:, :-bpp]  # uint8 arithmetic wraps mod 256, as the PNG filter does
    up = rows.copy()
    up[1:] -= rows[:-1]
    best = b""
    for ftype, filtered in ((_FILTER_NONE, rows), (_FILTER_SUB, sub), (_FILTER_UP, up)):
        raw = np.empty((h, w * bpp + 1), np.uint8)
        raw[:, 0] = ftype
        raw[:, 1:] = filtered
        packed = zlib.compress(raw.tobytes(), _ZLIB_LEVEL)
        if not best or len(packed) < len(best):  # ties keep the earlier type: deterministic
            best = packed
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if grey else 2, 0, 0, 0)  # 8-bit grey or truecolour, no interlace
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", best) + _chunk(b"IEND", b"")


_IEND_CHUNK = _chunk(b"IEND", b"")
_COLOUR_TYPE = {3: 2, 1: 0}  # bytes per pixel -> PNG colour type (truecolour, grey)
_IHDR_TAIL = {bpp: bytes([8, ctype, 0, 0, 0]) for bpp, ctype in _COLOUR_TYPE.items()}  # 8-bit, no interlace
_OWN_HEAD = PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR"  # what encode_png writes first


def _parse_own(data: bytes, bpp: int = 3) -> tuple[int, int, bytes] | None:
    """encode_png's exact layout (IHDR, one IDAT, IEND) read at fixed offsets, else None."""
    if not data.startswith(_OWN_HEAD) or data[24:29] != _IHDR_TAIL[bpp] or data[37:41] != b"IDAT":
        return None
    (length,) = struct.unpack_from(">I", data, 33)
    if len(data) != 41 + length + 4 + 12 or not data.endswith(_IEND_CHUNK):
        return None
    ihdr_crc, idat_crc = struct.unpack_from(">I", data, 29)[0], struct.unpack_from(">I", data, 41 + length)[0]
    if zlib.crc32(data[12:29]) != ihdr_crc or zlib.crc32(data[37 : 41 + length]) != idat_crc:
        return None  # the general parser names the broken chunk
    width, height = struct.unpack_from(">II", data, 16)
    try:
        raw = zlib.decompress(data[41 : 41 + length])
    except zlib.error:
        return None
    return (width, height, raw) if len(raw) == height * (width * bpp + 1) else None


def _parse_fast(data: bytes, bpp: int = 3) -> tuple[int, int, bytes] | None:
    """(width, height, inflated rows) for an 8-bit RGB (bpp 3) or grey (bpp 1) non-interlaced PNG, else None
    (use Pillow)."""
    own = _parse_own(data, bpp)
    if own is not None:
        return own
    if data[:8] != PNG_SIGNATURE:
        raise PngError("not a PNG (bad signature)")
    pos, n = 8, len(data)
    width = height = -1
    idat = []
    while pos + 8 <= n:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise PngError(f"chunk {kind!r} runs past the end of the file (truncated)")
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(kind + payload) != crc:
            raise PngError(f"chunk {kind!r} fails its CRC check (corrupt)")
        if kind == b"IHDR":
            if length != 13:
                raise PngError(f"IHDR chunk is {length} bytes, not 13 (corrupt)")
            width, height, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", payload)
            if depth != 8 or ctype != _COLOUR_TYPE[bpp] or interlace != 0:
                return None
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
        pos = end
    else:
        raise PngError("no IEND chunk (truncated)")
    if width <= 0 or not idat:
        raise PngError("no IHDR or no IDAT chunk")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        raise PngError(f"image data does not inflate: {err}") from None
    if len(raw) != height * (width * bpp + 1):
        raise PngError(
            f"image data is {len(raw)} bytes, {width}x{height} at {bpp} byte(s) per pixel needs "
            f"{height * (width * bpp + 1)}"
        )
    return width, height, raw


def _decode_pillow(data: bytes, bpp: int = 3) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB" if bpp == 3 else "L"))
    except Exception as err:  # Pillow raises many types for bad files
        raise PngError(f"Pillow cannot decode it: {err}") from None


def _unfilter(raw: np.ndarray, bpp: int = 3) -> np.ndarray | None:
    """raw (B, H, 1 + W*bpp) with one filter type per image on all rows -> (B, H, W*bpp), else None."""
    ftypes = raw[:, :, 0]  # (B, H)
    if not (ftypes == ftypes[:, :1]).all() or ftypes.max(initial=0) > _FILTER_UP:
        return None
    rows = raw[:, :, 1:]  # (B, H, W*bpp)
    out = rows.copy()
    kinds = ftypes[:, 0]
    # A running sum, one vectorised add per column or row (numpy's cumsum along a middle axis is
    # much slower here); uint8 additions wrap mod 256 exactly as PNG filters do.
    sub = np.flatnonzero(kinds == _FILTER_SUB)
    if len(sub):
        b, h, wc = out[sub].shape
        part = out[sub].reshape(b, h, wc // bpp, bpp)  # (b, H, W, bpp)
        for x in range(1, wc // bpp):  # Sub: add the pixel to the left, channel by channel
            part[:, :, x] += part[:, :, x - 1]
        out[sub] = part.reshape(b, h, wc)
    up = np.flatnonzero(kinds == _FILTER_UP)
    if len(up):
        part = out[up]
        for y in range(1, part.shape[1]):  # Up: add the row above
            part[:, y] += part[:, y - 1]
        out[up] = part
    return out


def decode_png(data: bytes, grey: bool = False) -> np.ndarray:
    """PNG bytes -> uint8 (H, W, 3) RGB, or (H, W) with `grey`. Raises PngError naming the problem."""
    return decode_png_batch([data], grey)[0]


def decode_png_batch(blobs: list[bytes], grey: bool = False) -> list[np.ndarray] | np.ndarray:
    """PNG bytes -> uint8 (B, H, W, 3) when all images share one size, else a list of (H, W, 3); with
    `grey`, (B, H, W) 8-bit grey maps (other PNGs converted to grey by Pillow).

    Raises PngError for the first image that cannot be decoded; callers that skip bad samples
    decode one by one after a batch fails.
    """
    bpp = 1 if grey else 3
    tail = () if grey else (3,)
    parsed = [_parse_fast(b, bpp) for b in blobs]
    sizes = {(p[0], p[1]) for p in parsed if p is not None}
    if all(p is not None for p in parsed) and len(sizes) == 1:
        (w, h) = sizes.pop()
        raw = np.frombuffer(b"".join(p[2] for p in parsed), np.uint8).reshape(len(blobs), h, w * bpp + 1)
        rows = _unfilter(raw, bpp)
        if rows is not None:
            return rows.reshape(len(blobs), h, w, *tail)
    images = []
    for blob, p in zip(blobs, parsed):
        if p is None:
            images.append(_decode_pillow(blob, bpp))
            continue
        w, h, raw = p
        rows = _unfilter(np.frombuffer(raw, np.uint8).reshape(1, h, w * bpp + 1), bpp)
        images.append(rows.reshape(h, w, *tail) if rows is not None else _decode_pillow(blob, bpp))
    if len({im.shape for im in images}) == 1:
        return np.stack(images)
    return images
