"""The thin ``cbir`` command: parses arguments and calls the package; holds no logic of its own.

User errors (a bad catalogue, image, store or parameter; a missing or read-only file; a full disk) print one
``error: ...`` line to stderr and exit with status 1, never a traceback. Reading commands open the store
read-only: a missing store is an error, never created."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cbir.extractors import extractor_names
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

    catalog = load_catalog(args.catalog).usable()
    if len(catalog) == 0:  # refused before a store or a run is made
        raise ValueError(f"{args.catalog}: no usable image to extract (see `cbir catalog check {args.catalog}`)")
    store = FeatureStore(args.store)
    run_id = extract_features(
        catalog,
        model=args.model,
        layer=args.layer,
        pooling=args.pooling,
        weights=args.weights,
        store=store,
        batch_size=args.batch_size,
        workers=args.workers,
        l2_normalize=args.l2,
        name=args.name,
    )
    info = store.run(run_id)
    replaced = info["stats"].get("n_vectors_replaced") if info["finished"] else None
    note = f" ({replaced} replaced: their files changed)" if replaced else ""
    print(f"run {run_id}: {info['n_features']} feature vectors in {args.store}{note}")
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


def _pooling(value: str) -> str | None:
    """``--pooling``: a registered pooling, or ``none`` (any case) for the named layer as it is."""
    if value.lower() == "none":
        return None
    if value not in POOLINGS:
        raise argparse.ArgumentTypeError(f"unknown pooling {value!r}; choose from {', '.join(POOLINGS)} or none")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cbir {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list", help="list the models, measures, poolings, params files or a store's runs")
    listing.add_argument("what", choices=["models", "measures", "poolings", "params", "runs"])
    listing.add_argument("--store", type=Path, default=None, help="the store whose runs to list")
    listing.set_defaults(func=_cmd_list)

    catalog = sub.add_parser("catalog", help="inspect a product catalogue")
    catalog_sub = catalog.add_subparsers(dest="catalog_command", required=True)
    check = catalog_sub.add_parser("check", help="validate a catalogue and print counts and problems")
    check.add_argument("path", type=Path, help="manifest CSV, Kaggle folder (styles.csv) or folder tree")
    check.add_argument("--subcategory-from", default="articleType", choices=["articleType", "subCategory"],
                       help="Kaggle layout only: which column becomes the sub-category")
    check.set_defaults(func=_cmd_catalog_check)

    demo = sub.add_parser("demo-catalog", help="generate the synthetic demo catalogue")
    demo.add_argument("dir", type=Path)
    demo.add_argument("--n", type=int, default=360, help="number of images")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo_catalog)

    extract = sub.add_parser("extract", help="extract features into a SQLite feature store")
    extract.add_argument("--catalog", required=True, type=Path)
    extract.add_argument("--model", required=True, choices=extractor_names(), metavar="MODEL",
                         help=f"a backbone or descriptor: {', '.join(extractor_names())}")
    extract.add_argument("--layer", default=None)
    extract.add_argument("--pooling", default=None, type=_pooling, metavar="POOLING",
                         help=f"pool the last convolutional block: {', '.join(POOLINGS)}, or none (the layer as is)")
    extract.add_argument("--weights", default="imagenet", help="imagenet | PATH to weights | none")
    extract.add_argument("--store", required=True, type=Path)
    extract.add_argument("--batch-size", type=int, default=32)
    extract.add_argument("--workers", type=int, default=2)
    extract.add_argument("--l2", action="store_true", help="L2-normalise the stored vectors")
    extract.add_argument("--name", default=None, help="a name for the run")
    extract.set_defaults(func=_cmd_extract)

    export = sub.add_parser("export", help="export a run's features to .npz (ids, features)")
    export.add_argument("--store", required=True, type=Path)
    export.add_argument("--run", type=int, default=None, help="run id (default: the latest)")
    export.add_argument("--out", required=True, type=Path)
    export.set_defaults(func=_cmd_export)

    run = sub.add_parser("run", help="run the numbered notebooks with papermill for each params file")
    run.add_argument("params", nargs="+", type=Path)
    run.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="override one parameter (YAML value)")
    run.add_argument("--force", action="store_true", help="re-run notebooks that already finished")
    run.add_argument("--only", nargs="*", default=None, help="run only these notebooks (e.g. 00 01)")
    run.set_defaults(func=_cmd_run)
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
