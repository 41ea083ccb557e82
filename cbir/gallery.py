"""Neighbour views: the neighbour browser, the gallery of stored neighbours and their static twins.

``neighbour_browser(store, run_id)`` (:class:`NeighbourBrowser`) searches a run's stored vectors from any
catalogue image, in the spirit of FiftyOne's similarity view: pick an image (or click "search from this"
under a result), choose ``k``, compare two measures or two runs side by side, keep only the mistakes
(neighbours of another sub-category); every thumbnail shows its id, labels and distance. Displayed in a
notebook it also leaves a static HTML rendering of its first view, so saved notebooks and their HTML
exports show the grid (hidden while the live widget is shown). :class:`RunVectors` holds one run's
vectors, labels and indexes (also the app's search): the run's saved faiss index for a measure when
:func:`cbir.index.build_index` made one and it is fresh, else exact search; each pane's caption says which
index and recall, or exact and why. :func:`relocate_paths` finds images whose stored absolute paths moved
with their outputs folder.

``neighbour_gallery(neighbours, catalog_df)`` returns a widget over precomputed neighbours: pick the
measure (or model / measure tuple) and a query. ``static_gallery(...)`` draws the same as a matplotlib
figure (papermill / nbval runs, reports); ``neighbour_overview(...)`` shows a few queries' neighbours as a
compact text table.
"""
from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cbir.measures import get_measure

from cbir.plots.retrieval import (MATCH_COLOUR, MISMATCH_COLOUR, QUERY_COLOUR, image_paths, neighbour_cards,
                                  plot_neighbour_grid, thumbnail, tuple_labels)
from cbir.runs import features_label
from cbir.search import METRICS, ExactIndex, search, similarity

__all__ = ["NeighbourBrowser", "neighbour_browser", "RunVectors", "relocate_paths", "card_html", "thumbnail_uri",
           "image_uri", "NeighbourGallery", "neighbour_gallery", "static_gallery", "neighbour_overview",
           "thumbnail_base64"]

_KEYS = ("model", "layer", "pooling", "metric")


@lru_cache(maxsize=4096)
def thumbnail_base64(path: str, size: int = 128, quality: int = 85) -> str:
    """Base64 JPEG of a ``size x size`` thumbnail of ``path`` (grey square if unreadable); cached."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(thumbnail(path, size)).save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _card_html(rec, path: str, thumb: int, level: str) -> str:
    if rec.role == "query":
        colour, caption = QUERY_COLOUR, f"<b>query</b><br>{html.escape(str(rec.label))}"
    else:
        colour = MATCH_COLOUR if rec.match else MISMATCH_COLOUR
        caption = f"<b>#{rec.rank}</b> {html.escape(str(rec.label))}<br>d = {rec.distance:.3f}"
    return (f'<div class="cbir-card" data-id="{html.escape(rec.image_id)}" data-match="{int(bool(rec.match))}" '
            f'title="{html.escape(rec.image_id)}" style="border:4px solid {colour};padding:2px;margin:2px;'
            f'width:{thumb + 4}px;text-align:center;font-size:11px;line-height:1.25">'
            f'<img src="data:image/jpeg;base64,{thumbnail_base64(str(path), thumb)}" width="{thumb}" '
            f'height="{thumb}"/><br>{caption}<br><span style="color:#777">{html.escape(rec.image_id)}</span></div>')


class NeighbourGallery(widgets.VBox):
    """The gallery widget: ``measure`` and ``query`` dropdowns, ``cards`` (one HTML widget per image)."""

    def __init__(self, neighbours: pd.DataFrame, labels: pd.DataFrame, *, level: str = "subcategory",
                 thumb: int = 128, paths=None, max_queries: int | None = None) -> None:
        nb = neighbours.copy()
        nb["query_id"] = nb["query_id"].astype(str)
        keys = [c for c in _KEYS if c in nb.columns]
        self._level, self._thumb = level, thumb
        self._labels = labels
        self._files = image_paths(labels, paths)
        if keys:
            codes = nb.groupby(keys, dropna=False, sort=False).ngroup().to_numpy()  # in order of appearance
            tuples = nb.assign(_code=codes).drop_duplicates("_code").sort_values("_code")[keys]
            names = tuple_labels(tuples.reset_index(drop=True), keys).tolist()
            self._sets = {i: nb.loc[codes == i] for i in range(len(names))}
        else:
            names, self._sets = ["neighbours"], {0: nb}
        lab = labels.set_index(labels["image_id"].astype(str))
        self._query_label = lab[level] if level in lab.columns else pd.Series(dtype=object)
        self._max_queries = max_queries
        self.measure = widgets.Dropdown(options=[(n, i) for i, n in enumerate(names)], value=0,
                                        description="measure", layout=widgets.Layout(width="340px"))
        self.query = widgets.Dropdown(options=self._query_options(0), description="query",
                                      layout=widgets.Layout(width="340px"))
        self.cards = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        legend = widgets.HTML(f'<span style="font-size:11px">frame: <b style="color:{QUERY_COLOUR}">query</b>, '
                              f'<b style="color:{MATCH_COLOUR}">same {level}</b>, '
                              f'<b style="color:{MISMATCH_COLOUR}">different {level}</b></span>')
        super().__init__([widgets.HBox([self.measure, self.query]), legend, self.cards])
        self.measure.observe(self._on_measure, names="value")
        self.query.observe(lambda _: self.refresh(), names="value")
        self.refresh()

    def _query_options(self, measure: int) -> list[tuple[str, str]]:
        ids = pd.unique(self._sets[measure]["query_id"])
        if self._max_queries is not None:
            ids = ids[: self._max_queries]
        return [(f"{q} ({self._query_label.get(q, '?')})", q) for q in ids]

    def _on_measure(self, change) -> None:
        current = self.query.value
        options = self._query_options(change["new"])
        with self.query.hold_trait_notifications():
            self.query.options = options
            values = [v for _, v in options]
            self.query.value = current if current in values else (values[0] if values else None)
        self.refresh()

    def shown(self) -> pd.DataFrame:
        """The cards on display (:func:`cbir.plots.retrieval.neighbour_cards` rows)."""
        if self.query.value is None:
            return pd.DataFrame(columns=["role", "image_id", "rank", "label", "distance", "match"])
        return neighbour_cards(self._sets[self.measure.value], self._labels, self.query.value, level=self._level)

    def refresh(self) -> None:
        """Redraw the cards for the current measure and query."""
        cards = self.shown()
        self.cards.children = tuple(
            widgets.HTML(_card_html(rec, self._files.get(rec.image_id, ""), self._thumb, self._level))
            for rec in cards.itertuples(index=False))


def neighbour_gallery(neighbours: pd.DataFrame, labels: pd.DataFrame, *, level: str = "subcategory",
                      thumb: int = 128, paths=None, max_queries: int | None = None) -> NeighbourGallery:
    """The interactive gallery over ``neighbours`` (one or several model / measure tuples) with ``labels`` a
    catalogue table (``image_id, category, subcategory, path``; or give ``paths``: image_id -> file)."""
    return NeighbourGallery(neighbours, labels, level=level, thumb=thumb, paths=paths, max_queries=max_queries)


def static_gallery(neighbours: pd.DataFrame, labels: pd.DataFrame, *, metric: str | None = None,
                   query_ids: Sequence[str] | None = None, n_queries: int = 6, level: str = "subcategory",
                   thumb: int = 112, path: str | os.PathLike | None = None, **keys) -> Figure:
    """The gallery as a static figure: ``n_queries`` queries (or ``query_ids``) of one tuple, chosen by
    ``metric`` and other key filters (``model=...``); see :func:`cbir.plots.retrieval.plot_neighbour_grid`."""
    nb = neighbours
    if metric is not None:
        keys = {"metric": metric, **keys}
    for key, value in keys.items():
        if key not in nb.columns:
            raise KeyError(f"neighbours has no column {key!r} to select on")
        nb = nb.loc[nb[key].isna() if value is None else (nb[key] == value).to_numpy()]
    if nb.empty:
        raise ValueError(f"no neighbours for {keys}")
    return plot_neighbour_grid(nb, labels, query_ids=query_ids, n_queries=n_queries, level=level, thumb=thumb,
                               path=path)


def neighbour_overview(neighbours: pd.DataFrame, labels: pd.DataFrame, query_ids: Sequence[str], *,
                       level: str = "subcategory", decimals: int = 3) -> pd.DataFrame:
    """A compact view of some queries' neighbours: one row per (query, its ``level`` label, measure), one
    column per rank holding ``"<mark> <neighbour label> <distance>"`` (mark ``+`` = same label as the query,
    ``-`` = different; distance rounded to ``decimals``)."""
    lab = labels.set_index(labels["image_id"].astype(str))[level]
    nb = neighbours.loc[neighbours["query_id"].astype(str).isin([str(q) for q in query_ids])].copy()
    if nb.empty:
        raise KeyError(f"no neighbours for queries {list(query_ids)[:5]}")
    if "metric" not in nb.columns:
        nb["metric"] = ""
    nb["query"] = nb["query_id"].astype(str)
    nb["query_label"] = nb["query"].map(lab)
    n_label = nb["neighbour_id"].astype(str).map(lab)
    mark = np.where(n_label.to_numpy() == nb["query_label"].to_numpy(), "+", "-")
    nb["cell"] = [f"{m} {lbl} {d:.{decimals}f}" for m, lbl, d in zip(mark, n_label, nb["distance"].astype(float))]
    order = {q: i for i, q in enumerate(str(q) for q in query_ids)}
    metric_order = {m: i for i, m in enumerate(METRICS)}
    wide = nb.pivot(index=["query", "query_label", "metric"], columns="rank", values="cell")
    wide = wide.sort_index(key=lambda s: s.map(order) if s.name == "query"
                           else (s.map(metric_order) if s.name == "metric" else s))
    wide.columns = [f"#{int(r)}" for r in wide.columns]
    wide.index.names = ["query", f"query {level}", "metric"]
    return wide.fillna("")


# ------------------------------------------------------------------------------ the neighbour browser
RESULT_COLUMNS = ["rank", "image_id", "category", "subcategory", "distance", "similarity", "path"]
"""Columns of a search result (:meth:`RunVectors.search_vector`, :meth:`RunVectors.search_image`)."""
NO_MATCH_QUANTILE = 0.99
"""A query whose nearest distance is beyond this quantile of the catalogue's own nearest-neighbour
distances has no close match (:meth:`RunVectors.no_match_threshold`)."""
_NEUTRAL_COLOUR = "#bbbbbb"
_SNAPSHOT_CSS = (".jp-OutputArea-child:has(+ .jp-OutputArea-child .cbir-browser) .cbir-snapshot,"
                 ".output_area:has(+ .output_area .cbir-browser) .cbir-snapshot{display:none}")
"""Hides the static snapshot while the live widget right after it is rendered (JupyterLab, Voila)."""


def relocate_paths(paths: pd.Series, *, bases: Sequence[str | os.PathLike] = (), sample: int = 8) -> pd.Series:
    """Image paths as stored (absolute), re-anchored when the files are no longer there.

    When a sample of the files is missing, the stored paths' common folder is replaced by the first
    candidate holding the whole sample: each of ``bases`` (e.g. the catalogue root, the store's folder and
    its parents) joined with the last 0, 1, 2, ... parts of the old common folder. So a catalogue that moved
    with its outputs folder (``outputs/demo/demo_catalog`` -> ``elsewhere/demo/demo_catalog``) is found next
    to the store. Paths are returned unchanged when they exist or no candidate holds them."""
    out = paths.astype(object).copy()
    given = out.notna().to_numpy() & (out.astype(str) != "").to_numpy()
    stored = out[given].astype(str).to_numpy()
    if len(stored) == 0:
        return out
    probe = np.unique(np.linspace(0, len(stored) - 1, min(sample, len(stored))).astype(int))
    if all(os.path.isfile(stored[i]) for i in probe):
        return out
    try:
        old_root = os.path.commonpath([os.path.dirname(p) for p in stored])
    except ValueError:  # absolute and relative paths mixed
        return out
    rel = [os.path.relpath(p, old_root) for p in stored]
    parts = Path(old_root).parts[1:] if os.path.isabs(old_root) else Path(old_root).parts
    tails = [Path(*parts[len(parts) - j:]) if j else Path() for j in range(len(parts) + 1)]
    for base in bases:
        for tail in tails:
            root = Path(base) / tail
            if os.path.normpath(root) == os.path.normpath(old_root) or not root.is_dir():
                continue
            if all((root / rel[i]).is_file() for i in probe):
                values = out.to_numpy(dtype=object).copy()
                values[given] = [os.path.join(root, r) for r in rel]
                return pd.Series(values, index=out.index, name=out.name, dtype=object)
    return out


@lru_cache(maxsize=1024)
def thumbnail_uri(path: str, *, size: int = 128) -> str:
    """A ``data:image/jpeg;base64,...`` thumbnail (longest side ``size`` px) of an image file ('' if unreadable)."""
    from cbir.images import ImageError, read_image

    try:
        return image_uri(read_image(path), size=size)
    except (ImageError, OSError, TypeError, ValueError):
        return ""


def image_uri(image: np.ndarray, *, size: int = 128) -> str:
    """A JPEG data URI of an HxWx3 uint8 image scaled so its longest side is ``size`` px."""
    from PIL import Image

    pil = Image.fromarray(image)
    pil.thumbnail((size, size))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def card_html(*, image_id: str, uri: str, label: str, category: str = "", caption: str = "",
              role: str = "result", match: bool | None = None, thumb: int = 112) -> str:
    """One thumbnail card: the image, its ``label`` (bold), ``category``, ``image_id`` and ``caption`` (rank and
    distance). Framed blue for the query, green / red when ``match`` is True / False, grey when unknown.
    CSS classes: ``cbir-card`` plus ``cbir-query`` or ``cbir-result``; ``cbir-label``, ``cbir-category``,
    ``cbir-id``, ``cbir-distance`` inside."""
    colour = QUERY_COLOUR if role == "query" else (
        _NEUTRAL_COLOUR if match is None else (MATCH_COLOUR if match else MISMATCH_COLOUR))
    css = "cbir-card cbir-query" if role == "query" else "cbir-card cbir-result"
    flag = "" if match is None else str(int(bool(match)))
    esc = html.escape
    img = (f'<img src="{uri}" alt="{esc(image_id)}" style="max-width:{thumb}px;max-height:{thumb}px">' if uri
           else f'<span style="color:#999">no image</span>')
    return (f'<div class="{css}" data-id="{esc(image_id)}" data-match="{flag}" title="{esc(image_id)}" '
            f'style="display:inline-block;vertical-align:top;box-sizing:border-box;width:{thumb + 16}px;margin:3px;'
            f'padding:3px;border:3px solid {colour};border-radius:4px;text-align:center;font-size:11px;'
            f'line-height:1.3;background:#fff">'
            f'<div style="height:{thumb}px;display:flex;align-items:center;justify-content:center">{img}</div>'
            f'<div class="cbir-label"><b>{esc(str(label))}</b></div>'
            f'<div class="cbir-category">{esc(str(category))}</div>'
            f'<div class="cbir-id" style="color:#666;overflow-wrap:anywhere">{esc(image_id)}</div>'
            + (f'<div class="cbir-distance">{esc(caption)}</div>' if caption else "") + "</div>")


def distance_caption(rank: int, distance: float) -> str:
    """``"#1 · d = 0.123"``."""
    return f"#{int(rank)} · d = {float(distance):.3f}"


class _Served:
    """How one measure is searched in a :class:`RunVectors`: the loaded faiss index (or None), per index
    position the row of ``RunVectors.ids`` (-1: not searchable here), the searchable rows the index does not
    hold (searched exactly), the caption and the stale-index warning."""

    def __init__(self, how: str, *, loaded: Any = None, rows: np.ndarray | None = None,
                 in_index: np.ndarray | None = None, rest: np.ndarray | None = None,
                 warning: str | None = None) -> None:
        self.how, self.loaded, self.rows, self.in_index, self.rest = how, loaded, rows, in_index, rest
        self.warning = warning
        self.n_unusable = 0 if rows is None else int((rows < 0).sum())
        self.rest_index: ExactIndex | None = None


class RunVectors:
    """One run's stored vectors and its own labels, searchable from any of its images or from a new vector.

    ``searchable="all"``: every image with a vector is searched (the app); ``"catalog"``: only images whose
    split is not ``query`` (notebook 02's searchable catalogue, so a query's neighbours equal those of
    :func:`cbir.neighbours.run_search`). Labels: ``labels`` or ``store.run_labels(run_id)`` (the store's
    catalogue for runs recorded before run labels existed); their paths go through :func:`relocate_paths`
    with ``bases``. Exact indexes (:class:`cbir.search.ExactIndex`) and no-match thresholds are computed once
    per measure.

    With ``use_index`` (default) a measure whose saved faiss index exists and is fresh
    (:func:`cbir.index.load_index`; cosine, euclidean and correlation only) is searched through it: its
    candidates are re-ranked with exact float64 distances, as :func:`cbir.index.search_vectors` does. An
    index holds the run's searchable images only (:func:`cbir.index.build_index` leaves the query split out
    to measure recall on it): with ``searchable="catalog"`` that is exactly what is searched; with ``"all"``
    (the app) the images the index does not hold (the query split) are searched exactly and merged by exact
    distance, so every image with a vector can still be found and the caption says so. A stale index (the
    run's vectors changed since the build) is not used: the measure is searched exactly and
    :meth:`index_warning` says why. :meth:`how` is the caption: the index's label and recall, or exact and
    why (manhattan, minkowski and chebyshev always: faiss approximate indexes serve only L2 and inner product)."""

    def __init__(self, store: Any, run_id: int, *, searchable: str = "all", bases: Sequence[str | os.PathLike] = (),
                 p: float = 3.0, labels: pd.DataFrame | None = None, label: str | None = None,
                 use_index: bool = True) -> None:
        if searchable not in ("all", "catalog"):
            raise ValueError(f"searchable must be 'all' or 'catalog', got {searchable!r}")
        self.store, self.run_id, self.p = store, int(run_id), float(p)
        self.use_index = bool(use_index)
        run = store.run(self.run_id)
        self.label = label or (f"run {self.run_id}: " + features_label(
            run["model"], run["layer"], run["pooling"], weights=run["weights"], variant=run.get("variant")))
        ids, X = store.features(self.run_id)
        self.ids, self.X = np.asarray(ids).astype(str), X
        if labels is None:
            labels = store.run_labels(self.run_id)
            if labels.empty:
                labels = store.catalog()
        labels = labels.copy()
        for col in ("category", "subcategory", "path", "dup_group", "split"):
            if col not in labels.columns:
                labels[col] = None
        labels.index = pd.Index(labels["image_id"].astype(str), name=None)
        labels["path"] = relocate_paths(labels["path"], bases=bases)
        self.labels = labels
        split = labels["split"].reindex(self.ids).astype(object)
        self.searchable = (np.ones(len(self.ids), dtype=bool) if searchable == "all"
                           else (split != "query").to_numpy(dtype=bool))
        self._rows = pd.Index(self.ids)
        self._indexes: dict[str, ExactIndex] = {}
        self._served: dict[str, _Served] = {}
        self._thresholds: dict[tuple[str, float], float] = {}

    @property
    def catalog_ids(self) -> np.ndarray:
        """The ids searched (in store order)."""
        return self.ids[self.searchable]

    def index(self, metric: str) -> ExactIndex:
        """The exact index of the searchable vectors for ``metric`` (built once)."""
        if metric not in self._indexes:
            self._indexes[metric] = ExactIndex(self.X[self.searchable], metric, p=self.p)
        return self._indexes[metric]

    def _serve(self, metric: str) -> _Served:
        """How ``metric`` is searched (the saved index loaded and checked once per measure)."""
        if metric in self._served:
            return self._served[metric]
        from cbir.index import exact_how, index_how, load_index

        if not self.use_index:
            served = _Served(exact_how(metric, use_index=False))
        else:
            try:
                loaded = load_index(self.store, self.run_id, metric)
            except ValueError as exc:  # stale: the run's vectors changed since the build
                loaded, served = None, _Served(exact_how(metric, "its saved index is stale; rebuild it with "
                                                                 f"`cbir index build --run {self.run_id} "
                                                                 f"--metric {metric}`"), warning=str(exc))
            else:
                served = _Served(exact_how(metric))
            if loaded is not None:
                rows = self._rows.get_indexer(np.asarray(loaded.ids).astype(str))  # -1: no vector here
                ok = rows >= 0
                ok[ok] = self.searchable[rows[ok]]
                rows = np.where(ok, rows, -1)  # -1 too where the image is not searched here
                in_index = np.zeros(len(self.ids), dtype=bool)
                in_index[rows[rows >= 0]] = True
                rest = np.flatnonzero(self.searchable & ~in_index)
                how = index_how(loaded.info)
                if len(rest):
                    n_query = int((self.labels["split"].reindex(self.ids[rest]).astype(object) == "query").sum())
                    what = "query-split images" if n_query == len(rest) else "images"
                    how += f"; the {len(rest)} {what} it leaves out are searched exactly"
                served = _Served(how, loaded=loaded, rows=rows, in_index=in_index, rest=rest)
        self._served[metric] = served
        return served

    def how(self, metric: str) -> str:
        """How ``metric`` is searched: the faiss index's label and measured recall (and file), or
        ``"exact search (<metric>: <why>)"``."""
        return self._serve(metric).how

    def index_warning(self, metric: str) -> str | None:
        """Why the saved index of ``metric`` is not used although one exists (stale: the run's vectors changed
        since it was built), or None."""
        return self._serve(metric).warning

    def vector(self, image_id: str) -> np.ndarray:
        """The stored vector of ``image_id``: float32[1, D]; ``KeyError`` when the run has none."""
        pos = self._rows.get_indexer([str(image_id)])[0]
        if pos < 0:
            raise KeyError(f"image {image_id!r} has no vector in run {self.run_id}")
        return self.X[pos:pos + 1]

    def excluded(self, image_id: str) -> set[str]:
        """``image_id`` and its byte-identical copies (same ``dup_group``): never its own neighbours."""
        image_id = str(image_id)
        out = {image_id}
        if image_id in self.labels.index:
            group = self.labels.at[image_id, "dup_group"]
            if isinstance(group, str) and group:
                out |= set(self.labels.index[(self.labels["dup_group"] == group).to_numpy()])
        return out

    def search_vector(self, query: np.ndarray, *, metric: str, k: int = 5,
                      exclude: set[str] | frozenset[str] = frozenset(), use_index: bool = True) -> pd.DataFrame:
        """The ``k`` nearest searchable images of one vector (ids in ``exclude`` left out):
        :data:`RESULT_COLUMNS`, nearest first (ties in store order). Through the measure's saved index when
        there is a fresh one (and ``use_index``), else exactly; ``.attrs["how"]`` says which (:meth:`how`)."""
        from cbir.index import exact_how

        served = self._serve(metric) if use_index else None
        if served is not None and served.loaded is not None:
            found, dist = self._search_served(served, np.asarray(query, dtype=np.float32).reshape(1, -1),
                                              metric=metric, k=int(k), exclude=exclude)
            return self._result(found, dist, metric, served.how)
        how = served.how if served is not None else exact_how(metric, use_index=False)
        cat_ids = self.catalog_ids
        ex = np.array(sorted(exclude), dtype=str)
        n = min(len(cat_ids), int(k) + int(np.isin(cat_ids, ex).sum()))
        if n < 1:
            return self._result(np.array([], dtype=str), np.array([], dtype=np.float64), metric, how)
        dist, idx = self.index(metric).search(np.asarray(query, dtype=np.float32).reshape(1, -1), n)
        found, dist = cat_ids[idx[0]], np.asarray(dist[0], dtype=np.float64)
        keep = ~np.isin(found, ex)
        return self._result(found[keep][: int(k)], dist[keep][: int(k)], metric, how)

    def _search_served(self, served: _Served, Q: np.ndarray, *, metric: str, k: int,
                       exclude: set[str] | frozenset[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, exact distances) of the top ``k``: the index's candidates (enough of them to make up for the
        excluded ones it holds) and, exactly, the searchable images it does not hold; merged by exact distance."""
        ex_rows = self._rows.get_indexer(np.array(sorted(exclude), dtype=str))
        ex_rows = ex_rows[ex_rows >= 0]
        excluded = np.zeros(len(self.ids), dtype=bool)
        excluded[ex_rows] = True
        rows = []
        wanted = served.loaded.n_candidates(k)  # k, or k x rerank for IVF-PQ: re-ranked exactly below
        n = min(len(served.rows), wanted + served.n_unusable + int(served.in_index[ex_rows].sum()))
        if n > 0:
            _, pos = served.loaded.search(Q, n)
            cand = served.rows[pos[0][pos[0] >= 0]]
            cand = cand[cand >= 0]
            rows.append(cand[~excluded[cand]][:wanted])
        if len(served.rest):
            if served.rest_index is None:
                served.rest_index = ExactIndex(self.X[served.rest], metric, p=self.p)
            m = min(len(served.rest), k + int(excluded[served.rest].sum()))
            _, idx = served.rest_index.search(Q, m)
            cand = served.rest[idx[0]]
            rows.append(cand[~excluded[cand]][:k])
        rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        dist = get_measure(metric).exact(np.repeat(Q.astype(np.float64), len(rows), 0),
                                         np.asarray(self.X[rows], dtype=np.float64), self.p)
        order = np.lexsort((rows, dist))[:k]  # exact distance, then store order
        return self.ids[rows[order]], np.asarray(dist[order], dtype=np.float64)

    def _result(self, found: np.ndarray, dist: np.ndarray, metric: str, how: str) -> pd.DataFrame:
        lab = self.labels.reindex(found)
        out = pd.DataFrame({
            "rank": np.arange(1, len(found) + 1),
            "image_id": found,
            "category": lab["category"].to_numpy(dtype=object),
            "subcategory": lab["subcategory"].to_numpy(dtype=object),
            "distance": dist,
            "similarity": similarity(metric, dist),
            "path": lab["path"].to_numpy(dtype=object),
        }, columns=RESULT_COLUMNS)
        out.attrs["how"] = how
        return out

    def search_image(self, image_id: str, *, metric: str, k: int = 5) -> pd.DataFrame:
        """The ``k`` nearest searchable images of a stored image, leaving out itself and its byte-identical copies."""
        return self.search_vector(self.vector(image_id), metric=metric, k=k, exclude=self.excluded(image_id))

    def nearest_distances(self, metric: str, *, max_images: int = 2000, seed: int = 0) -> np.ndarray:
        """Each searchable image's distance to its nearest other searchable image (itself and its byte-identical
        copies left out, as :func:`cbir.search.search` does): float64[n] for at most ``max_images`` images
        drawn with ``seed`` (all of them in catalogues up to that size)."""
        cat_ids, X = self.catalog_ids, self.X[self.searchable]
        if len(cat_ids) < 2:
            return np.empty(0)
        pick = np.arange(len(cat_ids))
        if len(pick) > max_images:
            pick = np.sort(np.random.default_rng(seed).choice(len(pick), int(max_images), replace=False))
        groups = self.labels["dup_group"].dropna()
        groups = groups[groups.astype(str) != ""]
        found = search(cat_ids, X, cat_ids[pick], X[pick], metric=metric, k=1, p=self.p,
                       dup_groups=groups if len(groups) else None)
        return found["distance"].to_numpy(dtype=np.float64)

    def no_match_threshold(self, metric: str, *, quantile: float = NO_MATCH_QUANTILE) -> float:
        """The ``quantile`` of :meth:`nearest_distances` under ``metric`` (NaN for a catalogue under two images):
        a query farther than this from every catalogue image has no close match. Computed once per measure."""
        key = (metric, float(quantile))
        if key not in self._thresholds:
            d = self.nearest_distances(metric)
            self._thresholds[key] = float(np.quantile(d, quantile)) if len(d) else float("nan")
        return self._thresholds[key]

    def image_options(self, *, mark_queries: bool = True) -> list[tuple[str, str]]:
        """Dropdown options ``("id · sub-category (category)", id)`` of the images with a vector, by sub-category
        then id (``· query`` marks the query split when ``mark_queries``)."""
        lab = self.labels.reindex(self.ids)
        sub = lab["subcategory"].astype(str).to_numpy()
        query = (lab["split"].astype(object) == "query").to_numpy() if mark_queries else np.zeros(len(sub), bool)
        text = [f"{i} · {s} ({c})" + (" · query" if q else "")
                for i, s, c, q in zip(self.ids, sub, lab["category"].astype(str), query)]
        return [(text[j], str(self.ids[j])) for j in np.lexsort((self.ids, sub))]


class _Pane(widgets.VBox):
    """One side of the browser: a run and a measure, a title and the result cards (each with its button)."""

    def __init__(self, runs: dict[int, RunVectors], run_id: int, metric: str, metrics: Sequence[str],
                 name: str) -> None:
        self.run = widgets.Dropdown(options=[(r.label, i) for i, r in runs.items()], value=run_id, description="run",
                                    layout=widgets.Layout(width="100%", display="" if len(runs) > 1 else "none"),
                                    style={"description_width": "3em"})
        self.metric = widgets.Dropdown(options=list(metrics), value=metric, description="measure",
                                       layout=widgets.Layout(width="16em"), style={"description_width": "4.5em"})
        self.title = widgets.HTML()
        self.cards = widgets.Box(layout=widgets.Layout(display="flex", flex_flow="row wrap", align_items="flex-start"))
        self.buttons: list[widgets.Button] = []
        self.shown = pd.DataFrame(columns=[*RESULT_COLUMNS, "match"])
        self.found = self.shown
        super().__init__([self.run, self.metric, self.title, self.cards],
                         layout=widgets.Layout(flex="1 1 420px", min_width="300px", margin="0 8px 0 0"))
        self.add_class(f"cbir-pane-{name}")


class NeighbourBrowser(widgets.VBox):
    """Browse a run's neighbours from any catalogue image (see the module docstring).

    ``runs``: one or more :class:`RunVectors` (e.g. two models on the same catalogue). Controls (attributes):
    ``image`` (the query image), ``k``, ``mistakes`` (show only neighbours of another ``level`` label),
    ``back`` (the previous query), ``compare`` (show the second pane); ``panes[i].run`` / ``.metric`` per
    side, ``panes[i].buttons[j]`` ("search from this" under each result) and ``panes[i].shown`` (the rows on
    display: :data:`RESULT_COLUMNS` + ``match``). :meth:`snapshot_html` renders the current view as static
    HTML; displayed in a notebook the browser shows it before the live widget (hidden while that is live).
    Each pane's title ends with a caption (class ``cbir-search-how``) saying how it searched: the run's faiss
    index for the measure, its measured recall and file, or exact search and why
    (:meth:`RunVectors.how`)."""

    def __init__(self, runs: RunVectors | Sequence[RunVectors], *, metrics: Sequence[str] | None = None,
                 metric: str | None = None, k: int = 5, max_k: int = 50, level: str = "subcategory",
                 image: str | None = None, compare_metric: str | None = None, compare_run: int | None = None,
                 only_mistakes: bool = False, thumb: int = 96) -> None:
        runs = [runs] if isinstance(runs, RunVectors) else list(runs)
        if not runs:
            raise ValueError("neighbour browser needs at least one run")
        self.runs = {r.run_id: r for r in runs}
        self.metrics = list(metrics or METRICS)
        metric = metric or ("cosine" if "cosine" in self.metrics else self.metrics[0])
        for m in (metric, compare_metric):
            if m is not None and m not in self.metrics:
                raise ValueError(f"measure {m!r} is not one of {', '.join(self.metrics)}")
        if level not in ("category", "subcategory"):
            raise ValueError(f"level must be 'category' or 'subcategory', got {level!r}")
        if compare_run is not None and int(compare_run) not in self.runs:
            raise ValueError(f"compare_run {compare_run} is not one of the runs {sorted(self.runs)}")
        self.level, self.thumb = level, int(thumb)
        first = runs[0]
        options = first.image_options()
        ids = [v for _, v in options]
        if image is None:
            queries = first.ids[(first.labels["split"].reindex(first.ids).astype(object) == "query").to_numpy()]
            image = str(queries[0]) if len(queries) else (ids[0] if ids else None)
        elif str(image) not in set(ids):
            raise KeyError(f"image {image!r} has no vector in run {first.run_id}")
        self._history: list[str] = []
        self.image = widgets.Dropdown(options=options, value=None if image is None else str(image),
                                      description="image", layout=widgets.Layout(width="30em"),
                                      style={"description_width": "3.5em"})
        self.k = widgets.BoundedIntText(value=min(int(k), int(max_k)), min=1, max=int(max_k), description="k",
                                        layout=widgets.Layout(width="8em"), style={"description_width": "1.5em"})
        self.mistakes = widgets.Checkbox(value=bool(only_mistakes), description=f"only mistakes (other {level})",
                                         indent=False, layout=widgets.Layout(width="auto", margin="0 12px"))
        self.back = widgets.Button(description="back", icon="arrow-left", disabled=True,
                                   layout=widgets.Layout(width="7em"))
        other_metric = compare_metric or (self.metrics[1] if len(self.metrics) > 1 and self.metrics[0] == metric
                                          else self.metrics[0])
        self.compare = widgets.Checkbox(value=compare_metric is not None or compare_run is not None,
                                        description="compare side by side", indent=False,
                                        layout=widgets.Layout(width="auto"))
        self.panes = [_Pane(self.runs, first.run_id, metric, self.metrics, "a"),
                      _Pane(self.runs, int(compare_run) if compare_run is not None else first.run_id, other_metric,
                            self.metrics, "b")]
        self.query_card = widgets.HTML()
        legend = widgets.HTML(
            f'<span style="font-size:11px">frame: <b style="color:{QUERY_COLOUR}">query</b>, '
            f'<b style="color:{MATCH_COLOUR}">same {html.escape(level)}</b>, '
            f'<b style="color:{MISMATCH_COLOUR}">other {html.escape(level)}</b>; '
            f'"search from this" searches from a result</span>')
        top = widgets.HBox([self.image, self.k, self.mistakes, self.back, self.compare],
                           layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        sides = widgets.Box(self.panes, layout=widgets.Layout(display="flex", flex_flow="row wrap",
                                                              align_items="flex-start", width="100%"))
        super().__init__([top, legend, self.query_card, sides])
        self.add_class("cbir-browser")
        for control in (self.k, self.mistakes, self.compare, *(p.run for p in self.panes),
                        *(p.metric for p in self.panes)):
            control.observe(lambda _: self.refresh(), names="value")
        self.image.observe(self._on_image, names="value")
        self.back.on_click(lambda _: self.go_back())
        self.refresh()

    # -- navigation ---------------------------------------------------------------------------
    def _on_image(self, change: Mapping[str, Any]) -> None:
        if change["old"] is not None and not getattr(self, "_going_back", False):
            self._history.append(change["old"])
        self.back.disabled = not self._history
        self.refresh()

    def search_from(self, image_id: str) -> None:
        """Search from ``image_id`` (what a result's "search from this" button does)."""
        self.image.value = str(image_id)

    def go_back(self) -> None:
        """Return to the previous query image."""
        if not self._history:
            return
        self._going_back = True
        try:
            self.image.value = self._history.pop()
        finally:
            self._going_back = False
        self.back.disabled = not self._history

    # -- view -----------------------------------------------------------------------------------
    def _query_html(self) -> str:
        image_id = self.image.value
        if image_id is None:
            return ""
        lab = self.runs[self.panes[0].run.value].labels
        row = lab.loc[image_id] if image_id in lab.index else pd.Series(dtype=object)
        split = " (a query)" if row.get("split") == "query" else ""
        return card_html(image_id=image_id, uri=thumbnail_uri(str(row.get("path", "")), size=self.thumb),
                         label=str(row.get(self.level, "")), category=str(row.get("category", "")),
                         caption=f"query{split}", role="query", thumb=self.thumb)

    def _pane_title(self, pane: _Pane, run: RunVectors) -> str:
        found = pane.found
        n_same = int(found["match"].sum()) if len(found) else 0
        shown = (f"; showing the {len(pane.shown)} mistakes" if self.mistakes.value else "")
        return (f'<div class="cbir-pane-title" style="font-size:12px"><b>{html.escape(run.label)}</b> · '
                f'{html.escape(pane.metric.value)}: {n_same} of {len(found)} same {html.escape(self.level)}'
                f'{shown}<div class="cbir-search-how" style="font-size:11px;color:#666">search: '
                f'{html.escape(run.how(pane.metric.value))}</div></div>')

    def _search(self, pane: _Pane) -> str:
        """Fill ``pane.found`` / ``pane.shown``; returns the pane's title HTML."""
        run = self.runs[pane.run.value]
        empty = pd.DataFrame(columns=[*RESULT_COLUMNS, "match"])
        image_id = self.image.value
        if image_id is None:
            pane.found = pane.shown = empty
            return ""
        try:
            found = run.search_image(image_id, metric=pane.metric.value, k=self.k.value)
        except KeyError as exc:
            pane.found = pane.shown = empty
            return f'<div class="cbir-pane-title cbir-error">{html.escape(str(exc.args[0]))}</div>'
        q_label = run.labels[self.level].get(image_id) if self.level in run.labels.columns else None
        found["match"] = (found[self.level] == q_label).to_numpy(dtype=bool) if q_label is not None else False
        pane.found = found
        pane.shown = found.loc[~found["match"]].reset_index(drop=True) if self.mistakes.value else found
        return self._pane_title(pane, run)

    def _cards_html(self, pane: _Pane) -> list[str]:
        return [card_html(image_id=str(r.image_id), uri=thumbnail_uri(str(r.path), size=self.thumb),
                          label=str(getattr(r, self.level, "")), category=str(r.category),
                          caption=distance_caption(r.rank, r.distance), match=bool(r.match), thumb=self.thumb)
                for r in pane.shown.itertuples(index=False)]

    def refresh(self) -> None:
        """Search again with the current controls and redraw."""
        self.query_card.value = self._query_html()
        for i, pane in enumerate(self.panes):
            active = i == 0 or self.compare.value
            pane.layout.display = "flex" if active else "none"
            if not active:
                pane.cards.children, pane.buttons = (), []
                continue
            pane.title.value = self._search(pane)
            cards, buttons = [], []
            for image_id, card in zip(pane.shown["image_id"].astype(str), self._cards_html(pane)):
                button = widgets.Button(description="search from this", tooltip=f"search from {image_id}",
                                        layout=widgets.Layout(width=f"{self.thumb + 16}px", margin="0 3px 6px 3px"))
                button.on_click(lambda _, image_id=image_id: self.search_from(image_id))
                button.add_class("cbir-search-from")
                buttons.append(button)
                cards.append(widgets.VBox([widgets.HTML(card), button], layout=widgets.Layout(width="auto")))
            pane.cards.children, pane.buttons = tuple(cards), buttons

    def snapshot_html(self) -> str:
        """The current view as static HTML (no widgets): the settings, the query, and each pane's cards."""
        settings = f"k = {self.k.value}" + (f", only mistakes (other {self.level})" if self.mistakes.value else "")
        sides = []
        for i, pane in enumerate(self.panes):
            if i and not self.compare.value:
                continue
            run = self.runs[pane.run.value]
            title = self._pane_title(pane, run) if pane.found is not None else ""
            sides.append(f'<div style="flex:1 1 420px;min-width:300px;margin-right:8px">{title}'
                         f'<div style="display:flex;flex-flow:row wrap">{"".join(self._cards_html(pane))}</div></div>')
        return (f'<style>{_SNAPSHOT_CSS}</style><div class="cbir-snapshot">'
                f'<div style="font-size:11px;color:#555">Neighbour browser (static view of query '
                f'{html.escape(str(self.image.value))}, {html.escape(settings)}; run the notebook to browse)</div>'
                f'{self._query_html()}<div style="display:flex;flex-flow:row wrap">{"".join(sides)}</div></div>')

    def _ipython_display_(self, **kwargs: Any) -> None:
        """A static snapshot (for saved notebooks and HTML exports), then the live widget."""
        from IPython.display import HTML, display

        display(HTML(self.snapshot_html()))
        display(self._repr_mimebundle_(), raw=True)


def neighbour_browser(store: Any, run_ids: int | Sequence[int], *, metrics: Sequence[str] | None = None,
                      metric: str | None = None, k: int = 5, searchable: str = "catalog", p: float = 3.0,
                      level: str = "subcategory", image: str | None = None, compare_metric: str | None = None,
                      compare_run: int | None = None, only_mistakes: bool = False, thumb: int = 80,
                      bases: Sequence[str | os.PathLike] = (), use_index: bool = True) -> NeighbourBrowser:
    """A :class:`NeighbourBrowser` over the stored vectors of ``run_ids`` in ``store`` (see
    :class:`RunVectors` for ``searchable``, ``p``, ``bases`` and ``use_index``: a run's fresh faiss index serves
    its measure, else exact search; the store's folder is always a base)."""
    ids = [run_ids] if isinstance(run_ids, (int, np.integer)) else list(run_ids)
    folder = Path(getattr(store, "path", ".")).parent
    bases = [*bases, folder, *list(folder.parents)[:3]]
    runs = [RunVectors(store, int(r), searchable=searchable, p=p, bases=bases, use_index=use_index) for r in ids]
    return NeighbourBrowser(runs, metrics=metrics, metric=metric, k=k, level=level, image=image,
                            compare_metric=compare_metric, compare_run=compare_run, only_mistakes=only_mistakes,
                            thumb=thumb)
