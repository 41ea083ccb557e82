"""A notebook's session: one call gives the catalogue (loaded and split), the store, the run and its labels,
and one way to save a table and one way to save a figure.

Every numbered notebook starts the same way::

    s = open_session(catalog=catalog, out_dir=out_dir, store=store, model=model, layer=layer, pooling=pooling,
                     weights=weights, batch_size=batch_size, l2_normalize=l2_normalize, pca_whiten=pca_whiten,
                     subcategory_from=subcategory_from, n_queries=n_queries, seed=seed)

Each notebook of a params file therefore works on the same split catalogue, hence the same run (a run's
identity includes its labels and split, :func:`cbir.catalog.labels_sha1`), and evaluates with the labels
that run recorded. Notebook 01 extracts (``extract=True``); the others find the run in the store without
building the model, and extract only what is missing when it is not complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cbir.catalog import Catalog, labels_sha1, load_catalog, split_queries
from cbir.datasets import resolve_catalog
from cbir.extract import catalogue_sha1, ensure_features, whiten_for_catalog
from cbir.store import FeatureStore

__all__ = ["Session", "open_session", "split_catalog", "find_complete_run"]


@dataclass
class Session:
    """What a notebook works on: ``catalog`` (split), ``store``, ``run_id`` and the output folder ``out_dir``
    (tables in ``tables/``, figures in ``figures/``). ``source_run_id`` is the unwhitened run when
    ``pca_whiten`` made ``run_id`` a derived run (else equal to ``run_id``)."""

    catalog: Catalog
    store: FeatureStore
    run_id: int
    out_dir: Path
    source_run_id: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def figures(self) -> Path:
        """``<out_dir>/figures``, where figures go (``path=s.figures / "name.png"`` for the plot functions)."""
        return self.out_dir / "figures"

    @cached_property
    def run(self) -> dict[str, Any]:
        """The run's record (:meth:`cbir.store.FeatureStore.run`)."""
        return self.store.run(self.run_id)

    @cached_property
    def labels(self) -> pd.DataFrame:
        """The labels and split the run was extracted with (one source of labels for every notebook)."""
        return self.store.run_labels(self.run_id)

    @cached_property
    def split_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """``(query_ids, searchable_ids)`` of the run's labels that have a vector, in catalogue order."""
        labels = self.labels
        ids = labels["image_id"].astype(str).to_numpy()
        has = np.isin(ids, self.store.ids_with_vectors(self.run_id, ids))
        query = (labels["split"] == "query").to_numpy()
        return ids[has & query], ids[has & ~query]

    @property
    def query_ids(self) -> np.ndarray:
        return self.split_ids[0]

    @property
    def searchable_ids(self) -> np.ndarray:
        return self.split_ids[1]

    def features(self, run_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, X)`` of the run (default this session's) for the catalogue's images, in catalogue order."""
        from cbir.extract import load_run_features

        return load_run_features(self.store, self.run_id if run_id is None else run_id, self.catalog)

    def neighbours(self, metrics: Sequence[str], *, k: int = 5, p: float = 3.0, same_category: bool = False,
                   tag: str = "") -> pd.DataFrame:
        """The run's neighbour sets for ``metrics`` (queries search the searchable images), searched only
        when not stored yet (:func:`cbir.neighbours.ensure_neighbours`)."""
        from cbir.neighbours import ensure_neighbours

        return ensure_neighbours(self.store, self.run_id, query_ids=self.query_ids,
                                 catalog_ids=self.searchable_ids, metrics=metrics, k=k, p=p,
                                 same_category=same_category, tag=tag)

    def save_table(self, name: str, df: pd.DataFrame, *, run_id: int | None = None, decimals: int = 4) -> Path:
        """Save ``df`` as ``<out_dir>/tables/<name>.csv`` (rounded) and in the store under the run (default
        this session's); returns the CSV path."""
        from cbir.results import save_result

        return save_result(self.store, name, df, run_id=self.run_id if run_id is None else run_id,
                           out_dir=self.out_dir, decimals=decimals)

    def save_figure(self, fig: Any, name: str, *, dpi: int = 110) -> Any:
        """Save ``fig`` as ``<out_dir>/figures/<name>.png`` and return it (so a cell can end with it)."""
        from cbir.plots import save_figure

        return save_figure(fig, self.figures / f"{name}.png", dpi=dpi)


def _weights_match(run: dict[str, Any], weights: Any) -> bool:
    """True when the run was extracted with ``weights`` (``imagenet``, ``none`` or a file, checked by SHA-1)."""
    label = str(run.get("weights") or "")
    if str(weights).endswith(".keras"):  # a trained model: the run's model file is that file
        from cbir.efficientnet_lite import file_sha1

        return Path(str(weights)).is_file() and run.get("weights_sha1") == file_sha1(Path(str(weights)))
    if label == "handcrafted":  # descriptors have no weights: any setting builds the same extractor
        return True
    if weights is None or str(weights).lower() == "none":
        return label.lower().startswith("none")
    if str(weights) == "imagenet":
        return label == "imagenet"
    path = Path(str(weights))
    if not path.is_file():
        return False
    from cbir.efficientnet_lite import file_sha1

    return bool(run.get("weights_sha1")) and file_sha1(path) == run["weights_sha1"]


def find_complete_run(store: FeatureStore, catalog: Any, *, model: str, layer: str | None = None,
                      pooling: str | None = None, weights: Any = "imagenet", l2_normalize: bool = False) -> int | None:
    """The complete run of these settings on this catalogue (same labels, split and file content, every image
    with an outcome), found from the store alone, without building the model; None when there is none or
    more than one could be meant."""
    if not isinstance(model, str):
        return None
    from cbir.extractors import is_model_file

    if is_model_file(model):  # a trained model: its runs carry its name and its file's SHA-1
        from cbir.train import trained_name

        if not Path(model).is_file():
            return None
        model, weights, layer, pooling = trained_name(model), model, "embedding", None
    df = getattr(catalog, "df", catalog)
    digest = labels_sha1(df)
    runs = store.runs()
    found = []
    for r in runs.itertuples(index=False):
        params = r.params
        if (r.status != "complete" or r.model != model or params.get("labels_sha1") != digest
                or (r.variant or "original") != "original" or r.pooling != pooling
                or bool(params.get("l2_normalize", False)) != bool(l2_normalize)
                or (layer is not None and r.layer != layer)):
            continue
        if int(r.n_features) + int(r.n_failures) != len(df) or not _weights_match(params | {
                "weights": r.weights, "weights_sha1": r.weights_sha1}, weights):
            continue
        found.append(int(r.run_id))
    if len(found) != 1:
        return None
    expected = dict(zip(df["image_id"].astype(str), catalogue_sha1(df)))
    stored = store.content_sha1(found[0])
    if any(h is None or stored.get(i, h) != h for i, h in expected.items()):
        return None  # other (or unknown) file content: extraction re-checks and replaces
    return found[0]


def split_catalog(catalog: str | os.PathLike = "demo", out_dir: str | os.PathLike = "../outputs/notebooks", *,
                  subcategory_from: str = "articleType", n_queries: int | None = 60, seed: int = 0) -> Catalog:
    """The catalogue every notebook of a params file works on: loaded (``"demo"`` generated under ``out_dir``
    once) and split into queries and searchable images (:func:`cbir.catalog.split_queries`)."""
    out = Path(out_dir)
    cat = load_catalog(resolve_catalog(catalog, out), subcategory_from=subcategory_from, progress=False)
    return split_queries(cat, n_queries=n_queries, seed=seed)


def open_session(*, catalog: str | os.PathLike = "demo", out_dir: str | os.PathLike = "../outputs/notebooks",
                 store: str | os.PathLike | None = None, model: Any = "efficientnet_lite0", layer: str | None = None,
                 pooling: str | None = "gap", weights: Any = "imagenet", batch_size: int = 32,
                 l2_normalize: bool = False, pca_whiten: bool = False, subcategory_from: str = "articleType",
                 n_queries: int | None = 60, seed: int = 0, extract: bool = False, progress: bool = False,
                 cluster: str | None = None, vectors: str = "store", **params: Any) -> Session:
    """Load and split the catalogue, open the store and find (``extract=False``) or extract the run.

    ``catalog``: a path or ``"demo"`` (generated under ``out_dir`` once). ``store``: default
    ``<out_dir>/features.sqlite``. The run is found in the store when it is complete for this catalogue
    (:func:`find_complete_run`); otherwise, or with ``extract=True``, :func:`cbir.extract.ensure_features`
    extracts what is missing. ``pca_whiten``: the whitened derived run, fitted on the searchable images.
    ``cluster`` (``"local:N"``, ``"tcp://HOST:PORT"``): extract on Dask (:mod:`cbir.distributed`), the same run;
    ``vectors="shards"`` keeps its vectors in the Parquet shards (the store records where; readers stream).
    Other keyword arguments are kept in ``Session.params``.
    """
    out = Path(out_dir)
    for sub in ("tables", "figures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cat = split_catalog(catalog, out, subcategory_from=subcategory_from, n_queries=n_queries, seed=seed)
    feature_store = FeatureStore(store if store is not None else out / "features.sqlite")
    source = None if extract else find_complete_run(feature_store, cat, model=model, layer=layer, pooling=pooling,
                                                    weights=weights, l2_normalize=l2_normalize)
    if source is None and cluster:
        from cbir.distributed import ensure_features_cluster

        source = ensure_features_cluster(cat, store=feature_store, model=model, layer=layer, pooling=pooling,
                                         weights=weights, batch_size=batch_size, l2_normalize=l2_normalize,
                                         progress=progress, cluster=cluster, vectors=vectors)
    if source is None and vectors != "store":
        raise ValueError(f"vectors={vectors!r} needs a cluster (cluster='local', 'local:N' or 'tcp://HOST:PORT'): "
                         "only Dask workers write shards")
    if source is None:
        source = ensure_features(cat, store=feature_store, model=model, layer=layer, pooling=pooling,
                                 weights=weights, batch_size=batch_size, l2_normalize=l2_normalize,
                                 progress=progress)
    run_id = whiten_for_catalog(feature_store, source, cat) if pca_whiten else source
    return Session(catalog=cat, store=feature_store, run_id=run_id, out_dir=out, source_run_id=source,
                   params=dict(params, model=model, layer=layer, pooling=pooling, weights=weights,
                               n_queries=n_queries, seed=seed, subcategory_from=subcategory_from))
