"""The one place that opens image files: safe decode, RGB conversion, resize, border statistics.

Every bad file raises :class:`ImageError` with a short machine-readable ``reason``; nothing here
returns a half-decoded image. Imports nothing of cbir.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000
"""Decompression-bomb guard: images whose header claims more pixels than this are refused unread."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
"""File name endings (lower case) treated as images when scanning folders."""

MAX_FILE_BYTES = 64 * 1024 * 1024
"""Files larger than this (bytes, from ``fstat`` before reading) are refused unread."""

REASONS = ("missing", "empty", "not_a_file", "not_an_image", "truncated", "corrupt", "too_large",
           "unsupported_mode")

Size = int | tuple[int, int] | None

_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"RIFF", "RIFF/WebP"),
          (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


class ImageError(ValueError):
    """A file that cannot be used as an image.

    ``path`` names the file, ``reason`` is one of :data:`REASONS`, ``detail`` says what was found.
    """

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))


def _open(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """Decode ``data`` fully (first frame) after checking the header size; raise ImageError."""
    if len(data) == 0:
        raise ImageError(name, "empty", "0 bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(name, "too_large", str(exc)) from None
    except UnidentifiedImageError:
        head = data[:64]
        magic = next((fmt for sig, fmt in _MAGIC if data.startswith(sig)), None)
        if magic is not None:
            raise ImageError(name, "corrupt", f"{magic} signature but unreadable header") from None
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "unknown bytes"
        raise ImageError(name, "not_an_image", f"{kind}, {len(data):,} bytes") from None  # never the content
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if "truncat" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
        raise ImageError(name, reason, f"header: {exc}") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(name, "too_large",
                         f"header says {width}x{height} = {width * height:,} pixels > {max_pixels:,}")
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(name, "too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        message = str(exc) or type(exc).__name__
        reason = "truncated" if "truncat" in message.lower() or isinstance(exc, EOFError) else "corrupt"
        raise ImageError(name, reason, message) from None
    return image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to RGB: transparency composited on white, 16/32-bit scaled to 8-bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode in ("P", "PA") and ("transparency" in image.info or mode == "PA"):
        image = image.convert("RGBA")
    elif mode in ("LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(name, "unsupported_mode", f"mode {mode}: {exc}") from None


def _resize(image: Image.Image, size: Size) -> Image.Image:
    if size is None:
        return image
    target = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if image.size == target:
        return image
    return image.resize(target, Image.Resampling.BILINEAR)


def _decode(data: bytes, name: str, size: Size, max_pixels: int | None) -> tuple[np.ndarray, str]:
    image = _open(data, name, max_pixels)
    mode = image.mode
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block never makes the pixels unusable
        pass
    rgb = _resize(_to_rgb(image, name), size)
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError(name, "corrupt", f"decoded to shape {array.shape}")
    return array, mode


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _stat_problem(info: os.stat_result, limit: int) -> tuple[str, str] | None:
    """(reason, detail) when ``info`` is not a regular file of 1..``limit`` bytes, else None."""
    if not stat.S_ISREG(info.st_mode):
        return "not_a_file", f"{_kind(info.st_mode)}, not a regular file"
    if info.st_size > limit:
        return "too_large", f"{info.st_size:,} bytes > {limit:,}"
    if info.st_size == 0:
        return "empty", "0 bytes"
    return None


def check_file(path: str | os.PathLike, *, max_bytes: int | None = None) -> tuple[str | None, str]:
    """Cheap check without opening the file (``os.stat``, symlinks followed): ``(reason, detail)``,
    reason None for a regular file of 1 to ``max_bytes`` (default :data:`MAX_FILE_BYTES`) bytes, else
    ``missing``, ``not_a_file``, ``too_large`` or ``empty``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing", "no such file"
    except OSError as exc:
        return "missing", f"cannot read: {exc.strerror or exc}"
    return _stat_problem(info, MAX_FILE_BYTES if max_bytes is None else int(max_bytes)) or (None, "")


def read_file_bytes(path: str | os.PathLike, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (symlinks followed), at most ``max_bytes`` (default :data:`MAX_FILE_BYTES`).

    Opened non-blocking so a FIFO cannot hang; the type and size come from ``fstat`` on the open
    descriptor before anything is read. Raises :class:`ImageError`: ``missing`` (no such file or
    unreadable), ``not_a_file`` (directory, FIFO, device, socket), ``too_large``, ``empty`` (0 bytes).
    """
    limit = MAX_FILE_BYTES if max_bytes is None else int(max_bytes)
    try:
        fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(path, "missing", "no such file") from None
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EOPNOTSUPP):  # a socket, a device without driver
            raise ImageError(path, "not_a_file", f"cannot be opened as a file: {exc.strerror}") from None
        raise ImageError(path, "missing", f"cannot read: {exc.strerror or exc}") from None
    try:
        problem = _stat_problem(os.fstat(fd), limit)
        if problem is not None:
            raise ImageError(path, *problem)
        data = _read_at_most(fd, limit + 1)
    except OSError as exc:
        raise ImageError(path, "missing", f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ImageError(path, "too_large", f"more than {limit:,} bytes (the file grew while read)")
    if not data:
        raise ImageError(path, "empty", "0 bytes (the file shrank while read)")
    return data


def _read_at_most(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from ``fd`` (several reads: a read may return fewer bytes than asked)."""
    chunks, left = [], n
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def decode_bytes(data: bytes, *, size: Size = None, name: str = "<upload>",
                 max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (an upload) to an HxWx3 uint8 RGB array; see :func:`read_image`."""
    return _decode(bytes(data), name, size, max_pixels)[0]


def read_image(path: str | os.PathLike, *, size: Size = None, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array.

    L, LA, P, PA, CMYK, RGBA (composited on white), I;16 / I (16-bit, scaled to 8-bit) are converted
    to RGB; EXIF orientation is applied. ``size`` resizes (bilinear) to ``size x size`` or ``(w, h)``.
    The header size is checked against ``max_pixels`` before any pixel is decoded.
    Only regular files up to :data:`MAX_FILE_BYTES` are read (:func:`read_file_bytes`).
    Raises :class:`ImageError` (reason ``missing``, ``empty``, ``not_a_file``, ``not_an_image``,
    ``truncated``, ``corrupt``, ``too_large`` or ``unsupported_mode``) for every bad file.
    """
    return _decode(read_file_bytes(path), str(path), size, max_pixels)[0]


def border_stats(image: np.ndarray, *, border: int = 1, white_threshold: int = 240) -> dict[str, float]:
    """Background statistics of an HxWx3 uint8 image from its outer ``border`` pixels.

    Returns the median border colour (``border_r, border_g, border_b``, 0-255), the median border
    brightness (``border_brightness``: mean of the three channels, 0-255), the median channel spread
    (``border_spread``: max-min channel, 0 for neutral greys) and ``border_white_frac``: the share of
    border pixels whose three channels are all >= ``white_threshold``.
    """
    h, w = image.shape[:2]
    b = max(1, min(int(border), h // 2, w // 2))
    edge = np.concatenate([image[:b].reshape(-1, 3), image[h - b:].reshape(-1, 3),
                           image[b:h - b, :b].reshape(-1, 3), image[b:h - b, w - b:].reshape(-1, 3)])
    median = np.median(edge, axis=0)
    edge_i = edge.astype(np.int16)
    return {
        "border_r": float(median[0]),
        "border_g": float(median[1]),
        "border_b": float(median[2]),
        "border_brightness": float(np.median(edge_i.mean(axis=1))),
        "border_spread": float(np.median(edge_i.max(axis=1) - edge_i.min(axis=1))),
        "border_white_frac": float((edge.min(axis=1) >= white_threshold).mean()),
    }


def _size(path: str | os.PathLike) -> int | None:
    """Size in bytes of a regular file (symlinks followed), None otherwise; never opens the file."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return int(info.st_size) if stat.S_ISREG(info.st_mode) else None


def check_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS, *,
                border: int | None = None) -> tuple[str | None, dict[str, Any]]:
    """Validate one file by a full decode.

    Returns ``(problem, info)``: ``problem`` is None or an :class:`ImageError` reason; ``info`` has
    ``width``, ``height`` (pixels, from the header when known), ``mode`` (PIL mode before conversion),
    ``bytes`` (file size, also for a refused file), ``sha1`` (hex digest of the file bytes) and
    ``detail`` (the error text, never file content).
    With ``border`` set, :func:`border_stats` of the decoded image are added to ``info``.
    The file is read once; never raises for a bad image.
    """
    info: dict[str, Any] = {"width": None, "height": None, "mode": None, "bytes": None, "sha1": None, "detail": ""}
    try:
        info["bytes"] = _size(path)
        data = read_file_bytes(path)
        info["sha1"] = hashlib.sha1(data).hexdigest()
        array, mode = _decode(data, str(path), None, max_pixels)
    except ImageError as exc:
        info["detail"] = exc.detail
        return exc.reason, info
    info["height"], info["width"] = int(array.shape[0]), int(array.shape[1])
    info["mode"] = mode
    if border is not None:
        info.update(border_stats(array, border=border))
    return None, info
