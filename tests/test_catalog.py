"""cbir.catalog: the three layouts, per-file validation, errors, report, splits and folds."""
from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import within
from PIL import Image, features

import cbir.images
from cbir.catalog import (Catalog, CatalogError, background_stats, check_catalog_report, cross_validation_folds,
                          load_catalog, read_table, split_queries)


def _photo(path: Path, seed: int, *, size: tuple[int, int] = (40, 32), mode: str = "RGB",
           fmt: str | None = None) -> Path:
    """A small random image (unique per seed) written to ``path``."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode in ("L", "P"):
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        if mode == "P":
            image = image.convert("P")
    else:
        channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
        image = Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)
    image.save(path, format=fmt)
    return path


def _jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def _manifest(root: Path, rows: list[tuple], columns: tuple[str, ...] = ("image", "category", "subcategory")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "manifest.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_layout(tmp_path: Path) -> None:
    root = tmp_path / "shop"
    for i, name in enumerate(["a.jpg", "b.jpg", "c.png"]):
        _photo(root / "imgs" / name, i)
    manifest = _manifest(root, [("imgs/a.jpg", "Apparel", "Tshirts", "red"),
                                ("imgs/b.jpg", "Apparel", "Shirts", "blue"),
                                ("imgs/c.png", "Footwear", "Boots", "black")],
                         ("image", "category", "subcategory", "colour"))
    catalog = load_catalog(manifest, progress=False)
    assert catalog.source == "manifest" and catalog.root == root.absolute()
    assert catalog.ids.tolist() == ["a", "b", "c"]
    assert catalog.df["path"].tolist() == [str((root / "imgs" / n).absolute()) for n in ("a.jpg", "b.jpg", "c.png")]
    assert catalog.df["colour"].tolist() == ["red", "blue", "black"]
    assert catalog.df["is_fashion"].tolist() == [True, True, True]
    assert catalog.df[["width", "height"]].to_numpy().tolist() == [[40, 32]] * 3
    assert catalog.df["sha1"].iloc[0] == hashlib.sha1((root / "imgs/a.jpg").read_bytes()).hexdigest()
    assert catalog.df["dup_group"].isna().all() and len(catalog.problems) == 0
    assert len(catalog) == 3 and len(catalog.usable()) == 3
    # the folder holding manifest.csv is the same catalogue
    again = load_catalog(root, progress=False)
    pd.testing.assert_frame_equal(again.df, catalog.df)


def test_manifest_ids_from_columns_and_collisions(tmp_path: Path) -> None:
    root = tmp_path / "m"
    _photo(root / "x" / "1.jpg", 1)
    _photo(root / "y" / "1.jpg", 2)
    rows = [("x/1.jpg", "A", "a"), ("y/1.jpg", "A", "a")]
    assert load_catalog(_manifest(root, rows), validate=False).ids.tolist() == ["x/1", "y/1"]  # stems collide
    with_pid = [r + (pid, flag) for r, pid, flag in zip(rows, ["0042", "0043"], ["False", "yes"])]
    columns = ("image", "category", "subcategory", "product_id", "is_fashion")
    catalog = load_catalog(_manifest(root, with_pid, columns), validate=False)
    assert catalog.ids.tolist() == ["0042", "0043"]  # str, leading zeros kept
    assert catalog.df["is_fashion"].tolist() == [False, True]
    same_pid = [r + ("7",) for r in rows]  # one product, two photos: ids fall back to the paths
    assert load_catalog(_manifest(root, same_pid, ("image", "category", "subcategory", "product_id")),
                        validate=False).ids.tolist() == ["x/1", "y/1"]
    with_id = [r + (i,) for r, i in zip(rows, ["first", "second"])]
    assert load_catalog(_manifest(root, with_id, ("image", "category", "subcategory", "image_id")),
                        validate=False).ids.tolist() == ["first", "second"]


def test_manifest_errors_name_column_and_rows(tmp_path: Path) -> None:
    root = tmp_path / "e"
    with pytest.raises(CatalogError, match=r"missing required column\(s\) 'subcategory'"):
        load_catalog(_manifest(root, [("a.jpg", "A")], ("image", "category")))
    rows = [("a.jpg", "A", "a"), ("b.jpg", "A", ""), ("c.jpg", "A", "c"), ("d.jpg", "A", "  ")]
    with pytest.raises(CatalogError, match=r"empty 'subcategory' in row\(s\) \(file lines\) 3, 5$"):
        load_catalog(_manifest(root, rows))
    rows = [("a.jpg", "A", "a"), ("b.jpg", None, "b")]
    with pytest.raises(CatalogError, match=r"empty 'category' .* 3$"):
        load_catalog(_manifest(root, rows))
    rows = [("a.jpg", "A", "a", "k"), ("b.jpg", "A", "b", "k")]
    with pytest.raises(CatalogError, match=r"'image_id' values are not unique.*2, 3"):
        load_catalog(_manifest(root, rows, ("image", "category", "subcategory", "image_id")))
    rows = [("a.jpg", "A", "a", "maybe")]
    with pytest.raises(CatalogError, match="is_fashion"):
        load_catalog(_manifest(root, rows, ("image", "category", "subcategory", "is_fashion")))
    with pytest.raises(FileNotFoundError):
        load_catalog(tmp_path / "nowhere")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CatalogError, match="no manifest.csv"):
        load_catalog(tmp_path / "emptydir")


@pytest.fixture()
def bad_catalog(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A manifest mixing good images, every kind of bad file, duplicates and paths outside the root."""
    root = tmp_path / "bad"
    img = root / "images"
    good = _jpeg_bytes(1)
    img.mkdir(parents=True)
    (img / "good1.jpg").write_bytes(good)
    (img / "dup1.jpg").write_bytes(good)
    (img / "dup2.jpg").write_bytes(good)
    (img / "good2.jpg").write_bytes(_jpeg_bytes(2))
    (img / "empty.jpg").write_bytes(b"")
    (img / "empty2.jpg").write_bytes(b"")  # byte-identical to empty.jpg, but a problem, not a duplicate
    (img / "trunc.jpg").write_bytes(_jpeg_bytes(3)[:len(_jpeg_bytes(3)) // 2])
    (img / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (img / "text.jpg").write_text("size,colour\nM,red\n")
    (img / "bomb.png").write_bytes(_png_bomb(50_000, 50_000))
    _photo(img / "grey.jpg", 10, mode="L")
    _photo(img / "cmyk.jpg", 11, mode="CMYK")
    _photo(img / "alpha.png", 12, mode="RGBA")
    _photo(img / "deep.png", 13, mode="I;16")
    _photo(img / "pal.png", 14, mode="P")
    outside = _photo(tmp_path / "outside.jpg", 20)
    rows = [("images/good1.jpg", "A", "a"), ("images/good2.jpg", "A", "a"), ("images/dup1.jpg", "A", "b"),
            ("images/missing.jpg", "A", "a"), ("images/empty.jpg", "A", "a"), ("images/empty2.jpg", "A", "a"),
            ("images/trunc.jpg", "B", "c"), ("images/corrupt.jpg", "B", "c"), ("images/text.jpg", "B", "c"),
            ("images/bomb.png", "B", "c"), ("../outside.jpg", "B", "c"), (str(outside), "B", "c"),
            ("images/../../outside.jpg", "B", "c"), (str(img / "dup2.jpg"), "A", "a"),
            ("images/grey.jpg", "B", "d"), ("images/cmyk.jpg", "B", "d"), ("images/alpha.png", "B", "d"),
            ("images/deep.png", "B", "d"), ("images/pal.png", "B", "d")]
    ids = [f"r{i:02d}" for i in range(len(rows))]
    manifest = _manifest(root, [r + (i,) for r, i in zip(rows, ids)],
                         ("image", "category", "subcategory", "image_id"))
    expected = {"r03": "missing", "r04": "empty", "r05": "empty", "r06": "truncated", "r07": "corrupt",
                "r08": "not_an_image", "r09": "too_large", "r10": "outside_root", "r11": "outside_root",
                "r12": "outside_root"}
    return manifest, expected


def test_every_bad_file_reported_none_aborts(bad_catalog: tuple[Path, dict[str, str]]) -> None:
    manifest, expected = bad_catalog
    catalog = load_catalog(manifest, workers=3, progress=False)
    assert len(catalog) == 19
    assert dict(zip(catalog.problems["image_id"], catalog.problems["problem"])) == expected
    assert list(catalog.problems.columns) == ["image_id", "path", "problem", "detail"]
    assert catalog.problems["detail"].str.len().gt(0).all()
    usable = catalog.usable()
    assert len(usable) == 9 and not usable.ids.tolist().count("r03")
    # byte-identical good1, dup1, dup2 form one group named after the first; empty files do not
    groups = dict(zip(catalog.df["image_id"], catalog.df["dup_group"]))
    assert [i for i, g in groups.items() if isinstance(g, str)] == ["r00", "r02", "r13"]
    assert {groups["r00"], groups["r02"], groups["r13"]} == {"r00"}
    dups = catalog.duplicate_groups()
    assert dups["image_id"].tolist() == ["r00", "r02", "r13"] and dups["subcategory"].tolist() == ["a", "b", "a"]
    # other modes are converted, not rejected
    modes = dict(zip(catalog.df["image_id"], catalog.df["mode"]))
    assert [modes[f"r{i}"] for i in range(14, 19)] == ["L", "CMYK", "RGBA", "I;16", "P"]
    summary = catalog.summary().set_index(["category", "subcategory"])
    assert summary.loc[("A", "a")].tolist() == [6, 3, 3, 2, 6]  # images, usable, problems, duplicates, fashion
    assert summary.loc[("B", "c")].tolist() == [7, 0, 7, 0, 7]


def test_validate_false_finds_only_missing_and_empty(bad_catalog: tuple[Path, dict[str, str]]) -> None:
    manifest, expected = bad_catalog
    catalog = load_catalog(manifest, validate=False)
    cheap = {k: v for k, v in expected.items() if v in ("missing", "empty", "outside_root")}
    assert dict(zip(catalog.problems["image_id"], catalog.problems["problem"])) == cheap
    assert "sha1" not in catalog.df.columns and catalog.df["dup_group"].isna().all()


def test_check_catalog_report(bad_catalog: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    manifest, expected = bad_catalog
    out = io.StringIO()
    assert check_catalog_report(manifest, out=out) == 0
    text = out.getvalue()
    assert "19 images, 9 usable" in text and f"{len(expected)} problems" in text
    for problem in set(expected.values()):
        assert problem in text
    assert "duplicate groups (1, 3 images, 1 with different sub-categories" in text
    assert "r00 r02 r13" in text
    # unusable catalogues: nothing decodes / a required column is missing
    dead = tmp_path / "dead"
    (dead / "x.jpg").parent.mkdir(parents=True)
    (dead / "x.jpg").write_bytes(b"")
    out = io.StringIO()
    assert check_catalog_report(_manifest(dead, [("x.jpg", "A", "a")]), out=out) == 1
    assert "no usable image" in out.getvalue()
    out = io.StringIO()
    assert check_catalog_report(_manifest(dead, [("x.jpg", "A")], ("image", "category")), out=out) == 1
    assert "missing required column(s) 'subcategory'" in out.getvalue()


def test_cli_catalog_check(bad_catalog: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture) -> None:
    from cbir.cli import main

    manifest, _ = bad_catalog
    assert main(["catalog", "check", str(manifest)]) == 0
    assert "counts per sub-category" in capsys.readouterr().out


def test_fifo_directory_and_huge_file_are_problems_not_hangs(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "shop"
    _photo(root / "images" / "ok.jpg", 1)
    big = _photo(root / "images" / "big.jpg", 2, size=(120, 100))
    os.mkfifo(root / "images" / "x.jpg")  # no writer: a blocking open hangs forever
    (root / "images" / "d.jpg").mkdir()
    manifest = _manifest(root, [(f"images/{n}.jpg", "A", "a") for n in ("ok", "x", "d", "big")])
    monkeypatch.setattr(cbir.images, "MAX_FILE_BYTES", big.stat().st_size - 1)
    expected = {"x": "not_a_file", "d": "not_a_file", "big": "too_large"}
    for validate in (True, False):
        catalog = within(10, load_catalog, manifest, validate=validate, progress=False)
        assert dict(zip(catalog.problems["image_id"], catalog.problems["problem"])) == expected
        details = dict(zip(catalog.problems["image_id"], catalog.problems["detail"]))
        assert "FIFO" in details["x"] and "directory" in details["d"]
        assert details["big"] == f"{big.stat().st_size:,} bytes > {big.stat().st_size - 1:,}"
    out = io.StringIO()
    assert within(10, check_catalog_report, manifest, out=out) == 0
    assert "not_a_file: 2" in out.getvalue() and "1 usable" in out.getvalue()


def test_symlinks_out_of_the_root_are_refused_unread(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:TOPSECRET:0:0\n")
    outside = tmp_path / "elsewhere"
    _photo(outside / "Tees" / "o.jpg", 3)
    root = tmp_path / "shop"
    img = root / "images"
    _photo(img / "ok.jpg", 1)
    (img / "inside.jpg").symlink_to(img / "ok.jpg")  # a link that stays inside the root is fine
    (img / "leak.jpg").symlink_to(secret)
    (img / "out.jpg").symlink_to(outside / "Tees" / "o.jpg")
    (img / "rootlink").symlink_to("/")
    (img / "zero.jpg").symlink_to("/dev/zero")  # outside the root: never opened
    (img / "text.jpg").write_text("password=TOPSECRET\n")  # inside, not an image: content never copied
    names = ["images/ok.jpg", "images/inside.jpg", "images/leak.jpg", "images/out.jpg",
             f"images/rootlink{secret}", "images/zero.jpg", "images/text.jpg"]
    manifest = _manifest(root, [(n, "A", "a", f"r{i}") for i, n in enumerate(names)],
                         ("image", "category", "subcategory", "image_id"))
    expected = {"r2": "outside_root", "r3": "outside_root", "r4": "outside_root", "r5": "outside_root",
                "r6": "not_an_image"}
    for validate in (True, False):
        catalog = within(10, load_catalog, manifest, validate=validate, progress=False)
        got = dict(zip(catalog.problems["image_id"], catalog.problems["problem"]))
        assert got == (expected if validate else {k: v for k, v in expected.items() if k != "r6"})
    assert catalog.problems.set_index("image_id").loc["r2", "detail"] == f"images/leak.jpg is a link to a file " \
        f"outside {root}"
    out = io.StringIO()
    check_catalog_report(manifest, out=out)
    assert "TOPSECRET" not in out.getvalue() and "outside_root: 4" in out.getvalue()
    # folder tree with a linked sub-category folder, Kaggle layout with a linked image
    tree = tmp_path / "tree"
    _photo(tree / "Tops" / "Shirts" / "s.jpg", 4)
    (tree / "Tops" / "Tees").symlink_to(outside / "Tees", target_is_directory=True)
    catalog = load_catalog(tree, progress=False)
    assert catalog.problems[["image_id", "problem"]].values.tolist() == [["o", "outside_root"]]
    kaggle = tmp_path / "kaggle"
    (kaggle / "images").mkdir(parents=True)
    (kaggle / "styles.csv").write_text(STYLES)
    (kaggle / "images" / "1.jpg").symlink_to(secret)
    catalog = load_catalog(kaggle, progress=False)
    assert catalog.problems.set_index("image_id").loc["1", "problem"] == "outside_root"


def test_ids_stable_when_a_duplicate_stem_is_added(tmp_path: Path) -> None:
    root = tmp_path / "m"
    rows = [(f"images/{n}.jpg", "A", "a") for n in range(10000, 10025)]
    before = load_catalog(_manifest(root, rows), validate=False).ids.tolist()
    assert before == [str(n) for n in range(10000, 10025)]
    after = load_catalog(_manifest(root, rows + [("extra/10003.jpg", "A", "a")]), validate=False).ids.tolist()
    assert after[:3] == before[:3] and after[4:25] == before[4:]  # no other id changes
    assert (after[3], after[25]) == ("images/10003", "extra/10003")
    assert len(set(after)) == 26
    # same rule for product ids: only the two rows sharing a product id change
    columns = ("image", "category", "subcategory", "product_id")
    with_pid = [r + (f"p{i}",) for i, r in enumerate(rows)]
    ids = load_catalog(_manifest(root, with_pid + [("extra/x.jpg", "A", "a", "p7")], columns),
                       validate=False).ids.tolist()
    assert ids[:7] + ids[8:25] == [f"p{i}" for i in range(25) if i != 7]
    assert (ids[7], ids[25]) == ("images/10007", "extra/x")
    # a row without product id falls back to its stem, the others keep theirs
    ids = load_catalog(_manifest(root, with_pid + [("extra/y.jpg", "A", "a", None)], columns),
                       validate=False).ids.tolist()
    assert ids == [f"p{i}" for i in range(25)] + ["y"]


def _bad_first_row(text: str, line: int) -> str:
    """``text`` with data line ``line`` (1-based, after the header) moved to the top."""
    header, *rows = text.splitlines()
    return "\n".join([header, rows[line - 1]] + rows[: line - 1] + rows[line:]) + "\n"


def test_unquoted_comma_repair_when_the_first_row_is_bad(tmp_path: Path) -> None:
    root = tmp_path / "k"
    root.mkdir()
    (root / "styles.csv").write_text(_bad_first_row(STYLES, 2))
    table, repaired = read_table(root / "styles.csv", str_columns=("id",))
    assert repaired == 2 and table["id"].tolist() == ["2", "1", "3", "4", "5", "6", "7"]
    catalog = load_catalog(root, validate=False)
    df = catalog.df.set_index("image_id")
    assert df.loc["2", "productDisplayName"] == "Puma Women, Blue, Round Neck T-shirt"
    assert df.loc["2", "category"] == "Apparel" and df.loc["2", "subcategory"] == "Tshirts"
    assert df.loc["3", "productDisplayName"] == "Nike Men,Black Shoes"
    shop = tmp_path / "shop"
    for name in ("a", "b"):
        _photo(shop / "images" / f"{name}.jpg", ord(name))
    (shop / "manifest.csv").write_text("image,category,subcategory,title\n"
                                       "images/a.jpg,A,a,Red, cotton, long\nimages/b.jpg,A,b,Blue\n")
    catalog = load_catalog(shop, progress=False)
    assert catalog.ids.tolist() == ["a", "b"] and len(catalog.problems) == 0
    assert catalog.df["title"].tolist() == ["Red, cotton, long", "Blue"]
    assert catalog.df["subcategory"].tolist() == ["a", "b"]


def test_csv_encodings_and_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cbir.cli import main

    root = tmp_path / "shop"
    _photo(root / "images" / "a.jpg", 1)
    text = "image,category,subcategory,title\nimages/a.jpg,Tops,Tees,Café crème\n"
    manifest = root / "manifest.csv"
    for encoding in ("utf-8", "utf-8-sig", "utf-16"):  # utf-16 writes a byte-order mark
        manifest.write_text(text, encoding=encoding)
        catalog = load_catalog(manifest, progress=False)
        assert catalog.df["title"].tolist() == ["Café crème"] and catalog.ids.tolist() == ["a"]
    manifest.write_text(text, encoding="latin-1")
    offset = text.encode("latin-1").index(b"\xe9")
    message = (rf"{manifest}: not UTF-8 text: byte 0xe9 at offset {offset} "
               r"\(invalid continuation byte\); save it as UTF-8")
    with pytest.raises(CatalogError, match=message):
        load_catalog(manifest)
    assert main(["catalog", "check", str(manifest)]) == 1
    assert f"{manifest}: not UTF-8" in capsys.readouterr().out
    manifest.write_bytes(text.encode("utf-16-le"))  # UTF-16 without a byte-order mark
    with pytest.raises(CatalogError, match="looks like UTF-16 without a byte-order mark"):
        load_catalog(root)
    manifest.write_bytes(b"")
    with pytest.raises(CatalogError, match=rf"{manifest}: empty file, expected a header row with columns "
                                           r"image, category, subcategory$"):
        load_catalog(root)
    assert main(["catalog", "check", str(root)]) == 1
    assert "empty file" in capsys.readouterr().out
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    (kaggle / "styles.csv").write_bytes(b"")
    with pytest.raises(CatalogError, match=r"styles.csv: empty file, expected a header row with columns "
                                           r"id, masterCategory, articleType$"):
        load_catalog(kaggle)
    (kaggle / "styles.csv").write_bytes(STYLES.replace("Puma", "P\u00fcma").encode("latin-1"))
    assert main(["catalog", "check", str(kaggle / "styles.csv")]) == 1
    assert "save it as UTF-8" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- kaggle

STYLES = """id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName
1,Men,Apparel,Topwear,Tshirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt
2,Women,Apparel,Topwear,Tshirts,Blue,Summer,2012,Casual,Puma Women, Blue, Round Neck T-shirt
3,Men,Footwear,Shoes,Casual Shoes,Black,Winter,2016,Casual,Nike Men,Black Shoes
4,Unisex,Personal Care,Fragrance,Perfume and Body Mist,Black,Spring,2017,Casual,Deo
5,Unisex,Home,Home Furnishing,Cushion Covers,Red,Summer,2017,Casual,Cushion
6,Women,Accessories,Bags,Handbags,Red,Summer,2012,Casual,"Quoted, with comma"
7,Men,Apparel,Topwear,Shirts,White,Summer,2012,Casual,no image file
"""


def test_kaggle_layout_with_unquoted_commas(tmp_path: Path) -> None:
    root = tmp_path / "kaggle"
    root.mkdir()
    (root / "styles.csv").write_text(STYLES)
    for i in range(1, 7):
        _photo(root / "images" / f"{i}.jpg", i, fmt="JPEG")
    table, repaired = read_table(root / "styles.csv", str_columns=("id",))
    assert repaired == 2 and len(table) == 7
    catalog = load_catalog(root, progress=False)
    assert catalog.source == "kaggle" and len(catalog) == 7
    df = catalog.df.set_index("image_id")
    assert df.loc["2", "productDisplayName"] == "Puma Women, Blue, Round Neck T-shirt"
    assert df.loc["3", "productDisplayName"] == "Nike Men,Black Shoes"
    assert df.loc["6", "productDisplayName"] == "Quoted, with comma"
    assert df.loc["2", "baseColour"] == "Blue" and int(df.loc["2", "year"]) == 2012
    assert df["category"].tolist() == ["Apparel", "Apparel", "Footwear", "Personal Care", "Home", "Accessories",
                                       "Apparel"]
    assert df["subcategory"].tolist() == ["Tshirts", "Tshirts", "Casual Shoes", "Perfume and Body Mist",
                                          "Cushion Covers", "Handbags", "Shirts"]
    assert df["is_fashion"].tolist() == [True, True, True, False, False, True, True]
    assert df["product_id"].tolist() == [str(i) for i in range(1, 8)]
    assert df.loc["1", "path"] == str((root / "images" / "1.jpg").absolute())
    assert catalog.problems[["image_id", "problem"]].values.tolist() == [["7", "missing"]]
    by_sub = load_catalog(root / "styles.csv", subcategory_from="subCategory", validate=False)
    assert by_sub.df["subcategory"].tolist()[:4] == ["Topwear", "Topwear", "Shoes", "Fragrance"]
    with pytest.raises(ValueError, match="subcategory_from"):
        load_catalog(root, subcategory_from="gender")


def test_kaggle_empty_label_and_missing_column(tmp_path: Path) -> None:
    root = tmp_path / "k"
    root.mkdir()
    (root / "styles.csv").write_text(STYLES.replace("5,Unisex,Home,Home Furnishing,Cushion Covers",
                                                    "5,Unisex,Home,Home Furnishing,"))
    with pytest.raises(CatalogError, match=r"empty 'articleType' .* 6$"):
        load_catalog(root)
    (root / "styles.csv").write_text("id,gender,masterCategory,subCategory\n1,Men,Apparel,Topwear\n")
    with pytest.raises(CatalogError, match="'articleType'"):
        load_catalog(root / "styles.csv")


# ---------------------------------------------------------------------------------------------- folder


def test_folder_tree_layout(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _photo(root / "Tops" / "Tshirts" / "a.jpg", 1)
    _photo(root / "Tops" / "Tshirts" / "b.JPEG", 2, fmt="JPEG")
    _photo(root / "Tops" / "Dresses" / "c.png", 3)
    if features.check("webp"):
        _photo(root / "Shoes" / "Boots" / "d.webp", 4)
    (root / "Shoes" / "Boots" / "notes.txt").write_text("ignored")
    _photo(root / "Shoes" / "Boots" / ".hidden.jpg", 5)
    _photo(root / "top_level.jpg", 6)
    (root / "Shoes" / "Sandals").mkdir()
    (root / "Shoes" / "Sandals" / "broken.jpg").write_text("not a jpeg")
    catalog = load_catalog(root, progress=False)
    assert catalog.source == "folder"
    expected = [("d", "Shoes", "Boots")] if features.check("webp") else []
    expected += [("broken", "Shoes", "Sandals"), ("c", "Tops", "Dresses"), ("a", "Tops", "Tshirts"),
                 ("b", "Tops", "Tshirts")]
    assert catalog.df[["image_id", "category", "subcategory"]].values.tolist() == [list(e) for e in expected]
    assert catalog.problems[["image_id", "problem"]].values.tolist() == [["broken", "not_an_image"]]
    _photo(root / "Shoes" / "Boots" / "a.jpg", 7)
    ids = load_catalog(root, validate=False).ids.tolist()
    assert "Shoes/Boots/a" in ids and "Tops/Tshirts/a" in ids and len(set(ids)) == len(ids)


def test_folder_tree_reports_skipped_files(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _photo(root / "Tops" / "Tees" / "a.jpg", 1)
    _photo(root / "Tops" / "Tees" / "anim.gif", 2, mode="P")
    _photo(root / "Tops" / "Tees" / "scan.tif", 3)
    _photo(root / "top.jpg", 4)
    _photo(root / "Tops" / "b.png", 5)
    _photo(root / "Tops" / "Tees" / "deeper" / "c.jpg", 6)
    (root / "Tops" / "Tees" / "notes.txt").write_text("n")
    _photo(root / "Tops" / "Tees" / ".hidden.gif", 7)
    catalog = load_catalog(root, progress=False)
    assert catalog.ids.tolist() == ["a"] and len(catalog.problems) == 0
    assert list(catalog.skipped.columns) == ["path", "reason", "detail"]
    assert catalog.skipped[["path", "reason"]].values.tolist() == [
        ["Tops/Tees/anim.gif", "unsupported_type"], ["Tops/Tees/deeper/c.jpg", "wrong_depth"],
        ["Tops/Tees/notes.txt", "unsupported_type"], ["Tops/Tees/scan.tif", "unsupported_type"],
        ["Tops/b.png", "wrong_depth"], ["top.jpg", "wrong_depth"]]
    details = dict(catalog.skipped[["path", "detail"]].values)
    assert details["Tops/Tees/anim.gif"] == ".gif is not one of .jpg, .jpeg, .png, .webp"
    assert details["top.jpg"] == "expected <category>/<subcategory>/<file>, found 1 level"
    assert len(catalog.usable().skipped) == 6
    out = io.StringIO()
    assert check_catalog_report(root, out=out) == 0
    text = out.getvalue()
    assert "6 files skipped" in text and "skipped files (6):" in text and "Tops/Tees/deeper/c.jpg" in text


# ----------------------------------------------------------------------------------------- background


def test_background_stats_labels(tmp_path: Path) -> None:
    root = tmp_path / "bg"
    white = np.full((20, 20, 3), 255, np.uint8)
    white[5:15, 5:15] = (200, 0, 0)
    grey = np.full((20, 20, 3), 225, np.uint8)
    grey[5:15, 5:15] = (0, 0, 200)
    sand = np.full((20, 20, 3), (230, 200, 150), np.uint8)
    for name, array in (("w", white), ("g", grey), ("s", sand)):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / "images" / f"{name}.png")
    catalog = load_catalog(_manifest(root, [(f"images/{n}.png", "A", "a") for n in "wgs"]), progress=False)
    stats = background_stats(catalog, progress=False)
    assert stats["background"].tolist() == ["white", "grey", "other"]
    assert stats["border_white_frac"].tolist() == [1.0, 0.0, 0.0]
    assert stats["border_brightness"].tolist() == [255.0, 225.0, pytest.approx(580 / 3)]
    assert stats[["width", "height"]].to_numpy().tolist() == [[20, 20]] * 3


# ---------------------------------------------------------------------------------------------- splits


def _table_catalog(sizes: dict[str, int], *, fashion: bool = True, extra: pd.DataFrame | None = None,
                   problems: list[str] = ()) -> Catalog:
    """A catalogue table without files: ``sizes`` images per sub-category."""
    labels = np.repeat(list(sizes), list(sizes.values()))
    df = pd.DataFrame({"image_id": [f"{s}{i:03d}" for s, n in sizes.items() for i in range(n)], "path": "/x",
                       "category": "c", "subcategory": labels, "is_fashion": fashion, "dup_group": np.nan})
    if extra is not None:
        df = pd.concat([df, extra], ignore_index=True)
    table = pd.DataFrame({"image_id": list(problems), "path": "/x", "problem": "corrupt", "detail": ""})
    return Catalog(df=df, root=Path("/x"), source="manifest", problems=table)


def _query_counts(catalog: Catalog) -> dict[str, int]:
    return catalog.queries().df["subcategory"].value_counts().to_dict()


def test_split_proportional_and_deterministic() -> None:
    catalog = _table_catalog({"A": 40, "B": 20, "C": 10})
    split = split_queries(catalog)  # query_fraction 0.1 of 70 -> 7: exactly 4, 2, 1
    assert _query_counts(split) == {"A": 4, "B": 2, "C": 1}
    assert split.df["split"].value_counts().to_dict() == {"catalog": 63, "query": 7}
    again = split_queries(catalog)
    assert split.queries().ids.tolist() == again.queries().ids.tolist()
    assert split.queries().ids.tolist() != split_queries(catalog, seed=1).queries().ids.tolist()
    assert set(split.queries().ids).isdisjoint(split.searchable().ids)
    assert len(split.queries()) + len(split.searchable()) == 70
    with pytest.raises(CatalogError, match="split_queries"):
        catalog.queries()


def test_split_ties_broken_by_seed() -> None:
    catalog = _table_catalog({"A": 5, "B": 3, "C": 2})  # 5 queries: exact 2.5, 1.5, 1 -> A or B gets the extra
    outcomes = {tuple(sorted(_query_counts(split_queries(catalog, n_queries=5, seed=s)).items())) for s in range(20)}
    assert outcomes == {(("A", 3), ("B", 1), ("C", 1)), (("A", 2), ("B", 2), ("C", 1))}


def test_split_never_queries_distractors_singletons_duplicates_or_problems() -> None:
    distractors = pd.DataFrame({"image_id": [f"tv{i}" for i in range(50)], "path": "/x", "category": "electronics",
                                "subcategory": "tv", "is_fashion": False, "dup_group": np.nan})
    dups = pd.DataFrame({"image_id": ["D0", "D1", "D2", "E0", "E1", "E2"], "path": "/x", "category": "c",
                         "subcategory": ["D", "D", "D", "E", "E", "E"], "is_fashion": True,
                         "dup_group": ["D0", "D0", "D0", "E0", "E0", np.nan]})
    catalog = _table_catalog({"A": 10, "S": 1, "P": 2}, extra=pd.concat([distractors, dups]), problems=["P000"])
    split = split_queries(catalog, query_fraction=0.5)
    # tv: not fashion; S: one image; D: three copies of one photo; P: one usable image left.
    # Eligible: A (10) and E (3) -> round(0.5 * 13) = 6 queries: exact 4.6 and 1.4 -> 5 and 1
    assert _query_counts(split) == {"A": 5, "E": 1}
    assert split.df.set_index("image_id").loc["P000", "split"] == "catalog"
    assert (split.searchable().df["subcategory"] == "tv").sum() == 50


def test_split_caps_small_classes_and_study_setting() -> None:
    catalog = _table_catalog({"A": 2, "B": 2, "C": 2})
    assert _query_counts(split_queries(catalog, n_queries=3)) == {"A": 1, "B": 1, "C": 1}
    with pytest.raises(CatalogError, match="at most 3"):
        split_queries(catalog, n_queries=4)
    # the study: 60 queries over 75 sub-categories of very unequal size, some with a single image
    rng = np.random.default_rng(0)
    sizes = {f"s{i:02d}": int(n) for i, n in enumerate(np.maximum(1, rng.zipf(1.6, 75) % 900))}
    catalog = _table_catalog(sizes)
    split = split_queries(catalog, n_queries=60)
    counts = _query_counts(split)
    assert sum(counts.values()) == 60
    assert all(sizes[s] >= 2 and q <= sizes[s] - 1 for s, q in counts.items())
    biggest = max(sizes, key=sizes.get)
    assert counts[biggest] == max(counts.values()) and counts[biggest] > 1


def test_cross_validation_folds() -> None:
    distractors = pd.DataFrame({"image_id": [f"car{i}" for i in range(50)], "path": "/x", "category": "v",
                                "subcategory": "car", "is_fashion": False, "dup_group": np.nan})
    catalog = _table_catalog({"A": 40, "B": 30, "C": 20, "D": 10, "S": 1}, extra=distractors)
    folds = cross_validation_folds(catalog, n_folds=5, fold_size=10, seed=3)
    assert [len(f) for f in folds] == [10] * 5
    everything = np.concatenate(folds)
    assert len(set(everything)) == 50  # disjoint
    labels = catalog.df.set_index("image_id").loc[everything, "subcategory"]
    assert labels.value_counts().to_dict() == {"A": 20, "B": 15, "C": 10, "D": 5}  # proportional, no S, no car
    per_fold = pd.crosstab(np.repeat(np.arange(5), 10), labels.to_numpy())
    assert (per_fold.max() - per_fold.min()).max() <= 1  # each fold gets a like share of every class
    again = cross_validation_folds(catalog, n_folds=5, fold_size=10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    assert folds[0].dtype.kind == "U"
    with pytest.raises(CatalogError, match="need 200 eligible"):
        cross_validation_folds(catalog, n_folds=10, fold_size=20)


# ------------------------------------------------------------------------------------- real catalogue


@pytest.fixture(scope="module")
def real_catalog(real_catalog_dir: Path) -> Catalog:
    """The shared real catalogue, fully decoded once (about 3 s on 2 cores)."""
    return load_catalog(real_catalog_dir, progress=False)


@pytest.mark.slow
@pytest.mark.shared
def test_real_catalogue_loads_and_reports_duplicates(real_catalog: Catalog) -> None:
    catalog = real_catalog
    assert catalog.source == "manifest" and len(catalog) == 9583 and len(catalog.problems) == 0
    assert set(catalog.df["category"]) == {"Apparel", "Footwear", "Accessories", "Personal Care", "Free Items",
                                           "Sporting Goods"}
    dups = catalog.duplicate_groups()
    assert dups["dup_group"].nunique() == 121 and len(dups) == 243
    mixed = dups.groupby("dup_group")["subcategory"].nunique()
    assert (mixed > 1).sum() == 1  # one group with two different article types (data README)
    assert catalog.df["is_fashion"].sum() == 9534
    assert set(catalog.df.loc[~catalog.df["is_fashion"], "category"]) == {"Personal Care", "Free Items",
                                                                           "Sporting Goods"}
    assert (catalog.df[["width", "height"]] == 224).all().all()


@pytest.mark.shared
def test_real_catalogue_kaggle_layout_agrees(real_catalog: Catalog, real_catalog_dir: Path) -> None:
    kaggle = load_catalog(real_catalog_dir / "styles.csv", validate=False)
    assert kaggle.source == "kaggle" and kaggle.ids.tolist() == real_catalog.ids.tolist()
    assert kaggle.df["subcategory"].tolist() == real_catalog.df["subcategory"].tolist()
    assert kaggle.df["is_fashion"].tolist() == real_catalog.df["is_fashion"].tolist()


@pytest.mark.shared
def test_real_catalogue_split_and_folds(real_catalog: Catalog) -> None:
    split = split_queries(real_catalog, n_queries=60, seed=0)
    queries = split.queries().df
    assert len(queries) == 60 and queries["is_fashion"].all()
    sizes = real_catalog.df.groupby("subcategory").size()
    assert (sizes[queries["subcategory"].unique()] >= 2).all()
    folds = cross_validation_folds(real_catalog, n_folds=10, fold_size=20, seed=0)
    assert len(set(np.concatenate(folds))) == 200
