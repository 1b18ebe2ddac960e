"""`edgeq pull NAME|OWNER/REPO[:QUANT]`, `edgeq list`, `edgeq rm NAME`: the models in the data folder.

Failures (bad name, a path given to rm, failed download, sha256 mismatch) are AssetErrors: the dispatcher
prints them as one line. File names and header fields are shown through safe_terminal_text.
"""
from __future__ import annotations

import argparse
import sys

from edgeq import assets
from edgeq.cli.common import download_progress
from edgeq.text import safe_line, safe_terminal_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="catalog name (see `edgeq list -a`) or a hub GGUF repo "
                                "[hf.co/]OWNER/REPO[:QUANT] (default quant Q4_K_M, else the closest one listed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def main(args: argparse.Namespace) -> int:
    from edgeq import hub

    name = args.name
    report = None if args.quiet else (lambda line: print(safe_line(line, 1000), file=sys.stderr, flush=True))
    progress = download_progress(not args.quiet)
    if name in assets.MODELS:
        a = assets.MODELS[name]
        here = assets.models_dir() / a.filename
        if here.is_file() and (hub.local_copy(hub.HubRef(a.hf_repo, a.hf_quant)) == here if a.hub_only
                               else assets.check_file(a, here) is None):  # a damaged file is pulled again
            print(f"{name} is already here: {safe_terminal_text(str(here))}")
            return 0
        if report and not a.hub_only:
            report(f"pulling {name} ({a.size / 1e6:.0f} MB) into {assets.models_dir()}")
        if not a.runnable and report:
            report(f"note: {name} is a {a.arch} model, which this edgeq cannot run yet")
        try:
            path = assets.model_path(name, quiet=args.quiet, report=report, progress=progress)
        finally:
            progress.finish()
        print(f"{name}: {safe_terminal_text(str(path))}")
        return 0
    ref = hub.parse_ref(name)
    if ref is None:
        raise assets.AssetError(f"unknown model {name!r}; known: {', '.join(assets.MODELS)} "
                                f"(or a hub GGUF repo OWNER/REPO[:QUANT])")
    here = hub.local_copy(ref)
    if here is not None:
        print(f"{ref} is already here: {safe_terminal_text(str(here))}")
        return 0
    try:
        path = hub.pull(ref, progress=progress, report=report)
    finally:
        progress.finish()
    print(f"{ref}: {safe_terminal_text(str(path))}")
    return 0


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--all", action="store_true", help="also show catalog models not downloaded yet")


def list_main(args: argparse.Namespace) -> int:
    local = assets.list_local()
    rows = [(safe_line(m.name, 80), f"{m.size / 1e6:.0f} MB", safe_line(m.qtype, 16), safe_line(m.arch, 32),
             safe_line(str(m.path), 1000) + (f"  (unreadable: {safe_line(m.problem, 200)})" if m.problem else ""))
            for m in local]
    if args.all:
        here = {m.name for m in local}
        for a in assets.MODELS.values():
            if a.name in here:
                continue
            size = f"{a.shown_size / 1e6:.0f} MB" if a.shown_size else "-"
            source = f"hub {a.hf_repo}:{a.hf_quant}" if a.hub_only else "PyPI"
            note = "" if a.runnable else f"  [{a.arch}: not supported by this edgeq yet]"
            rows.append((a.name, size, a.hf_quant or "-", a.arch or "-",
                         f"(not pulled) {a.description}; {source}{note}"))
    if not rows:
        print(f"no local models in {safe_line(str(assets.models_dir()), 1000)} (try: edgeq pull {assets.DEFAULT_MODEL})")
        return 0
    head = ("NAME", "SIZE", "TYPE", "ARCH", "PATH")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def add_rm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="catalog name or file name of a local model (see `edgeq list`); never a path")


def rm_main(args: argparse.Namespace) -> int:
    path = assets.remove(args.name)
    print(f"removed {safe_terminal_text(str(path))}")
    return 0
