"""Interactive neighbour gallery (ipywidgets) and its static twin for non-interactive runs.

``neighbour_gallery(neighbours, catalog_df)`` returns a widget: pick the measure (or model / measure
tuple) and a query, and see the query and its k neighbours as JPEG thumbnails with labels and
distances, framed green when a neighbour has the query's label and red when not.
``static_gallery(...)`` draws the same as a matplotlib figure (papermill / nbval runs, reports);
``neighbour_overview(...)`` shows a few queries' neighbours as a compact text table.
"""
from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from functools import lru_cache

import ipywidgets as widgets
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cbir.plots.retrieval import (MATCH_COLOUR, MISMATCH_COLOUR, QUERY_COLOUR, image_paths, neighbour_cards,
                                  plot_neighbour_grid, thumbnail, tuple_labels)
from cbir.search import METRICS

__all__ = ["NeighbourGallery", "neighbour_gallery", "static_gallery", "neighbour_overview", "thumbnail_base64"]

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
