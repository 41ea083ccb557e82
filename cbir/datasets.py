"""The embedded synthetic demo catalogue: product silhouettes drawn with OpenCV.

:func:`make_demo_catalog` mirrors the reference study's setting on a small scale: fashion
categories ``tops`` (t-shirt, hoodie, sweatshirt, dress), ``bottoms`` (trousers, shorts, skirt),
``footwear`` (sneaker, boot, sandal) and non-fashion distractors (``electronics``: phone, tv;
``vehicles``: car; ``home``: lamp), with varied colours, patterns (plain, stripes, checks, dots,
clipped to the silhouette), sizes, small rotations and positions, mostly white and ~15% light-grey
backgrounds, saved as JPEG (quality 90) with a ``manifest.csv``. Byte-for-byte deterministic
for a seed (given the same OpenCV / libjpeg builds).
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

SUBCATEGORIES: dict[str, tuple[str, bool]] = {
    "t-shirt": ("tops", True), "hoodie": ("tops", True), "sweatshirt": ("tops", True), "dress": ("tops", True),
    "trousers": ("bottoms", True), "shorts": ("bottoms", True), "skirt": ("bottoms", True),
    "sneaker": ("footwear", True), "boot": ("footwear", True), "sandal": ("footwear", True),
    "phone": ("electronics", False), "tv": ("electronics", False),
    "car": ("vehicles", False), "lamp": ("home", False),
}
"""sub-category -> (category, is_fashion)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 32, 45), "navy": (28, 38, 92), "black": (30, 30, 34), "green": (38, 128, 62),
    "yellow": (236, 196, 42), "pink": (232, 128, 170), "grey": (128, 130, 134), "brown": (118, 74, 42),
    "beige": (214, 188, 148), "blue": (42, 110, 210), "orange": (238, 122, 34), "purple": (108, 52, 150),
    "teal": (24, 140, 140), "maroon": (120, 24, 40), "olive": (110, 112, 40),
}
"""Named product colours (RGB); none is near-white, so every product stands out from its background."""

PATTERNS = ("plain", "stripes", "checks", "dots")
_PATTERN_P = (0.4, 0.2, 0.2, 0.2)
_SECOND = {"white": (245, 245, 245), "black": (30, 30, 34), "yellow": (236, 196, 42), "red": (200, 32, 45),
           "navy": (28, 38, 92), "beige": (214, 188, 148)}
_DEVICE_COLOURS = {"black": (30, 30, 34), "silver": (180, 184, 190), "gold": (210, 178, 120),
                   "navy": (28, 38, 92), "grey": (128, 130, 134)}
_DARK = (28, 28, 30)
_LIGHT = (236, 236, 232)
_GREY_BACKGROUND_P = 0.15
_MANIFEST_COLUMNS = ["image", "category", "subcategory", "is_fashion", "product_id", "colour", "pattern",
                     "background"]

# A part is (kind, points (N,2) in unit coordinates, role, thickness): kind "poly" (filled) or "line";
# role "body" (colour + pattern), "trim" (darker body colour), "dark", "light" or an RGB tuple.
Part = tuple[str, np.ndarray, object, float]


def _pts(*xy: float) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64).reshape(-1, 2)


def _mirror(left: np.ndarray) -> np.ndarray:
    """Close a left half-outline (from top centre to bottom centre) with its mirror image about x=0.5."""
    right = left[::-1].copy()
    right[:, 0] = 1.0 - right[:, 0]
    return np.concatenate([left, right[1:-1]])


def _ellipse(cx: float, cy: float, rx: float, ry: float, start: float = 0, end: float = 360,
             n: int = 36) -> np.ndarray:
    """Points on an ellipse arc from ``start`` to ``end`` degrees (y down, so 90 is the bottom)."""
    t = np.deg2rad(np.linspace(start, end, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return _pts(x0, y0, x1, y0, x1, y1, x0, y1)


def _rounded_rect(x0: float, y0: float, x1: float, y1: float, r: float) -> np.ndarray:
    corners = [(x1 - r, y0 + r, 270, 360), (x1 - r, y1 - r, 0, 90),
               (x0 + r, y1 - r, 90, 180), (x0 + r, y0 + r, 180, 270)]
    return np.concatenate([_ellipse(cx, cy, r, r, a, b, 8) for cx, cy, a, b in corners])


def _neck_arc(half: float, top: float, depth: float) -> np.ndarray:
    """Left half of a neckline from the centre (0.5, top+depth) up to (0.5-half, top)."""
    t = np.linspace(0.5 * np.pi, np.pi, 6)
    return np.stack([0.5 + half * np.cos(t), top + depth * np.sin(t)], axis=1)


def _neckline(half: float, top: float, depth: float) -> np.ndarray:
    """A full neckline polyline from (0.5-half, top) through the centre to (0.5+half, top)."""
    left = _neck_arc(half, top, depth)
    right = left.copy()
    right[:, 0] = 1.0 - right[:, 0]
    return np.concatenate([left[::-1], right[1:]])


def _t_shirt(rng: np.random.Generator) -> list[Part]:
    w, sl = rng.uniform(0.19, 0.23), rng.uniform(0.11, 0.16)
    left = np.concatenate([_neck_arc(0.09, 0.12, 0.08), _pts(
        0.30, 0.15, 0.30 - sl, 0.31, 0.30 - sl * 0.55, 0.42, 0.5 - w, 0.35, 0.5 - w, 0.88, 0.5, 0.88)])
    return [("poly", _mirror(left), "body", 0), ("line", _neckline(0.09, 0.12, 0.08), "trim", 0.018)]


def _long_sleeved(rng: np.random.Generator, neck_depth: float) -> tuple[np.ndarray, list[Part]]:
    w = rng.uniform(0.18, 0.21)
    cuff = rng.uniform(0.76, 0.82)
    left = np.concatenate([_neck_arc(0.085, 0.12, neck_depth), _pts(
        0.31, 0.14, 0.19, 0.24, 0.09, cuff, 0.19, cuff + 0.02, 0.5 - w, 0.36, 0.5 - w, 0.88, 0.5, 0.88)])
    bands = []
    for side in (0, 1):
        band = _pts(0.0905, cuff - 0.055, 0.1805, cuff - 0.035, 0.19, cuff + 0.02, 0.09, cuff)
        if side:
            band[:, 0] = 1.0 - band[:, 0]
        bands.append(("poly", band, "trim", 0))
    bands.append(("poly", _rect(0.5 - w, 0.83, 0.5 + w, 0.88), "trim", 0))
    return _mirror(left), bands


def _sweatshirt(rng: np.random.Generator) -> list[Part]:
    body, bands = _long_sleeved(rng, 0.05)
    return [("poly", body, "body", 0), *bands, ("line", _neckline(0.085, 0.12, 0.05), "trim", 0.03)]


def _hoodie(rng: np.random.Generator) -> list[Part]:
    body, bands = _long_sleeved(rng, 0.09)
    hood = _ellipse(0.5, 0.10, 0.14, 0.11)
    opening = _ellipse(0.5, 0.125, 0.075, 0.07)
    pocket = _pts(0.38, 0.58, 0.62, 0.58, 0.67, 0.77, 0.33, 0.77, 0.38, 0.58)
    strings = [("line", _pts(0.46, 0.2, 0.45, 0.38), "light", 0.012),
               ("line", _pts(0.54, 0.2, 0.55, 0.38), "light", 0.012)]
    return [("poly", hood, "body", 0), ("poly", body, "body", 0), ("poly", opening, "dark", 0), *bands,
            ("line", pocket, "trim", 0.02), *strings]


def _dress(rng: np.random.Generator) -> list[Part]:
    flare, waist = rng.uniform(0.28, 0.40), rng.uniform(0.38, 0.46)
    left = np.concatenate([_neck_arc(0.07, 0.06, 0.08), _pts(0.38, 0.06, 0.35, 0.20, 0.39, waist),
                           _ellipse(0.5, 0.86, flare, 0.06, 180, 90, 8)])
    belt = _rect(0.385, waist - 0.012, 0.615, waist + 0.025)
    return [("poly", _mirror(left), "body", 0), ("poly", belt, "trim", 0)]


def _trousers(rng: np.random.Generator) -> list[Part]:
    w, gap = rng.uniform(0.18, 0.21), rng.uniform(0.02, 0.05)
    left = _pts(0.5, 0.08, 0.5 - w, 0.08, 0.5 - w - 0.04, 0.95, 0.5 - gap, 0.95, 0.5, 0.36)
    return [("poly", _mirror(left), "body", 0), ("poly", _rect(0.5 - w, 0.08, 0.5 + w, 0.13), "trim", 0),
            ("line", _pts(0.5, 0.13, 0.5, 0.3), "trim", 0.012)]


def _shorts(rng: np.random.Generator) -> list[Part]:
    w, flare = rng.uniform(0.24, 0.28), rng.uniform(0.05, 0.09)
    left = _pts(0.5, 0.20, 0.5 - w, 0.20, 0.5 - w - flare, 0.68, 0.445, 0.76, 0.5, 0.43)
    return [("poly", _mirror(left), "body", 0), ("poly", _rect(0.5 - w, 0.20, 0.5 + w, 0.26), "trim", 0),
            ("line", _pts(0.5, 0.26, 0.5, 0.42), "trim", 0.012)]


def _skirt(rng: np.random.Generator) -> list[Part]:
    top, bottom = rng.uniform(0.13, 0.16), rng.uniform(0.28, 0.34)
    outline = np.concatenate([_pts(0.5 - top, 0.2, 0.5 + top, 0.2), _ellipse(0.5, 0.78, bottom, 0.05, 0, 180, 12)])
    parts: list[Part] = [("poly", outline, "body", 0), ("poly", _rect(0.5 - top, 0.2, 0.5 + top, 0.25), "trim", 0)]
    if rng.random() < 0.5:  # pleats
        for f in np.linspace(-0.6, 0.6, 5):
            parts.append(("line", _pts(0.5 + f * top, 0.25, 0.5 + f * bottom, 0.80), "trim", 0.01))
    return parts


def _sneaker(rng: np.random.Generator) -> list[Part]:
    collar = rng.uniform(0.36, 0.42)
    upper = _pts(0.12, 0.70, 0.11, 0.52, 0.15, collar, 0.30, collar + 0.05, 0.42, collar - 0.02,
                 0.50, collar + 0.06, 0.80, 0.55, 0.90, 0.62, 0.91, 0.70)
    sole = _pts(0.09, 0.68, 0.93, 0.68, 0.94, 0.73, 0.90, 0.78, 0.10, 0.78)
    laces = [("line", _pts(0.44 + 0.07 * i, collar + 0.02 + 0.035 * i, 0.50 + 0.07 * i, collar + 0.08 + 0.035 * i),
              "light", 0.014) for i in range(4)]
    stripe = ("line", _pts(0.22, 0.62, 0.40, 0.54, 0.62, 0.63), "light", 0.03)
    return [("poly", upper, "body", 0), ("poly", sole, "light", 0), stripe, *laces]


def _boot(rng: np.random.Generator) -> list[Part]:
    top = rng.uniform(0.08, 0.16)
    shaft = _pts(0.22, top, 0.50, top, 0.53, 0.52, 0.80, 0.62, 0.90, 0.70, 0.90, 0.77, 0.20, 0.77)
    sole = _pts(0.18, 0.77, 0.92, 0.77, 0.92, 0.82, 0.18, 0.82)
    heel = _rect(0.19, 0.82, 0.33, 0.90)
    return [("poly", shaft, "body", 0), ("poly", _rect(0.215, top, 0.505, top + 0.06), "trim", 0),
            ("poly", sole, "dark", 0), ("poly", heel, "dark", 0)]


def _sandal(rng: np.random.Generator) -> list[Part]:
    tan = tuple(int(v) for v in rng.integers([170, 120, 70], [220, 170, 120]))
    bed = np.concatenate([_ellipse(0.5, 0.30, 0.17, 0.22, 180, 360, 18), _ellipse(0.5, 0.66, 0.13, 0.26, 0, 180, 18)])
    straps = [("poly", _pts(0.31, 0.30, 0.69, 0.30, 0.70, 0.40, 0.30, 0.40), "body", 0),
              ("poly", _pts(0.35, 0.58, 0.65, 0.58, 0.66, 0.66, 0.34, 0.66), "body", 0)]
    if rng.random() < 0.5:  # toe post (flip-flop style)
        straps.append(("line", _pts(0.5, 0.16, 0.5, 0.30), "body", 0.03))
    return [("poly", bed, tan, 0), ("line", np.concatenate([bed, bed[:1]]), "trim", 0.012), *straps]


def _phone(rng: np.random.Generator) -> list[Part]:
    screen = tuple(int(v) for v in rng.integers([10, 20, 40], [40, 70, 110]))
    return [("poly", _rounded_rect(0.32, 0.06, 0.68, 0.94, 0.06), "body", 0),
            ("poly", _rounded_rect(0.345, 0.12, 0.655, 0.86, 0.02), screen, 0),
            ("poly", _ellipse(0.5, 0.09, 0.012, 0.012, n=12), "dark", 0),
            ("line", _pts(0.45, 0.90, 0.55, 0.90), "light", 0.012)]


def _tv(rng: np.random.Generator) -> list[Part]:
    sky = tuple(int(v) for v in rng.integers([60, 120, 180], [140, 190, 250]))
    land = tuple(int(v) for v in rng.integers([30, 110, 30], [90, 170, 90]))
    hill = np.concatenate([_pts(0.09, 0.67), _ellipse(0.35, 0.62, 0.30, 0.12, 180, 360, 12),
                           _pts(0.91, 0.55, 0.91, 0.67)])
    hill[:, 0] = np.clip(hill[:, 0], 0.09, 0.91)
    return [("poly", _rect(0.06, 0.14, 0.94, 0.70), "body", 0), ("poly", _rect(0.09, 0.17, 0.91, 0.67), sky, 0),
            ("poly", hill, land, 0), ("poly", _rect(0.46, 0.70, 0.54, 0.80), "trim", 0),
            ("poly", _rect(0.30, 0.80, 0.70, 0.84), "trim", 0)]


def _car(rng: np.random.Generator) -> list[Part]:
    roof = rng.uniform(0.30, 0.38)
    body = _pts(0.05, 0.70, 0.05, 0.56, 0.10, 0.52, 0.27, 0.50, 0.37, roof, 0.66, roof, 0.77, 0.50,
                0.92, 0.53, 0.95, 0.60, 0.95, 0.70)
    windows = [("poly", _pts(0.31, 0.50, 0.39, roof + 0.03, 0.50, roof + 0.03, 0.50, 0.50), (170, 205, 230), 0),
               ("poly", _pts(0.53, 0.50, 0.53, roof + 0.03, 0.645, roof + 0.03, 0.72, 0.50), (170, 205, 230), 0)]
    wheels = []
    for cx in (0.25, 0.75):
        wheels += [("poly", _ellipse(cx, 0.70, 0.09, 0.09), "dark", 0),
                   ("poly", _ellipse(cx, 0.70, 0.04, 0.04), "light", 0)]
    light = ("poly", _ellipse(0.91, 0.57, 0.02, 0.015, n=12), (250, 220, 90), 0)
    return [("poly", body, "body", 0), *windows, *wheels, light]


def _lamp(rng: np.random.Generator) -> list[Part]:
    wide = rng.uniform(0.22, 0.28)
    shade = _pts(0.38, 0.10, 0.62, 0.10, 0.5 + wide, 0.40, 0.5 - wide, 0.40)
    return [("line", _pts(0.5, 0.40, 0.5, 0.86), "dark", 0.025), ("poly", shade, "body", 0),
            ("poly", _ellipse(0.5, 0.87, 0.16, 0.04), "dark", 0)]


_DRAW: dict[str, Callable[[np.random.Generator], list[Part]]] = {
    "t-shirt": _t_shirt, "hoodie": _hoodie, "sweatshirt": _sweatshirt, "dress": _dress, "trousers": _trousers,
    "shorts": _shorts, "skirt": _skirt, "sneaker": _sneaker, "boot": _boot, "sandal": _sandal,
    "phone": _phone, "tv": _tv, "car": _car, "lamp": _lamp,
}
_FLIPPABLE = {"sneaker", "boot", "car"}


def _pattern(kind: str, size: int, colour: np.ndarray, second: np.ndarray, angle: float, period: float,
             rng: np.random.Generator) -> np.ndarray:
    """An HxWx3 float fill: plain, stripes, checks (two crossing stripe sets) or dots, rotated by ``angle``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    if kind == "plain":
        mix = np.zeros((size, size), np.float32)
    elif kind == "stripes":
        mix = ((u / period) % 1.0 < rng.uniform(0.35, 0.5)).astype(np.float32)
    elif kind == "checks":
        a, b = (u / period) % 1.0 < 0.5, (v / period) % 1.0 < 0.5
        mix = 0.5 * a + 0.5 * b
    else:  # dots
        r = period * rng.uniform(0.2, 0.3)
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        mix = np.clip(r + 0.5 - np.sqrt(du * du + dv * dv), 0, 1)
    return colour * (1 - mix[..., None]) + second * mix[..., None]


def _render(subcategory: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str, str]:
    """One product image (size x size x 3 uint8) and its colour, pattern and background names."""
    import cv2

    fashion = SUBCATEGORIES[subcategory][1]
    palette = COLOURS if subcategory in ("car", "lamp") or fashion else _DEVICE_COLOURS
    colour_name = list(palette)[rng.integers(len(palette))]
    colour = np.asarray(palette[colour_name], np.float32)
    pattern = PATTERNS[rng.choice(len(PATTERNS), p=_PATTERN_P)] if fashion else "plain"
    second_name = [k for k in _SECOND if k != colour_name][rng.integers(len(_SECOND) - 1)]
    second = np.asarray(_SECOND[second_name], np.float32)
    grey = rng.random() < _GREY_BACKGROUND_P
    background = "grey" if grey else "white"
    bg_level = rng.uniform(214, 232) if grey else rng.uniform(251, 255)

    parts = _DRAW[subcategory](rng)
    if subcategory in _FLIPPABLE and rng.random() < 0.5:
        parts = [(k, np.column_stack([1.0 - p[:, 0], p[:, 1]]), role, t) for k, p, role, t in parts]
    allpts = np.concatenate([p for _, p, _, _ in parts])
    lo, hi = allpts.min(0), allpts.max(0)
    fill = rng.uniform(0.62, 0.86) * size
    scale = fill / (hi - lo).max() * rng.uniform(0.92, 1.08, size=2)
    theta = np.deg2rad(rng.uniform(-10, 10))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    room = (size - fill) / 2 * 0.8
    centre = size / 2 + rng.uniform(-room, room, size=2)

    def to_pixels(p: np.ndarray) -> np.ndarray:
        return ((p - (lo + hi) / 2) * scale) @ rot.T + centre

    shade_dir = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    shade = (1.0 + 0.12 * (xx * np.cos(shade_dir) + yy * np.sin(shade_dir)))[..., None]
    fill_img = _pattern(pattern, size, colour, second, theta + rng.choice([0, np.pi / 4, np.pi / 2]),
                        rng.uniform(0.06, 0.1) * fill, rng) * shade
    trim = colour * 0.7
    roles = {"trim": trim, "dark": np.asarray(_DARK, np.float32), "light": np.asarray(_LIGHT, np.float32)}

    canvas = np.full((size, size, 3), bg_level, np.float32)
    mask = np.zeros((size, size), np.uint8)
    shift = 4
    for kind, points, role, thickness in parts:
        pix = np.round(to_pixels(points) * (1 << shift)).astype(np.int32)
        width = max(1, int(round(thickness * fill)))
        pad = width + 2
        x0, y0 = np.clip(pix.min(0) // (1 << shift) - pad, 0, size)
        x1, y1 = np.clip(pix.max(0) // (1 << shift) + pad + 1, 0, size)
        if x1 <= x0 or y1 <= y0:
            continue
        mask[y0:y1, x0:x1] = 0
        if kind == "poly":
            cv2.fillPoly(mask, [pix], 255, cv2.LINE_AA, shift)
        else:
            cv2.polylines(mask, [pix], False, 255, width, cv2.LINE_AA, shift)
        box = (slice(y0, y1), slice(x0, x1))
        alpha = (mask[box].astype(np.float32) / 255.0)[..., None]
        if role == "body":
            paint = fill_img[box]
        elif isinstance(role, tuple):
            paint = np.asarray(role, np.float32) * shade[box]
        else:
            paint = roles[role] * shade[box]
        canvas[box] = canvas[box] * (1 - alpha) + paint * alpha
    noise = rng.random(size=canvas.shape, dtype=np.float32) + rng.random(size=canvas.shape, dtype=np.float32)
    canvas += (noise - np.float32(1.0)) * np.float32(3.0)  # triangular noise, sd ~1.2 grey levels
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, colour_name, pattern, background


def make_demo_catalog(out_dir: str | os.PathLike, *, n: int = 360, seed: int = 0, size: int = 224) -> Path:
    """Write ``n`` synthetic product photos (``images/<product_id>.jpg``, JPEG quality 90, size x size)
    and ``manifest.csv`` (image, category, subcategory, is_fashion, product_id, colour, pattern,
    background) under ``out_dir``; returns the manifest path.

    Sub-categories are balanced (counts differ by at most one), in a seeded random order.
    The output is byte-for-byte identical for the same ``n``, ``seed`` and ``size``.
    """
    from PIL import Image

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = list(SUBCATEGORIES)
    order = np.random.default_rng(seed).permutation(np.resize(np.arange(len(names)), n))
    rows = []
    for i, label in enumerate(order):
        sub = names[int(label)]
        image, colour, pattern, background = _render(sub, np.random.default_rng([seed, i]), size)
        product_id = 100001 + i
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        (out / "images" / f"{product_id}.jpg").write_bytes(buffer.getvalue())
        category, fashion = SUBCATEGORIES[sub]
        rows.append((f"images/{product_id}.jpg", category, sub, fashion, product_id, colour, pattern, background))
    manifest = out / "manifest.csv"
    tmp = out / f".manifest-{os.getpid()}.csv"
    pd.DataFrame(rows, columns=_MANIFEST_COLUMNS).to_csv(tmp, index=False)
    os.replace(tmp, manifest)
    return manifest


def resolve_catalog(spec: str | os.PathLike, out_dir: str | os.PathLike, *, n: int = 360, seed: int = 0) -> Path:
    """``"demo"`` -> the manifest of ``<out_dir>/demo_catalog/`` (generated once, then reused);
    anything else -> ``Path(spec)`` unchanged. Safe when several processes resolve at once."""
    if str(spec) != "demo":
        return Path(spec)
    out = Path(out_dir)
    target = out / "demo_catalog"
    manifest = target / "manifest.csv"
    if manifest.is_file():
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a folder without manifest: fill it in place
        return make_demo_catalog(target, n=n, seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix=".demo_catalog-", dir=out))
    try:
        make_demo_catalog(tmp, n=n, seed=seed)
        os.rename(tmp, target)
    except OSError:
        if not manifest.is_file():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest
