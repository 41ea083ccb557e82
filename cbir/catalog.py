"""Product catalogues: loading, validation report, query/catalogue splits and cross-validation folds.

A catalogue is a table of images (:class:`Catalog`). :func:`load_catalog` reads three layouts:

* a manifest CSV with columns ``image`` (path relative to the CSV's folder), ``category``,
  ``subcategory`` (all other columns kept), or the folder holding ``manifest.csv``;
* the Kaggle "Fashion Product Images" layout: ``styles.csv`` + ``images/<id>.jpg``;
* a folder tree ``root/<category>/<subcategory>/*.jpg`` (also .jpeg, .png, .webp).

Every file is checked (full decode in a thread pool); bad files are listed in ``Catalog.problems``
and never abort the whole catalogue. Byte-identical files share a ``dup_group``.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Iterable

import numpy as np
import pandas as pd

from cbir.images import IMAGE_SUFFIXES, MAX_PIXELS, border_stats, check_file, check_image, read_image

REQUIRED_COLUMNS = ("image_id", "path", "category", "subcategory")
PROBLEM_COLUMNS = ("image_id", "path", "problem", "detail")
SKIPPED_COLUMNS = ("path", "reason", "detail")
KAGGLE_NON_FASHION = frozenset({"Personal Care", "Free Items", "Sporting Goods", "Home"})
"""Kaggle masterCategory values whose items are not fashion (kept as distractors, never queries)."""
SUBCATEGORY_SOURCES = ("articleType", "subCategory")
SOURCES = ("manifest", "kaggle", "folder")
_MAX_LISTED = 20


class CatalogError(ValueError):
    """An unusable catalogue: missing columns, empty labels, duplicate ids, no usable image."""


def _empty_problems() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="str") for c in PROBLEM_COLUMNS})


def _empty_skipped() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="str") for c in SKIPPED_COLUMNS})


@dataclass(eq=False)
class Catalog:
    """A table of images.

    ``df`` columns: ``image_id`` (str, unique), ``path`` (absolute str), ``category``, ``subcategory``
    (str), ``is_fashion`` (bool), ``product_id`` (str or NA), ``dup_group`` (first image_id of a
    group of byte-identical files, NA when unique), ``sha1``, ``width``, ``height``, ``mode``,
    ``bytes`` (after validation), optional ``split`` (``"query"``/``"catalog"``) and every input column.
    ``problems`` lists unusable files: ``image_id, path, problem, detail``. ``skipped`` lists files of
    a folder tree that are not catalogue rows: ``path`` (relative to the root), ``reason``
    (``unsupported_type``, ``wrong_depth`` or ``unreadable_folder``), ``detail``.
    """

    df: pd.DataFrame
    root: Path
    source: str
    problems: pd.DataFrame = field(default_factory=_empty_problems)
    skipped: pd.DataFrame = field(default_factory=_empty_skipped)

    def __post_init__(self) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in self.df.columns]
        if missing:
            raise CatalogError(f"catalogue table lacks column(s) {missing}")
        self.df = self.df.reset_index(drop=True)
        self.root = Path(self.root)

    def __len__(self) -> int:
        return len(self.df)

    def __repr__(self) -> str:
        return (f"Catalog({len(self)} images, {self.df['category'].nunique()} categories, "
                f"{self.df['subcategory'].nunique()} sub-categories, {len(self.problems)} problems, "
                + (f"{len(self.skipped)} files skipped, " if len(self.skipped) else "")
                + f"source={self.source!r})")

    @property
    def ids(self) -> np.ndarray:
        """Image ids in catalogue order, shape (N,), dtype str."""
        return self.df["image_id"].to_numpy(dtype=str)

    def _replace(self, df: pd.DataFrame, problems: pd.DataFrame | None = None) -> Catalog:
        return dataclasses.replace(self, df=df, problems=self.problems if problems is None else problems)

    def problem_mask(self) -> np.ndarray:
        """Boolean array (N,): True for rows listed in ``problems``."""
        return self.df["image_id"].isin(self.problems["image_id"]).to_numpy()

    def usable(self) -> Catalog:
        """The catalogue without rows that have problems (duplicates stay: they are usable)."""
        return self._replace(self.df.loc[~self.problem_mask()], _empty_problems())

    def select(self, ids: Iterable[str]) -> Catalog:
        """Rows with the given image ids, in the given order; KeyError naming unknown ids."""
        ids = [str(i) for i in ids]
        index = pd.Index(self.df["image_id"])
        pos = index.get_indexer(ids)
        if (pos < 0).any():
            unknown = [i for i, p in zip(ids, pos) if p < 0]
            raise KeyError(f"unknown image ids: {unknown[:_MAX_LISTED]}")
        keep = set(ids)
        return self._replace(self.df.iloc[pos], self.problems[self.problems["image_id"].isin(keep)])

    def _split_rows(self, query: bool) -> Catalog:
        if "split" not in self.df.columns:
            raise CatalogError("catalogue has no 'split' column: call cbir.catalog.split_queries first")
        mask = (self.df["split"] == "query") == query
        return self._replace(self.df.loc[mask.to_numpy()])

    def queries(self) -> Catalog:
        """Rows with ``split == "query"``."""
        return self._split_rows(True)

    def searchable(self) -> Catalog:
        """Rows with ``split != "query"`` (the catalogue searched by the queries)."""
        return self._split_rows(False)

    def summary(self) -> pd.DataFrame:
        """Counts per (category, subcategory): ``n_images``, ``n_usable``, ``n_problems``,
        ``n_duplicates`` (rows in a duplicate group), ``n_fashion`` and, after a split, ``n_queries``."""
        df = self.df.assign(
            _usable=~self.problem_mask(),
            _problem=self.problem_mask(),
            _dup=self.df["dup_group"].notna() if "dup_group" in self.df else False,
            _fashion=self.df["is_fashion"].astype(bool) if "is_fashion" in self.df else True,
        )
        aggs = {"n_images": ("image_id", "size"), "n_usable": ("_usable", "sum"),
                "n_problems": ("_problem", "sum"), "n_duplicates": ("_dup", "sum"),
                "n_fashion": ("_fashion", "sum")}
        if "split" in df.columns:
            df["_query"] = df["split"] == "query"
            aggs["n_queries"] = ("_query", "sum")
        out = df.groupby(["category", "subcategory"], sort=True).agg(**aggs).reset_index()
        return out.astype({c: "int64" for c in aggs})

    def duplicate_groups(self) -> pd.DataFrame:
        """Tidy table of rows in duplicate groups: ``dup_group, image_id, category, subcategory, sha1``,
        in catalogue order within each group, groups in order of first appearance."""
        cols = ["dup_group", "image_id", "category", "subcategory", "sha1"]
        if "dup_group" not in self.df.columns:
            return pd.DataFrame(columns=cols)
        dups = self.df.loc[self.df["dup_group"].notna(), [c for c in cols if c in self.df.columns]]
        order = pd.Index(dups["dup_group"].unique())
        dups = dups.assign(_g=order.get_indexer(dups["dup_group"]))
        return dups.sort_values("_g", kind="stable").drop(columns="_g").reset_index(drop=True)


# --------------------------------------------------------------------------------------------- reading


def _lines(rows: Iterable[int]) -> str:
    """File line numbers (header = line 1) of 0-based data rows, shortened."""
    rows = [int(r) + 2 for r in rows]
    shown = ", ".join(map(str, rows[:_MAX_LISTED]))
    return shown + (f" ... ({len(rows)} rows)" if len(rows) > _MAX_LISTED else "")


_BOMS = ((codecs.BOM_UTF8, "utf-8-sig", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
         (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"))


def read_text(path: Path) -> str:
    """The text of a CSV file: UTF-8 (byte-order mark optional) or UTF-16 with a byte-order mark.

    Raises CatalogError naming the file, the byte offset and the problem (save the file as UTF-8).
    """
    data = Path(path).read_bytes()
    encoding, label = next(((enc, name) for bom, enc, name in _BOMS if data.startswith(bom)), ("utf-8", "UTF-8"))
    if encoding == "utf-8" and b"\x00" in data:
        raise CatalogError(f"{path}: NUL byte at offset {data.index(0)}: it looks like UTF-16 without a "
                           "byte-order mark; save it as UTF-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not {label} text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                           f"({exc.reason}); save it as UTF-8") from None


def _rows(text: str) -> list[list[str]]:
    """CSV records of ``text`` (quotes and line breaks inside quotes as pandas reads them)."""
    return list(csv.reader(io.StringIO(text, newline="")))


def _repair(rows: list[list[str]], n: int) -> int:
    """Join fields beyond the ``n`` header columns back into the last column (unquoted commas), in
    place; trailing empty fields (a trailing comma) are dropped. Returns the number of rows joined."""
    repaired = 0
    for i, fields in enumerate(rows):
        if len(fields) <= n:
            continue
        if any(f.strip() for f in fields[n:]):
            rows[i] = fields[: n - 1] + [",".join(fields[n - 1:])]
            repaired += 1
        else:
            rows[i] = fields[:n]
    return repaired


def read_table(path: Path, *, str_columns: Iterable[str] = (),
               required: Iterable[str] = ()) -> tuple[pd.DataFrame, int]:
    """Read a CSV (see :func:`read_text` for encodings); rows with more fields than the header
    (unquoted commas in the last column, as in Kaggle's styles.csv) are repaired by joining the extra
    fields back into the last column, whichever row they are in.

    Returns ``(table, n_repaired_rows)``. ``str_columns`` are read as text (ids keep leading zeros);
    ``required`` names the expected columns in the message for an empty file.
    """
    path = Path(path)
    text = read_text(path)
    rows = _rows(text)
    if not rows or not any(f.strip() for f in rows[0]):
        raise CatalogError(f"{path}: empty file, expected a header row with columns {', '.join(required)}")
    header = rows[0]
    changed = any(len(r) > len(header) for r in rows)
    repaired = _repair(rows, len(header))
    if changed:
        buffer = io.StringIO(newline="")
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        text = buffer.getvalue()
    dtype = {c: str for c in str_columns if c in header}
    # index_col=False: never take leading columns as the index when a row has more fields
    return pd.read_csv(io.StringIO(text), dtype=dtype, index_col=False), repaired


def _require_columns(table: pd.DataFrame, columns: Iterable[str], file: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CatalogError(f"{file}: missing required column(s) {', '.join(map(repr, missing))} "
                           f"(found: {', '.join(map(str, table.columns))})")


def _require_values(table: pd.DataFrame, columns: Iterable[str], file: Path) -> None:
    """Strip text columns and raise CatalogError naming the column and file lines of empty values."""
    for column in columns:
        values = table[column].astype("str").str.strip()
        empty = table[column].isna().to_numpy() | (values == "").to_numpy()
        if empty.any():
            raise CatalogError(f"{file}: empty {column!r} in row(s) (file lines) {_lines(np.flatnonzero(empty))}")
        table[column] = values


def _unique_ids(table: pd.DataFrame, column: str, file: Path) -> None:
    dup = table[column].duplicated(keep=False).to_numpy()
    if dup.any():
        raise CatalogError(f"{file}: {column!r} values are not unique: {table.loc[dup, column].iloc[:5].tolist()} "
                           f"in row(s) (file lines) {_lines(np.flatnonzero(dup))}")


def _parse_bool(series: pd.Series, column: str, file: Path) -> pd.Series:
    if series.dtype == bool:
        return series
    text = series.astype("str").str.strip().str.lower()
    mapping = {"true": True, "1": True, "yes": True, "y": True, "t": True, "1.0": True,
               "false": False, "0": False, "no": False, "n": False, "f": False, "0.0": False}
    parsed = text.map(mapping)
    bad = parsed.isna().to_numpy() | series.isna().to_numpy()
    if bad.any():
        raise CatalogError(f"{file}: {column!r} must be True/False; bad value(s) in row(s) (file lines) "
                           f"{_lines(np.flatnonzero(bad))}")
    return parsed.astype(bool)


def _without_suffix(path: str) -> str:
    return os.path.splitext(Path(path).as_posix())[0]


def _stable_ids(keys: pd.Series, relative: pd.Series) -> pd.Series:
    """``keys`` (file stems or product ids) as ids; rows whose key collides get their relative path
    without suffix, '~k' suffixes as last resort. A row's id depends only on the rows sharing its key,
    so adding rows never renames the others."""
    ids = keys.where(~keys.duplicated(keep=False), relative.map(_without_suffix))
    counter = ids.groupby(ids).cumcount()
    return ids.where(counter == 0, ids + "~" + (counter + 1).astype("str"))


def _stems(relative: pd.Series) -> pd.Series:
    return relative.map(lambda p: Path(p).stem)


def _resolve_paths(relative: pd.Series, root: Path) -> tuple[pd.Series, np.ndarray]:
    """Absolute, lexically normalised paths and a mask of paths that escape ``root``."""
    root_abs = os.path.normpath(root.absolute())
    roots = {root_abs, os.path.normpath(root.resolve())}
    absolute = relative.map(lambda p: os.path.normpath(os.path.join(root_abs, os.path.expanduser(p))))
    inside = absolute.map(lambda p: any(p.startswith(r + os.sep) for r in roots))
    return absolute, ~inside.to_numpy(dtype=bool)


def _linked_outside(paths: pd.Series, root: Path) -> np.ndarray:
    """True where a path's real location (symlinks resolved) is not under the real ``root``."""
    real_root = os.path.join(os.path.realpath(root), "")
    return ~paths.map(lambda p: os.path.realpath(p).startswith(real_root)).to_numpy(dtype=bool)


def _from_manifest(file: Path) -> tuple[pd.DataFrame, Path, np.ndarray]:
    table, _ = read_table(file, str_columns=("image", "category", "subcategory", "image_id", "product_id"),
                          required=("image", "category", "subcategory"))
    _require_columns(table, ("image", "category", "subcategory"), file)
    _require_values(table, ("image", "category", "subcategory"), file)
    root = file.parent
    if "image_id" in table.columns:
        _require_values(table, ("image_id",), file)
        _unique_ids(table, "image_id", file)
        ids = table["image_id"]
    elif "product_id" in table.columns:
        product = table["product_id"].str.strip()
        has_product = product.notna() & (product != "")
        ids = _stable_ids(product.where(has_product, _stems(table["image"])), table["image"])
    else:
        ids = _stable_ids(_stems(table["image"]), table["image"])
    paths, outside = _resolve_paths(table["image"], root)
    df = table.drop(columns=[c for c in ("image_id", "path") if c in table.columns])
    df.insert(0, "image_id", ids.astype("str"))
    df.insert(1, "path", paths)
    if "is_fashion" in df.columns:
        df["is_fashion"] = _parse_bool(df["is_fashion"], "is_fashion", file)
    else:
        df["is_fashion"] = True
    return df, root, outside


def _from_kaggle(file: Path, subcategory_from: str) -> tuple[pd.DataFrame, Path, np.ndarray]:
    if subcategory_from not in SUBCATEGORY_SOURCES:
        raise ValueError(f"subcategory_from must be one of {SUBCATEGORY_SOURCES}, got {subcategory_from!r}")
    table, _ = read_table(file, str_columns=("id", "masterCategory", "subCategory", "articleType"),
                          required=("id", "masterCategory", subcategory_from))
    _require_columns(table, ("id", "masterCategory", subcategory_from), file)
    _require_values(table, ("id", "masterCategory", subcategory_from), file)
    _unique_ids(table, "id", file)
    root = file.parent
    image = "images/" + table["id"] + ".jpg"
    df = pd.DataFrame({
        "image_id": table["id"],
        "path": image.map(lambda p: os.path.normpath(root.absolute() / p)),
        "category": table["masterCategory"],
        "subcategory": table[subcategory_from],
        "is_fashion": ~table["masterCategory"].isin(KAGGLE_NON_FASHION),
        "product_id": table["id"],
        "image": image,
    })
    df = pd.concat([df, table.drop(columns=["id"])], axis=1)
    return df, root, np.zeros(len(df), dtype=bool)


def _scan_folder(root: Path) -> tuple[list[Path], list[tuple[str, str, str]]]:
    """Files at ``<category>/<subcategory>/<file>`` with an image suffix, and (path, reason, detail)
    of every other non-hidden file. Linked folders are followed only down to the sub-category level."""
    used: list[Path] = []
    skipped: list[tuple[str, str, str]] = []

    def visit(folder: Path, depth: int) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            skipped.append((folder.relative_to(root).as_posix(), "unreadable_folder", exc.strerror or str(exc)))
            return
        for entry in entries:
            relative = entry.relative_to(root).as_posix()
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if depth < 3 or not entry.is_symlink():
                    visit(entry, depth + 1)
                else:
                    skipped.append((relative, "wrong_depth", "a linked folder inside a sub-category, not followed"))
            elif entry.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((relative, "unsupported_type",
                                f"{entry.suffix.lower() or 'no suffix'} is not one of {', '.join(IMAGE_SUFFIXES)}"))
            elif depth != 3:
                skipped.append((relative, "wrong_depth", f"expected <category>/<subcategory>/<file>, found "
                                                         f"{depth} level{'s' if depth != 1 else ''}"))
            else:
                used.append(entry)

    visit(root, 1)
    return used, skipped


def _from_folder(root: Path) -> tuple[pd.DataFrame, Path, np.ndarray, pd.DataFrame]:
    files, skipped = _scan_folder(root)
    if not files:
        raise CatalogError(f"{root}: no manifest.csv, no styles.csv and no images under "
                           f"<category>/<subcategory>/*{{{','.join(IMAGE_SUFFIXES)}}}"
                           + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    files = sorted(files)
    relative = pd.Series([p.relative_to(root).as_posix() for p in files], dtype="str")
    df = pd.DataFrame({
        "image_id": _stable_ids(_stems(relative), relative),
        "path": [os.path.normpath(p.absolute()) for p in files],
        "category": [p.parent.parent.name for p in files],
        "subcategory": [p.parent.name for p in files],
        "is_fashion": True,
        "image": relative,
    })
    table = (pd.DataFrame(sorted(skipped), columns=list(SKIPPED_COLUMNS)).astype("str") if skipped
             else _empty_skipped())
    return df, root, np.zeros(len(df), dtype=bool), table


def detect_source(path: str | os.PathLike) -> tuple[str, Path]:
    """The layout of ``path`` (``manifest``, ``kaggle`` or ``folder``) and the file or folder to read."""
    path = Path(path)
    if path.is_file():
        columns = next(iter(_rows(read_text(path))), []) if path.suffix.lower() == ".csv" else []
        if "masterCategory" in columns or (path.name == "styles.csv" and "image" not in columns):
            return "kaggle", path
        if path.suffix.lower() != ".csv":
            raise CatalogError(f"{path}: expected a manifest CSV, a styles.csv or a catalogue folder")
        return "manifest", path
    if path.is_dir():
        if (path / "manifest.csv").is_file():
            return "manifest", path / "manifest.csv"
        if (path / "styles.csv").is_file():
            return "kaggle", path / "styles.csv"
        return "folder", path
    raise FileNotFoundError(f"catalogue not found: {path}")


# ------------------------------------------------------------------------------------------ validation


def _validate(df: pd.DataFrame, todo: np.ndarray, *, workers: int, max_pixels: int | None,
              progress: bool) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Full decode of rows ``todo`` (bool mask) in a thread pool; returns info columns and problems."""
    from tqdm.auto import tqdm

    paths = df["path"].to_numpy()[todo]
    check = partial(check_image, max_pixels=max_pixels)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        results = list(tqdm(pool.map(check, paths), total=len(paths), desc="checking images",
                            unit="img", disable=not progress, leave=False))
    info = pd.DataFrame([r[1] for r in results], index=np.flatnonzero(todo),
                        columns=["width", "height", "mode", "bytes", "sha1", "detail"])
    problems = [{"row": row, "problem": problem, "detail": detail}
                for row, (problem, _), detail in zip(info.index, results, info["detail"]) if problem]
    return info.drop(columns="detail"), problems


def _stat(df: pd.DataFrame, todo: np.ndarray) -> list[dict[str, Any]]:
    """Cheap checks without opening a file: missing, not a regular file, too large, zero bytes."""
    checks = ((row, check_file(df["path"].iat[row])) for row in np.flatnonzero(todo))
    return [{"row": row, "problem": problem, "detail": detail} for row, (problem, detail) in checks if problem]


def _duplicate_groups(df: pd.DataFrame, usable: np.ndarray) -> pd.Series:
    """dup_group per row: the first image_id among usable rows with the same sha1 (NA when unique)."""
    out = pd.Series(np.nan, index=df.index, dtype="str")
    if "sha1" not in df.columns:
        return out
    ok = usable & df["sha1"].notna().to_numpy()
    sub = df.loc[ok, ["image_id", "sha1"]]
    grouped = sub.groupby("sha1", sort=False)["image_id"]
    first, size = grouped.transform("first"), grouped.transform("size")
    out.loc[sub.index] = first.where(size > 1)
    return out


def load_catalog(path: str | os.PathLike, *, subcategory_from: str = "articleType", validate: bool = True,
                 workers: int = 4, max_pixels: int | None = MAX_PIXELS, progress: bool = True) -> Catalog:
    """Load and check a catalogue (manifest CSV or its folder, Kaggle styles.csv or its folder, folder tree).

    ``subcategory_from`` (Kaggle only): ``"articleType"`` or ``"subCategory"``. ``validate`` decodes
    every image (thread pool of ``workers``) and records width, height, mode, bytes and sha1; without
    it only the file type and size are checked, nothing is opened (``sha1`` from the input is used for
    duplicates). Bad rows go to ``Catalog.problems`` (``missing``, ``empty``, ``not_a_file``,
    ``not_an_image``, ``truncated``, ``corrupt``, ``too_large``, ``unsupported_mode``, ``outside_root``:
    the real path, symlinks resolved, is outside the root; such files are never opened); duplicates get
    ``dup_group``. A folder tree's other files are listed in ``Catalog.skipped``. Ids are stable:
    a row's id changes only when a row sharing its stem (or product id) is added.
    Raises :class:`CatalogError` for an unreadable CSV (encoding, empty file), missing columns, empty
    labels or duplicate ids, FileNotFoundError when ``path`` does not exist.
    """
    source, target = detect_source(path)
    skipped = _empty_skipped()
    if source == "manifest":
        df, root, outside = _from_manifest(target)
    elif source == "kaggle":
        df, root, outside = _from_kaggle(target, subcategory_from)
    else:
        df, root, outside, skipped = _from_folder(target)
    df = df.reset_index(drop=True)
    for column in ("image_id", "category", "subcategory"):
        df[column] = df[column].astype("str")
    if "product_id" in df.columns:
        df["product_id"] = df["product_id"].astype("str").str.strip().where(df["product_id"].notna())
    else:
        df["product_id"] = pd.Series(np.nan, index=df.index, dtype="str")
    df["is_fashion"] = df["is_fashion"].astype(bool)

    linked = _linked_outside(df["path"], root) & ~outside
    name = df["image"] if "image" in df else df["path"]
    problems = [{"row": row, "problem": "outside_root",
                 "detail": f"{name.iat[row]} is {'a link to a file ' if linked[row] else ''}outside {root}"}
                for row in np.flatnonzero(outside | linked)]
    todo = ~(outside | linked)
    if validate:
        info, found = _validate(df, todo, workers=workers, max_pixels=max_pixels, progress=progress)
        for column in info.columns:
            df[column] = info[column].reindex(df.index)
        for column in ("width", "height", "bytes"):
            df[column] = df[column].astype("Int64")
        df["mode"] = df["mode"].astype("str")
        df["sha1"] = df["sha1"].astype("str")
    else:
        found = _stat(df, todo)
    problems += found
    problems.sort(key=lambda p: p["row"])
    bad = np.zeros(len(df), dtype=bool)
    bad[[p["row"] for p in problems]] = True
    df["dup_group"] = _duplicate_groups(df, ~bad)

    first = ["image_id", "path", "category", "subcategory", "is_fashion", "product_id", "dup_group",
             "sha1", "width", "height", "mode", "bytes"]
    first = [c for c in first if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    table = pd.DataFrame({
        "image_id": df["image_id"].to_numpy()[[p["row"] for p in problems]],
        "path": df["path"].to_numpy()[[p["row"] for p in problems]],
        "problem": [p["problem"] for p in problems],
        "detail": [p["detail"] for p in problems],
    }).astype("str") if problems else _empty_problems()
    return Catalog(df=df, root=Path(root).absolute(), source=source, problems=table, skipped=skipped)


# -------------------------------------------------------------------------------------------- report


def check_catalog_report(path: str | os.PathLike, *, subcategory_from: str = "articleType",
                         out: IO[str] | None = None, workers: int = 4) -> int:
    """Print (to ``out``, default stdout) counts per category and sub-category, the problems and the
    duplicate groups; used by ``cbir catalog check``.

    Returns 0 when the catalogue has at least one usable image, 1 when it is unusable
    (a :class:`CatalogError` is printed, or no usable image).
    """
    out = sys.stdout if out is None else out
    try:
        catalog = load_catalog(path, subcategory_from=subcategory_from, workers=workers)
    except CatalogError as exc:
        print(f"catalogue unusable: {exc}", file=out)
        return 1
    df, summary = catalog.df, catalog.summary()
    n_usable = int((~catalog.problem_mask()).sum())
    dups = catalog.duplicate_groups()
    fashion = df["is_fashion"].to_numpy() & ~catalog.problem_mask()
    print(f"catalogue {catalog.root} ({catalog.source}): {len(df)} images, {n_usable} usable "
          f"({int(fashion.sum())} fashion, {n_usable - int(fashion.sum())} non-fashion distractors), "
          f"{len(catalog.problems)} problems, {dups['dup_group'].nunique()} duplicate groups "
          f"({len(dups)} images)" + (f", {len(catalog.skipped)} files skipped" if len(catalog.skipped) else ""),
          file=out)
    per_category = summary.groupby("category").agg(
        n_images=("n_images", "sum"), n_usable=("n_usable", "sum"), n_fashion=("n_fashion", "sum"),
        n_subcategories=("subcategory", "size"))
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print("\ncounts per category:", file=out)
        print(per_category.to_string(), file=out)
        print("\ncounts per sub-category:", file=out)
        print(summary.to_string(index=False), file=out)
        print(f"\nproblems ({len(catalog.problems)}):", file=out)
        if len(catalog.problems):
            counts = catalog.problems["problem"].value_counts()
            print("  " + ", ".join(f"{k}: {v}" for k, v in counts.items()), file=out)
            print(catalog.problems.to_string(index=False), file=out)
        else:
            print("  none", file=out)
        if len(catalog.skipped):
            counts = catalog.skipped["reason"].value_counts()
            print(f"\nskipped files ({len(catalog.skipped)}): " + ", ".join(f"{k}: {v}" for k, v in counts.items()),
                  file=out)
            print(catalog.skipped.to_string(index=False), file=out)
        groups = dups.groupby("dup_group", sort=False).agg(
            n=("image_id", "size"), image_ids=("image_id", " ".join),
            subcategories=("subcategory", lambda s: " | ".join(pd.unique(s))))
        groups["mixed_labels"] = groups["subcategories"].str.contains(" | ", regex=False)
        mixed = int(groups["mixed_labels"].sum())
        print(f"\nduplicate groups ({len(groups)}, {len(dups)} images, {mixed} with different sub-categories;"
              " reported, not removed):", file=out)
        print(groups.to_string() if len(groups) else "  none", file=out)
    if n_usable == 0:
        print("catalogue unusable: no usable image", file=out)
        return 1
    return 0


# ------------------------------------------------------------------------------------ background stats


def _image_border(path: str, border: int, white_threshold: int) -> dict[str, float] | None:
    try:
        return border_stats(read_image(path), border=border, white_threshold=white_threshold)
    except ValueError:
        return None


def background_stats(catalog: Catalog, *, border: int = 1, white_threshold: int = 240,
                     white_frac: float = 0.5, grey_spread: float = 16.0, workers: int = 4,
                     progress: bool = True) -> pd.DataFrame:
    """Background statistics per usable image from its outer ``border`` pixels.

    Columns: ``image_id, category, subcategory, width, height, border_r, border_g, border_b,
    border_brightness, border_spread, border_white_frac`` (see :func:`cbir.images.border_stats`) and
    ``background``: ``"white"`` when ``border_white_frac >= white_frac``, ``"grey"`` when the median
    border is neutral (channel spread <= ``grey_spread``), else ``"other"``.
    With the defaults ``border_white_frac`` matches the real catalogue manifest's column.
    """
    from tqdm.auto import tqdm

    df = catalog.usable().df
    work = partial(_image_border, border=border, white_threshold=white_threshold)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        stats = list(tqdm(pool.map(work, df["path"]), total=len(df), desc="border statistics",
                          unit="img", disable=not progress, leave=False))
    table = pd.DataFrame([s or {} for s in stats], index=df.index,
                         columns=["border_r", "border_g", "border_b", "border_brightness", "border_spread",
                                  "border_white_frac"])
    out = df[["image_id", "category", "subcategory"]].copy()
    for column in ("width", "height"):
        out[column] = df[column] if column in df.columns else pd.NA
    out = pd.concat([out, table], axis=1)
    background = np.where(out["border_white_frac"] >= white_frac, "white",
                          np.where(out["border_spread"] <= grey_spread, "grey", "other"))
    out["background"] = pd.Series(background, index=out.index).where(out["border_white_frac"].notna())
    return out.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- splits


def _eligible(catalog: Catalog, stratify: str | None) -> tuple[np.ndarray, pd.Series, pd.Series]:
    """Rows that may be queries: usable fashion rows whose class has >= 2 distinct usable fashion images.

    "Distinct" counts a group of byte-identical files once (search excludes duplicates of the query).
    Returns (mask (N,), class label per row, distinct-content key per row).
    """
    df = catalog.df
    if stratify is not None and stratify not in df.columns:
        raise ValueError(f"stratify column {stratify!r} not in catalogue (columns: {list(df.columns)})")
    labels = df[stratify].astype("str") if stratify else pd.Series("all", index=df.index, dtype="str")
    content = df["dup_group"].fillna(df["image_id"]) if "dup_group" in df.columns else df["image_id"]
    fashion = df["is_fashion"].to_numpy(dtype=bool) if "is_fashion" in df.columns else np.ones(len(df), bool)
    ok = ~catalog.problem_mask() & fashion
    distinct = content[ok].groupby(labels[ok]).nunique()
    eligible = ok & (labels.map(distinct).fillna(0).to_numpy() >= 2)
    return eligible, labels, content


def _stratified_pick(labels: pd.Series, content: pd.Series, n: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``n`` positions stratified by ``labels`` (largest-remainder apportionment, proportional to
    class size, at most ``distinct - 1`` per class so every class keeps one image of other content)."""
    counts = labels.value_counts().sort_index()
    cap = content.groupby(labels).nunique().reindex(counts.index).to_numpy() - 1
    if n > cap.sum():
        raise CatalogError(f"asked for {n} stratified images but at most {int(cap.sum())} can be held out "
                           f"({len(counts)} classes, one image of each class must stay searchable)")
    exact = n * counts.to_numpy() / counts.sum()
    quota = np.minimum(np.floor(exact), cap).astype(int)
    tie = rng.random(len(counts))
    while quota.sum() < n:
        room = np.flatnonzero(cap > quota)
        order = room[np.lexsort((tie[room], -(exact[room] - quota[room])))]
        quota[order[: n - quota.sum()]] += 1
    key = pd.Series(rng.random(len(labels)), index=labels.index)
    rank = key.groupby(labels).rank(method="first").to_numpy()
    quota_row = pd.Series(quota, index=counts.index).reindex(labels.to_numpy()).to_numpy()
    return np.flatnonzero(rank <= quota_row)


def split_queries(catalog: Catalog, *, n_queries: int | None = None, query_fraction: float = 0.1,
                  seed: int = 0, stratify: str | None = "subcategory") -> Catalog:
    """Hold out query images from the searchable catalogue; returns a Catalog with ``split``.

    Deterministic for a seed; stratified by ``stratify`` (proportional allocation, largest remainder,
    ties broken by the seed). Only usable fashion images are queries; non-fashion items stay in the
    catalogue as distractors. An image is never a query when its class has fewer than 2 distinct
    usable fashion images (it could have no correct neighbour), and each class keeps at least one
    image of other content in the catalogue. ``n_queries`` defaults to
    ``round(query_fraction * eligible)``. Rows with problems get ``split = "catalog"``.

    scikit-learn's ``train_test_split(stratify=...)`` is not used: it needs at least as many queries
    as classes and two images per class, which the reference study (60 queries, 75 sub-categories,
    single-image classes) violates.
    """
    eligible, labels, content = _eligible(catalog, stratify)
    if not eligible.any():
        raise CatalogError("no query possible: no class has 2 distinct usable fashion images")
    if n_queries is None:
        n_queries = max(1, int(round(query_fraction * eligible.sum())))
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(eligible)
    picked = rows[_stratified_pick(labels.iloc[rows], content.iloc[rows], int(n_queries), rng)]
    split = np.full(len(catalog.df), "catalog", dtype=object)
    split[picked] = "query"
    df = catalog.df.copy()
    df["split"] = pd.Series(split, index=df.index, dtype="str")
    return catalog._replace(df)


def cross_validation_folds(catalog: Catalog, *, n_folds: int = 10, fold_size: int = 20, seed: int = 0,
                           stratify: str | None = "subcategory") -> list[np.ndarray]:
    """``n_folds`` disjoint arrays of ``fold_size`` image ids (str), fashion items only, stratified.

    The ``n_folds * fold_size`` images are drawn as in :func:`split_queries` (same eligibility),
    then dealt round-robin in class order so each fold gets a like share of every class.
    Raises CatalogError when the catalogue has too few eligible images.
    """
    if n_folds < 1 or fold_size < 1:
        raise ValueError(f"n_folds and fold_size must be >= 1, got {n_folds}, {fold_size}")
    eligible, labels, content = _eligible(catalog, stratify)
    total = n_folds * fold_size
    if total > eligible.sum():
        raise CatalogError(f"{n_folds} folds of {fold_size} need {total} eligible fashion images; "
                           f"the catalogue has {int(eligible.sum())} (usable fashion images in classes "
                           f"with >= 2 distinct images)")
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(eligible)
    pool = rows[_stratified_pick(labels.iloc[rows], content.iloc[rows], total, rng)]
    order = np.lexsort((rng.random(len(pool)), labels.to_numpy()[pool]))
    fold_of = np.empty(len(pool), dtype=int)
    fold_of[order] = np.arange(len(pool)) % n_folds
    ids = catalog.df["image_id"].to_numpy(dtype=str)
    return [ids[np.sort(pool[fold_of == f])] for f in range(n_folds)]


def catalog_frame(catalog: Any) -> pd.DataFrame:
    """The DataFrame of a :class:`~cbir.catalog.Catalog` (or a DataFrame), checked for ``image_id`` and ``path``."""
    df = getattr(catalog, "df", catalog)
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"catalog must be a Catalog or a DataFrame, got {type(catalog).__name__}")
    missing = [c for c in ("image_id", "path") if c not in df.columns]
    if missing:
        raise ValueError(f"the catalogue needs columns image_id and path; missing {missing}")
    ids = df["image_id"].astype(str)
    if ids.duplicated().any():
        raise ValueError(f"the catalogue has duplicate image_id values, e.g. {ids[ids.duplicated()].iloc[:5].tolist()}")
    return df


LABEL_KEY_COLUMNS = ("image_id", "category", "subcategory", "split", "is_fashion")
"""The columns whose values make a run's labelling: two catalogues that agree on them label (and split) every
image alike, whatever their paths."""


def labels_sha1(catalog: Any) -> str:
    """SHA-1 of a catalogue's labelling (:data:`LABEL_KEY_COLUMNS` present, rows sorted by ``image_id``).

    It is part of a feature run's identity, so a second run with another ``subcategory_from`` or another query
    split gets a run (and labels) of its own instead of relabelling the first one's images.
    """
    df = catalog_frame(catalog)
    cols = [c for c in LABEL_KEY_COLUMNS if c in df.columns]
    table = df[cols].astype(object).where(df[cols].notna(), None).astype(str)
    table = table.sort_values("image_id", kind="stable")
    return hashlib.sha1(table.to_csv(index=False, lineterminator="\n").encode("utf-8")).hexdigest()
