"""cbir.images: safe decode, mode conversion to RGB, bad-file reasons, border statistics."""
from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import within
from PIL import Image

import cbir.images
from cbir.images import ImageError, border_stats, check_image, decode_bytes, read_file_bytes, read_image


def _jpeg_bytes(seed: int = 0, shape: tuple[int, int] = (48, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but whose pixel data is 10 zero bytes (cheap bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
            + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------ mode conversion


def test_greyscale_l_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    rgb = read_image(tmp_path / "g.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], grey)


def test_palette_image_maps_through_palette(tmp_path: Path) -> None:
    index = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9))
    image.save(tmp_path / "p.png")
    rgb = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(rgb[0, 1], [0, 255, 0])
    np.testing.assert_array_equal(rgb[1, 0], [10, 20, 30])


def test_cmyk_converts_with_pil_formula(tmp_path: Path) -> None:
    # R = (255 - K) * (255 - C) / 255, etc.: pure cyan -> (0, 255, 255), K=255 -> black, 0 -> white
    cmyk = np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    rgb = read_image(tmp_path / "c.tif")
    np.testing.assert_array_equal(rgb[0], [[0, 255, 255], [0, 0, 0], [255, 255, 255]])


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = read_image(tmp_path / "a.png").astype(int)
    np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])  # fully transparent red -> white
    np.testing.assert_array_equal(rgb[0, 1], [0, 0, 255])
    assert np.all(np.abs(rgb[0, 2] - 127) <= 1)  # half-transparent black on white ~ 255 * 127/255


def test_la_and_transparent_palette(tmp_path: Path) -> None:
    la = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[0], [[255, 255, 255], [0, 0, 0]])
    index = np.array([[0, 1]], dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.save(tmp_path / "pt.png", transparency=0)
    np.testing.assert_array_equal(read_image(tmp_path / "pt.png")[0], [[255, 255, 255], [0, 255, 0]])


def test_16_bit_greyscale_scaled_to_8_bit(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 257 * 200 + 100]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode in ("I;16", "I")
    rgb = read_image(tmp_path / "i16.png")
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 100, 255, 200])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_one_bit_image(tmp_path: Path) -> None:
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[0], [[255, 255, 255], [0, 0, 0]])


def test_resize_int_and_tuple(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(_jpeg_bytes())
    assert read_image(tmp_path / "x.jpg").shape == (48, 64, 3)
    assert read_image(tmp_path / "x.jpg", size=32).shape == (32, 32, 3)
    assert read_image(tmp_path / "x.jpg", size=(40, 20)).shape == (20, 40, 3)


def test_resize_uses_bilinear_on_constant_image(tmp_path: Path) -> None:
    Image.new("RGB", (30, 10), (12, 200, 77)).save(tmp_path / "c.png")
    out = read_image(tmp_path / "c.png", size=7)
    assert np.all(out == np.array([12, 200, 77], dtype=np.uint8))


def test_exif_orientation_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    image.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (40, 20, 3)


def test_decode_bytes_matches_read_image(tmp_path: Path) -> None:
    data = _jpeg_bytes(3)
    (tmp_path / "u.jpg").write_bytes(data)
    np.testing.assert_array_equal(decode_bytes(data, size=16), read_image(tmp_path / "u.jpg", size=16))
    with pytest.raises(ImageError) as err:
        decode_bytes(b"not an image at all", name="upload.jpg")
    assert err.value.reason == "not_an_image" and "upload.jpg" in str(err.value)


# ------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty"),
        ("truncated.jpg", _jpeg_bytes()[:600], "truncated"),
        ("truncated_scan.jpg", _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "truncated"),
        ("corrupt.jpg", _jpeg_bytes()[:4] + bytes(range(200)) * 5, "corrupt"),
        ("text.jpg", b"this is a text file, not a photo\n", "not_an_image"),
        ("bomb_pil.png", _png_header_only(50_000, 50_000), "too_large"),
        ("bomb_guard.png", _png_header_only(8_000, 8_000), "too_large"),
    ],
)
def test_bad_files_raise_image_error_with_reason(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        read_image(path)
    assert err.value.reason == reason
    assert err.value.path == str(path) and name in str(err.value)
    problem, info = check_image(path)
    assert problem == reason
    assert info["bytes"] == len(content)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as err:
        read_image(tmp_path / "nope.jpg")
    assert err.value.reason == "missing"
    assert check_image(tmp_path / "nope.jpg")[0] == "missing"


def test_bomb_guard_checks_header_before_decoding(tmp_path: Path) -> None:
    # 64 Mpx claimed with 10 bytes of pixel data: decoding would fail as truncated/corrupt, so
    # "too_large" proves the header check runs first; a higher limit lets the decoder see the lie.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(8_000, 8_000))
    with pytest.raises(ImageError) as err:
        read_image(path)
    assert err.value.reason == "too_large" and "8000x8000" in err.value.detail
    with pytest.raises(ImageError) as err:
        read_image(path, max_pixels=100_000_000)
    assert err.value.reason in ("truncated", "corrupt")
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 100)).save(small)
    assert check_image(small, max_pixels=9_999)[0] == "too_large"
    assert check_image(small, max_pixels=10_000)[0] is None


def test_check_image_info(tmp_path: Path) -> None:
    data = _jpeg_bytes(5)
    path = tmp_path / "ok.jpg"
    path.write_bytes(data)
    problem, info = check_image(path)
    assert problem is None
    assert (info["width"], info["height"], info["mode"], info["bytes"]) == (64, 48, "RGB", len(data))
    assert info["sha1"] == hashlib.sha1(data).hexdigest()
    Image.new("L", (7, 3), 9).save(tmp_path / "l.png")
    assert check_image(tmp_path / "l.png")[1]["mode"] == "L"


def test_read_file_bytes_reads_regular_files_and_follows_links(tmp_path: Path) -> None:
    data = _jpeg_bytes(4)
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    assert read_file_bytes(tmp_path / "a.jpg") == data and read_file_bytes(str(tmp_path / "link.jpg")) == data
    assert cbir.images.MAX_FILE_BYTES == 64 * 1024 * 1024
    with pytest.raises(ImageError) as err:
        read_file_bytes(tmp_path / "nope.jpg")
    assert err.value.reason == "missing" and "nope.jpg" in str(err.value)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError) as err:
        read_file_bytes(tmp_path / "empty.jpg")
    assert err.value.reason == "empty"


def test_fifo_is_not_a_file_and_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)  # no writer: a blocking open or read would hang forever
    with pytest.raises(ImageError) as err:
        within(10, read_file_bytes, fifo)
    assert err.value.reason == "not_a_file" and "x.jpg" in str(err.value) and "FIFO" in err.value.detail
    with pytest.raises(ImageError) as err:
        within(10, read_image, fifo)
    assert err.value.reason == "not_a_file"
    assert within(10, check_image, fifo)[0] == "not_a_file"


def test_device_and_directory_are_not_files(tmp_path: Path) -> None:
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # endless: reading it would exhaust memory
    with pytest.raises(ImageError) as err:
        within(10, read_image, tmp_path / "zero.jpg")
    assert err.value.reason == "not_a_file" and "character device" in err.value.detail
    (tmp_path / "dir.jpg").mkdir()
    problem, info = check_image(tmp_path / "dir.jpg")
    assert problem == "not_a_file" and "directory" in info["detail"]


def test_too_large_file_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jpeg_bytes(6)
    path = tmp_path / "big.jpg"
    path.write_bytes(data)
    reads: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(ImageError) as err:
        read_file_bytes(path, max_bytes=len(data) - 1)
    assert err.value.reason == "too_large" and f"{len(data):,} bytes" in err.value.detail and reads == []
    assert read_file_bytes(path, max_bytes=len(data)) == data
    monkeypatch.setattr(cbir.images, "MAX_FILE_BYTES", 100)
    problem, info = check_image(path)
    assert problem == "too_large" and info["bytes"] == len(data) and info["sha1"] is None
    with pytest.raises(ImageError, match="too_large"):
        read_image(path)


def test_not_an_image_detail_copies_no_content(tmp_path: Path) -> None:
    path = tmp_path / "secret.jpg"
    path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    problem, info = check_image(path)
    assert problem == "not_an_image" and info["detail"] == "text, 32 bytes"
    path.write_bytes(b"\x00\x01secret-binary")
    problem, info = check_image(path)
    assert problem == "not_an_image" and info["detail"] == "unknown bytes, 15 bytes"
    with pytest.raises(ImageError) as err:
        read_image(path)
    assert "secret-binary" not in str(err.value) and err.value.reason == "not_an_image"


# ------------------------------------------------------------------------------------------ borders


def test_border_stats_hand_computed() -> None:
    image = np.full((6, 6, 3), 255, np.uint8)
    image[0] = (200, 180, 160)  # top row: 6 of the 20 border pixels are not white
    image[2:4, 2:4] = 0  # interior is ignored
    stats = border_stats(image)
    assert stats["border_white_frac"] == pytest.approx(14 / 20)
    assert (stats["border_r"], stats["border_g"], stats["border_b"]) == (255, 255, 255)
    assert stats["border_brightness"] == 255 and stats["border_spread"] == 0
    grey = np.full((10, 10, 3), 220, np.uint8)
    stats = border_stats(grey, border=2)
    assert stats["border_white_frac"] == 0 and stats["border_brightness"] == 220
    assert border_stats(grey, white_threshold=220)["border_white_frac"] == 1.0
