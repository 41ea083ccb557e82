"""The thin ``cbir`` command: parses arguments and calls the package; holds no logic of its own.

User errors (a bad catalogue, image, store or parameter; a missing or read-only file; a full disk) print one
``error: ...`` line to stderr and exit with status 1, never a traceback. Reading commands open the store
read-only: a missing store is an error, never created."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbir.extractors import backbone_names, extractor_names
from cbir.pooling import POOLINGS


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cbir")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cmd_catalog_check(args: argparse.Namespace) -> int:
    from cbir.catalog import check_catalog_report

    return check_catalog_report(args.path, subcategory_from=args.subcategory_from, out=sys.stdout)


def _cmd_demo_catalog(args: argparse.Namespace) -> int:
    from cbir.datasets import make_demo_catalog

    manifest = make_demo_catalog(args.dir, n=args.n, seed=args.seed)
    print(f"wrote {manifest}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from cbir.catalog import load_catalog
    from cbir.extract import extract_features
    from cbir.store import FeatureStore

    if args.vectors == "shards" and not (args.cluster or args.scheduler):
        raise ValueError("--vectors shards needs --cluster or --scheduler: only Dask workers write shards")
    catalog = load_catalog(args.catalog).usable()
    if len(catalog) == 0:  # refused before a store or a run is made
        raise ValueError(f"{args.catalog}: no usable image to extract (see `cbir catalog check {args.catalog}`)")
    store = FeatureStore(args.store)
    settings = dict(model=args.model, layer=args.layer, pooling=args.pooling, weights=args.weights, store=store,
                    batch_size=args.batch_size, workers=args.workers, l2_normalize=args.l2, name=args.name)
    cluster = args.cluster or args.scheduler
    if cluster:  # on Dask: the same run, its shards beside the store
        from cbir.distributed import extract_distributed

        run_id = extract_distributed(catalog, cluster=cluster, vectors=args.vectors, **settings)
    else:
        run_id = extract_features(catalog, **settings)
    info = store.run(run_id)
    replaced = info["stats"].get("n_vectors_replaced") if info["finished"] else None
    note = f" ({replaced} replaced: their files changed)" if replaced else ""
    kept = f" (kept in its shards, {info['stats']['shard_dir']})" if info["stats"].get("vectors") == "shards" else ""
    print(f"run {run_id}: {info['n_features']} feature vectors in {args.store}{kept}{note}")
    return 0


def _model_or_file(value: str) -> str:
    """``--model``: a registered extractor, or a trained model file ``DIR/model.keras`` (``cbir train``)."""
    from cbir.extractors import is_model_file

    if is_model_file(value):
        if not Path(value).is_file():
            raise argparse.ArgumentTypeError(f"trained model file not found: {value}")
        return value
    if value not in extractor_names():
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(extractor_names())}, "
                                         f"or a DIR/model.keras written by `cbir train`)")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from cbir.catalog import load_catalog, split_queries
    from cbir.train import TrainConfig, ensure_trained, train

    settings = {k: v for k, v in dict(method=args.method, backbone=args.backbone, weights=args.weights,
                                      label=args.label, blocks=args.blocks, epochs=args.epochs,
                                      fine_tune_epochs=args.fine_tune_epochs, encoder=args.encoder,
                                      holdout=tuple(args.holdout or ()), seed=args.seed).items() if v is not None}
    config = TrainConfig.from_mapping(settings)
    catalog = split_queries(load_catalog(args.catalog, subcategory_from=args.subcategory_from),
                            n_queries=args.n_queries, seed=args.seed)
    run = train if args.force else ensure_trained
    out = run(catalog, config, args.out, cache_dir=args.cache, progress=True, verbose=2)
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in test.items() if k != "n")
    print(f"{out / 'model.keras'}: {config.method} on {metrics['images']['train']} training images, "
          f"{metrics['classes']} classes; test ({test['n']} images): {shown}; {metrics['wall_seconds']:.0f} s")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cbir.extract import export_features
    from cbir.store import FeatureStore, StoreError

    store = FeatureStore(args.store, readonly=True)
    runs = store.runs()["run_id"]
    if args.run is None and runs.empty:
        raise StoreError(f"{store.path}: no runs to export")
    path = export_features(store, int(runs.max()) if args.run is None else args.run, args.out)
    print(f"wrote {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from cbir.run import check_params_files, run_params

    overrides = {name: value for name, value in (args.param or [])}
    check_params_files(args.params, overrides=overrides)  # every file valid before any notebook starts
    ok = True
    for params_file in args.params:
        ok &= run_params(params_file, overrides=overrides, force=args.force, only=args.only)
    return 0 if ok else 1


def _cmd_list(args: argparse.Namespace) -> int:
    """``cbir list models|measures|poolings|params|runs``: one name per line (runs: a table)."""
    if args.what == "models":
        from cbir.extractors import get_entry

        for name in extractor_names():
            entry = get_entry(name)
            print(f"{name:22s} {entry.kind:11s} {entry.input_size} px")
    elif args.what == "measures":
        from cbir.measures import MEASURES

        for measure in MEASURES.values():
            print(f"{measure.name:12s} {measure.description}")
    elif args.what == "poolings":
        for pooling in POOLINGS.values():
            print(f"{pooling.name:6s} {pooling.description}")
    elif args.what == "params":
        from cbir.params import REPO_ROOT

        for path in sorted((REPO_ROOT / "params").glob("*.yaml")):
            print(path.relative_to(REPO_ROOT))
    else:
        from cbir.runs import run_table
        from cbir.store import FeatureStore

        if args.store is None:
            raise ValueError("cbir list runs needs --store PATH")
        table = run_table(FeatureStore(args.store, readonly=True))
        print(table[["run_id", "features", "status", "n_features", "n_failures"]].to_string(index=False))
    return 0


def _cmd_index_build(args: argparse.Namespace) -> int:
    from cbir.index import build_index
    from cbir.store import FeatureStore

    info = build_index(FeatureStore(args.store, readonly=True), args.run, metric=args.metric, kind=args.kind,
                       memory_gb=args.memory, target_recall=args.target_recall, k=args.k)
    print(f"run {args.run}: {info.kind} index of {info.n} vectors ({info.chosen_because})")
    print(info.table().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    met = "reaches" if info.met_target else "does NOT reach"
    print(f"kept {info.label}: {met} the target recall@{info.k} {info.target_recall}; wrote {info.path}")
    return 0


def _cmd_index_add(args: argparse.Namespace) -> int:
    from cbir.index import add_to_index
    from cbir.store import FeatureStore

    info = add_to_index(FeatureStore(args.store, readonly=True), args.run, args.metric)
    print(f"run {args.run}: {info.label}; {info.n} vectors in {info.path}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from cbir.index import search_image
    from cbir.store import FeatureStore

    found = search_image(FeatureStore(args.store, readonly=True), args.run, args.image, k=args.k,
                         metric=args.metric, p=args.p, weights=args.weights, use_index=not args.exact)
    print(f"{args.metric}, {found.how}")
    print(found.neighbours.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def _cmd_tag(args: argparse.Namespace) -> int:
    from cbir.tagging import check_out, tag_catalog, tag_summary, write_tags

    check_out(args.out)  # before any image is tagged
    tags = tag_catalog(args.model, args.catalog, batch_size=args.batch_size, low_confidence=args.low_confidence,
                       disagree=args.disagree, progress=True)
    out, n = write_tags(tags, args.out), tag_summary(tags)
    unreadable = f" ({n['n_errors']} unreadable)" if n["n_errors"] else ""
    print(f"tagged {n['n_tagged']} images{unreadable}: {n['n_low_confidence']} low-confidence, "
          f"{n['n_mistag']} likely mis-tags; wrote {out}")
    return 0


def _probability(value: str) -> float:
    """``--low-confidence`` / ``--disagree``: a number between 0 and 1."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {value!r}")
    return number


def _pooling(value: str) -> str | None:
    """``--pooling``: a registered pooling, or ``none`` (any case) for the named layer as it is."""
    if value.lower() == "none":
        return None
    if value not in POOLINGS:
        raise argparse.ArgumentTypeError(f"unknown pooling {value!r}; choose from {', '.join(POOLINGS)} or none")
    return value


def _cluster_option(kind: str, wanted: str):
    """An argparse type for ``--cluster`` (``kind="local"``) or ``--scheduler`` (``kind="scheduler"``)."""
    def parse(value: str) -> str:
        from cbir.distributed import parse_cluster

        try:
            spec = parse_cluster(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if spec is None or spec.kind != kind:
            raise argparse.ArgumentTypeError(f"--{'cluster' if kind == 'local' else 'scheduler'} takes {wanted}, "
                                             f"got {value!r}")
        return str(spec)

    return parse


_cluster = _cluster_option("local", "local or local:N (a scheduler address goes to --scheduler)")
_scheduler = _cluster_option("scheduler", "a scheduler address such as tcp://HOST:8786")


DESCRIPTION = ("Visual search for product catalogues: extract image features, compare distance measures and\n"
               "models with the numbered notebooks, and read the answer in a report.")

EXAMPLES = {
    "cbir": """\
examples:
  cbir run params/demo.yaml                 every notebook on the demo catalogue -> outputs/demo/
  cbir run params/demo.yaml -p k 10         the same with one parameter changed
  cbir catalog check shop/manifest.csv      is my catalogue usable? counts and problems
  cbir list models                          the models (and descriptors) a params file may name
  cbir extract --catalog shop/manifest.csv --model mobilenet_v2 --store shop.sqlite
  cbir export --store shop.sqlite --out features.npz

After a run, open outputs/<name>/report.html: the findings first, then tables and figures.
`cbir COMMAND --help` shows a command's options and examples.""",
    "list": """\
examples:
  cbir list models                          backbones and handcrafted descriptors, with their input size
  cbir list measures                        the distance measures (for `metrics:`)
  cbir list poolings                        the poolings (for `pooling:`; `none` = no pooling)
  cbir list params                          the params files of this checkout
  cbir list runs --store outputs/cbir.sqlite
                                            the feature runs in a store (it must exist)""",
    "catalog check": """\
examples:
  cbir catalog check ../shared/data/fashion-products-224/manifest.csv
  cbir catalog check /data/kaggle-fashion   a Kaggle folder: styles.csv + images/<id>.jpg
  cbir catalog check /data/shop             a folder tree: <category>/<subcategory>/*.jpg
  cbir catalog check /data/kaggle-fashion --subcategory-from subCategory""",
    "demo-catalog": """\
examples:
  cbir demo-catalog /tmp/demo               360 synthetic product images + manifest.csv
  cbir demo-catalog /tmp/small --n 120 --seed 1""",
    "extract": """\
examples:
  cbir extract --catalog shop/manifest.csv --model mobilenet_v2 --store shop.sqlite
  cbir extract --catalog shop/manifest.csv --model vgg19 --layer fc2 --pooling none --store shop.sqlite
  cbir extract --catalog shop/manifest.csv --model resnet50 --pooling gem --weights resnet50.weights.h5 \\
      --store shop.sqlite
  cbir extract --catalog shop/manifest.csv --model color_hist --store shop.sqlite

The store is created when missing. An interrupted extraction resumes where it stopped; vectors of images
whose file changed are extracted again. Most users run `cbir run` instead, which extracts in notebook 01.""",
    "train": """\
examples:
  cbir train --catalog shop/manifest.csv --backbone mobilenet_v2 --weights mobilenet_v2_notop.weights.h5 \\
      --label subcategory --method metric --out models/metric --n-queries 500
  cbir train --catalog shop/manifest.csv --backbone efficientnet_lite0 --method classifier --out models/tagger
  cbir train --catalog shop/manifest.csv --backbone mobilenet_v2 --method autoencoder --encoder scratch --out models/ae
  cbir extract --catalog shop/manifest.csv --model models/metric/model.keras --store shop.sqlite

Only the searchable images are trained on: the queries of the split (--n-queries, --seed: use the values of the
params you evaluate with) and their byte-identical copies never are. The backbone's frozen part runs once per
image into an activation cache (--cache, resumable); the last --blocks blocks and the head train on it. DIR gets
model.keras, metrics.json, history.csv, classes.json, training.json, split.csv. A folder already trained with the
same settings is kept (--force trains again).""",
    "export": """\
examples:
  cbir export --store outputs/cbir.sqlite --out features.npz          the latest run
  cbir export --store outputs/cbir.sqlite --run 3 --out run3.npz
  cbir list runs --store outputs/cbir.sqlite                          which runs there are

The .npz holds `ids` and `features`. The store must exist: a missing path is an error, nothing is created.""",
    "run": """\
examples:
  cbir run params/demo.yaml                          what `make demo` does
  cbir run params/vgg19.yaml params/resnet50.yaml    one run per file, in order
  cbir run params/demo.yaml -p k 10 -p metrics '[cosine, euclidean]'
  cbir run params/demo.yaml -p pooling none          no pooling (the same as null)
  cbir run params/demo.yaml --only 03 --force        re-run one notebook
  cbir run params/summary.yaml                       notebook 08 over every run in the store

Each params file runs the numbered notebooks into outputs/<name>/ and ends with outputs/<name>/report.html
and its findings printed. Every file is checked before any notebook starts; a notebook that already ran
with the same parameters is skipped (--force re-runs it). Parameters: params/defaults.yaml.""",
    "index": """\
examples:
  cbir index build --store shop.sqlite --run 3                       cosine, kind chosen from size and memory
  cbir index build --store shop.sqlite --run 3 --metric euclidean --kind ivf --target-recall 0.99
  cbir index add --store shop.sqlite --run 3                         index the run's new images, no rebuild

The index and its recall table are saved beside the store (shop.sqlite.indexes/). `cbir search`, notebook 02
and the app use it and say which index and recall they used. manhattan, minkowski and chebyshev have no
index (faiss approximate indexes serve only L2 and inner product): they are searched exactly.""",
    "search": """\
examples:
  cbir search --store shop.sqlite --run 3 --image photo.jpg          top 10 by cosine
  cbir search --store shop.sqlite --run 3 --image photo.jpg --k 5 --metric manhattan

The photo is embedded with the run's own extractor (weights checked by SHA-1). The search uses the run's
index for the measure when one was built (`cbir index build`) and says which and its measured recall;
otherwise, and for measures no approximate faiss index serves, it searches exactly and says so.""",
    "tag": """\
examples:
  cbir tag --model outputs/finetune_mobilenet_v2/model --catalog shop/manifest.csv --out tags.csv
  cbir tag --model outputs/finetune_mobilenet_v2/model --catalog shop/manifest.csv --out tags.csv --disagree 0.95

The model folder is one `cbir train` wrote (model.keras + classes.json). tags.csv has one row per image:
the given labels, the predicted ones with their probabilities and the top 3, and the flags low_confidence
(top probability under --low-confidence), mistag (the model disagrees with the given label with at least
--disagree) and given_unknown (a label the model never learned: never called a mis-tag).""",
}
"""Examples shown under each command's ``--help`` (``tests/test_cli.py`` checks every command has some)."""


def _help(name: str) -> dict:
    """``epilog`` and ``formatter_class`` for a (sub)parser: its examples, laid out as written."""
    return {"epilog": EXAMPLES.get(name), "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir", description=DESCRIPTION, **_help("cbir"))
    parser.add_argument("--version", action="version", version=f"cbir {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list", help="list the models, measures, poolings, params files or a store's runs",
                             description="List what a params file may name, or the feature runs in a store.",
                             **_help("list"))
    listing.add_argument("what", choices=["models", "measures", "poolings", "params", "runs"],
                         help="what to list: models, measures, poolings, params or runs (runs needs --store)")
    listing.add_argument("--store", type=Path, default=None, metavar="PATH",
                         help="the feature store (.sqlite) whose runs to list; it must exist")
    listing.set_defaults(func=_cmd_list)

    catalog = sub.add_parser("catalog", help="inspect a product catalogue",
                             description="Inspect a product catalogue: `cbir catalog check PATH`.",
                             **_help("catalog check"))
    catalog_sub = catalog.add_subparsers(dest="catalog_command", required=True)
    check = catalog_sub.add_parser("check", help="validate a catalogue and print counts and problems",
                                   description="Read a catalogue as `cbir run` would and print images per category "
                                               "and sub-category, unreadable files and duplicates.",
                                   **_help("catalog check"))
    check.add_argument("path", type=Path, help="a manifest CSV (image, category, subcategory), a Kaggle folder "
                                               "(styles.csv + images/) or a folder tree")
    check.add_argument("--subcategory-from", default="articleType", choices=["articleType", "subCategory"],
                       help="Kaggle layout only: which column becomes the sub-category")
    check.set_defaults(func=_cmd_catalog_check)

    demo = sub.add_parser("demo-catalog", help="generate the synthetic demo catalogue",
                          description="Draw the synthetic demo catalogue (product silhouettes and distractors) "
                                      "into DIR with its manifest.csv.", **_help("demo-catalog"))
    demo.add_argument("dir", type=Path, help="the folder to write (created)")
    demo.add_argument("--n", type=int, default=360, help="number of images (default: 360)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0); the same seed, the same files")
    demo.set_defaults(func=_cmd_demo_catalog)

    extract = sub.add_parser("extract", help="extract features into a SQLite feature store",
                             description="Extract one feature vector per catalogue image into a feature store "
                                         "(SQLite), as notebook 01 does.", **_help("extract"))
    extract.add_argument("--catalog", required=True, type=Path, metavar="PATH",
                         help="the catalogue: manifest CSV, Kaggle folder or folder tree")
    extract.add_argument("--model", required=True, type=_model_or_file, metavar="MODEL",
                         help=f"a backbone or descriptor: {', '.join(extractor_names())}")
    extract.add_argument("--layer", default=None, help="the layer to read (default: the model's own; "
                                                        "`cbir list models` names the models)")
    extract.add_argument("--pooling", default=None, type=_pooling, metavar="POOLING",
                         help=f"pool the last convolutional block: {', '.join(POOLINGS)}, or none (the layer as is)")
    extract.add_argument("--weights", default="imagenet",
                         help="imagenet (default), PATH to a .weights.h5 file, or none (random, for tests only)")
    extract.add_argument("--store", required=True, type=Path, metavar="PATH",
                         help="the feature store (.sqlite) to write; created when missing")
    extract.add_argument("--batch-size", type=int, default=32, help="images per model call (default: 32)")
    extract.add_argument("--workers", type=int, default=2, help="image-decoding threads (default: 2)")
    extract.add_argument("--l2", action="store_true", help="L2-normalise the stored vectors")
    extract.add_argument("--name", default=None, help="a name for the run")
    where = extract.add_mutually_exclusive_group()
    where.add_argument("--cluster", default=None, type=_cluster, metavar="local[:N]",
                       help="extract on a Dask LocalCluster of N worker processes (default: one per CPU)")
    where.add_argument("--scheduler", default=None, type=_scheduler, metavar="tcp://HOST:PORT",
                       help="extract on a running Dask cluster (its scheduler address)")
    extract.add_argument("--vectors", default="store", choices=("store", "shards"),
                         help="with a cluster: store (default) ingests the shards into the store; shards keeps the "
                              "vectors in the Parquet shards, for catalogues too big to copy into SQLite (the "
                              "store records where they are and its readers stream from them)")
    extract.set_defaults(func=_cmd_extract)

    from cbir.train import method_names

    training = sub.add_parser("train", help="fine-tune a backbone on the catalogue's labels (tagging, embeddings)",
                              description="Train a tagging classifier, a metric-learning embedding or an autoencoder "
                                          "on the searchable part of a catalogue; the model is then a feature "
                                          "extractor like any other (`cbir extract --model DIR/model.keras`).",
                              **_help("train"))
    training.add_argument("--catalog", required=True, type=Path, metavar="PATH", help="the catalogue")
    training.add_argument("--backbone", default="mobilenet_v2", choices=backbone_names(), metavar="NAME",
                          help=f"the pretrained CNN ({', '.join(backbone_names())}; default: mobilenet_v2)")
    training.add_argument("--weights", default="imagenet", help="imagenet (default), none or a weights file")
    training.add_argument("--label", default="subcategory", choices=["subcategory", "category"],
                          help="the label to learn (default: subcategory)")
    training.add_argument("--method", default="classifier", choices=list(method_names()),
                          help=f"{', '.join(method_names())} (default: classifier)")
    training.add_argument("--encoder", default=None, choices=["pretrained", "scratch"],
                          help="autoencoder only: the backbone as encoder (default) or a small CNN from scratch")
    training.add_argument("--out", required=True, type=Path, metavar="DIR", help="the model folder to write")
    training.add_argument("--epochs", type=int, default=None, help="epochs of the head alone (default: 8)")
    training.add_argument("--fine-tune-epochs", type=int, default=None,
                          help="then epochs with the last blocks trained too (default: 6)")
    training.add_argument("--blocks", type=int, default=None, help="backbone blocks trained (default: 1)")
    training.add_argument("--holdout", nargs="*", default=None, metavar="SUBCATEGORY",
                          help="sub-categories never trained on (open-set evaluation)")
    training.add_argument("--n-queries", type=int, default=60, help="queries of the split (default: 60)")
    training.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default: 0)")
    training.add_argument("--subcategory-from", default="articleType", choices=["articleType", "subCategory"],
                          help="Kaggle layout only: which column becomes the sub-category")
    training.add_argument("--cache", type=Path, default=None, metavar="DIR",
                          help="the activation cache (default: DIR/../cache)")
    training.add_argument("--force", action="store_true", help="train again even when DIR holds this model")
    training.set_defaults(func=_cmd_train)

    export = sub.add_parser("export", help="export a run's features to .npz (ids, features)",
                            description="Write one run's feature vectors and image ids to a NumPy .npz file.",
                            **_help("export"))
    export.add_argument("--store", required=True, type=Path, metavar="PATH",
                        help="the feature store (.sqlite) to read; it must exist")
    export.add_argument("--run", type=int, default=None, help="run id (default: the latest; see `cbir list runs`)")
    export.add_argument("--out", required=True, type=Path, metavar="FILE", help="the .npz file to write")
    export.set_defaults(func=_cmd_export)

    run = sub.add_parser("run", help="run the numbered notebooks with papermill for each params file",
                         description="Run the numbered notebooks for each params file and write "
                                     "outputs/<name>/: executed notebooks, tables, figures and report.html.",
                         **_help("run"))
    run.add_argument("params", nargs="+", type=Path, help="params files (YAML), e.g. params/demo.yaml")
    run.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="override one parameter of every file, as YAML (e.g. -p k 10, -p pooling none)")
    run.add_argument("--force", action="store_true", help="re-run notebooks that already finished")
    run.add_argument("--only", nargs="*", default=None, metavar="NN",
                     help="run only these notebooks, by number (e.g. --only 00 01)")
    run.set_defaults(func=_cmd_run)

    from cbir.index import INDEX_KINDS, INDEX_MEASURES
    from cbir.measures import measure_names

    index = sub.add_parser("index", help="build approximate search indexes (faiss) with measured recall",
                           description="Build a faiss index of a run's vectors, measure its recall against "
                                       "exact search and save both beside the store.", **_help("index"))
    index_sub = index.add_subparsers(dest="index_command", required=True)
    for name, func, text in (("build", _cmd_index_build, "build, measure and save an index"),
                             ("add", _cmd_index_add, "add the run's new images to its saved index")):
        cmd = index_sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", **_help("index"))
        cmd.add_argument("--store", required=True, type=Path, metavar="PATH", help="the feature store (.sqlite)")
        cmd.add_argument("--run", required=True, type=int, help="the run id (`cbir list runs --store PATH`)")
        cmd.add_argument("--metric", default="cosine", choices=INDEX_MEASURES,
                         help=f"the measure: {', '.join(INDEX_MEASURES)} (default: cosine)")
        cmd.set_defaults(func=func)
        if name == "build":
            cmd.add_argument("--kind", default="auto", choices=["auto", *INDEX_KINDS],
                             help="auto (default: flat for small sets, HNSW while it fits and builds quickly, "
                                  "IVF beyond, IVF-PQ when the vectors do not fit --memory), or one of them")
            cmd.add_argument("--memory", type=float, default=None, metavar="GB",
                             help="memory budget for the index (default: half the available memory)")
            cmd.add_argument("--target-recall", type=float, default=0.95,
                             help="recall@k to reach against exact search (default: 0.95)")
            cmd.add_argument("--k", type=int, default=5, help="k of the recall measured (default: 5)")

    search = sub.add_parser("search", help="search a run's catalogue with a photo",
                            description="Embed a photo with a run's extractor and print its nearest catalogue "
                                        "images (ids, labels, distances).", **_help("search"))
    search.add_argument("--store", required=True, type=Path, metavar="PATH", help="the feature store (.sqlite)")
    search.add_argument("--run", required=True, type=int, help="the run id (`cbir list runs --store PATH`)")
    search.add_argument("--image", required=True, type=Path, metavar="PHOTO", help="the photo to search with")
    search.add_argument("--k", type=int, default=10, help="how many neighbours (default: 10)")
    search.add_argument("--metric", default="cosine", choices=measure_names(),
                        help=f"the measure: {', '.join(measure_names())} (default: cosine)")
    search.add_argument("--p", type=float, default=3.0, help="minkowski's p (default: 3)")
    search.add_argument("--weights", default=None, metavar="PATH",
                        help="the weights file of a run made from one (checked against its SHA-1)")
    search.add_argument("--exact", action="store_true", help="search exactly even where an index exists")
    search.set_defaults(func=_cmd_search)

    tag = sub.add_parser("tag", help="tag catalogue images with a trained model; flag likely mis-tags",
                         description="Predict each catalogue image's label with a trained model folder and write "
                                     "a CSV with the predictions, low-confidence ones and likely mis-tags.",
                         **_help("tag"))
    tag.add_argument("--model", required=True, type=Path, metavar="DIR",
                     help="the trained model folder (model.keras + classes.json, from `cbir train`)")
    tag.add_argument("--catalog", required=True, type=Path, metavar="PATH",
                     help="the catalogue: manifest CSV, Kaggle folder or folder tree")
    tag.add_argument("--out", required=True, type=Path, metavar="FILE", help="the CSV to write (folder created)")
    tag.add_argument("--low-confidence", type=_probability, default=0.5, metavar="P",
                     help="flag predictions whose probability is under P (default: 0.5)")
    tag.add_argument("--disagree", type=_probability, default=0.9, metavar="P",
                     help="call a given label a likely mis-tag when the model predicts another with at least P "
                          "(default: 0.9)")
    tag.add_argument("--batch-size", type=int, default=32, help="images per model call (default: 32)")
    tag.set_defaults(func=_cmd_tag)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; user errors print ``error: <message>`` to stderr and return 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        # StoreError, ExtractionError, WeightsUnavailableError (RuntimeError), CatalogError, ImageError,
        # bad parameters (ValueError), missing or unwritable files (OSError), unknown ids (KeyError)
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
