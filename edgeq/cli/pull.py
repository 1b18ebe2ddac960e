"""`edgeq pull NAME`, `edgeq list`, `edgeq rm NAME`: the models in the data folder."""
from __future__ import annotations

import argparse
import sys

from edgeq import assets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help=f"catalog name ({', '.join(assets.MODELS)})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _one_line(fn):
    """Known failures (bad name, failed download, sha256 mismatch) → one line on stderr, exit 1."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except assets.AssetError as e:
            print(f"edgeq: {e}", file=sys.stderr)
            return 1
    run.__doc__ = fn.__doc__
    return run


@_one_line
def main(args: argparse.Namespace) -> int:
    name = args.name
    if name not in assets.MODELS:
        raise assets.AssetError(f"unknown model {name!r}; known: {', '.join(assets.MODELS)}")
    if assets.is_local(name):
        print(f"{name} is already here: {assets.find_local(name)}")
        return 0
    a = assets.MODELS[name]
    report = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    if report:
        report(f"pulling {name} ({a.size / 1e6:.0f} MB) into {assets.models_dir()}")
    path = assets.model_path(name, quiet=args.quiet, report=report)
    print(f"{name}: {path}")
    return 0


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--all", action="store_true", help="also show catalog models not downloaded yet")


def list_main(args: argparse.Namespace) -> int:
    rows = [(m.name, f"{m.size / 1e6:.0f} MB", m.qtype, m.arch, str(m.path)) for m in assets.list_local()]
    if args.all:
        here = {r[0] for r in rows}
        rows += [(a.name, f"{a.size / 1e6:.0f} MB", "-", "-", "(not pulled) " + a.description)
                 for a in assets.MODELS.values() if a.name not in here]
    if not rows:
        print(f"no local models in {assets.models_dir()} (try: edgeq pull {assets.DEFAULT_MODEL})")
        return 0
    head = ("NAME", "SIZE", "TYPE", "ARCH", "PATH")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def add_rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="catalog name or file name of a local model (see `edgeq list`)")


@_one_line
def rm_main(args: argparse.Namespace) -> int:
    path = assets.remove(args.name)
    print(f"removed {path}")
    return 0
