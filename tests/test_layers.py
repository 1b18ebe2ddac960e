"""The dependency direction of the package, read from the source's import statements:

    formats ← cpu_kernels, gpu_kernels ← models ← runtime, convert, assets ← cli, tui

kernels never import models, the library never imports a front end (cli, tui), and verbs never import
other verbs (edgeq/cli/<verb>.py may use edgeq/cli/common.py only). edgeq's package init, errors,
progress and text helpers are shared by every layer."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"formats": "edgeq.formats", "cpu_kernels": "edgeq.cpu_kernels", "gpu_kernels": "edgeq.gpu_kernels",
           "models": "edgeq.models", "edgeq": "edgeq"}
LAYERS = [  # (module prefix, layer); the longest matching prefix wins
    ("edgeq.formats", 0), ("edgeq.cpu_kernels", 1), ("edgeq.gpu_kernels", 1), ("edgeq.models", 2),
    ("edgeq.runtime", 3), ("edgeq.convert", 3), ("edgeq.assets", 3), ("edgeq.cli", 4), ("edgeq.tui", 4),
    ("edgeq.serve", 4),
]
SHARED = {"edgeq", "edgeq._numba_env", "edgeq.errors", "edgeq.progress", "edgeq.text"}


def layer(mod: str) -> int | None:
    if mod in SHARED:
        return None
    best = max((p for p, _ in LAYERS if mod == p or mod.startswith(p + ".")), key=len, default=None)
    return dict(LAYERS)[best] if best else None


def modules():
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg, *parts]), path


def imports(mod: str, path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:  # `from edgeq import assets` names a module, `from edgeq.cli import main` not
                yield f"{base}.{a.name}" if f"{base}.{a.name}" in ALL else base


ALL = {m for m, _ in modules()}


def edges():
    for mod, path in modules():
        for target in imports(mod, path):
            if target == "edgeq" or target.startswith("edgeq."):
                yield mod, target


def test_the_scan_sees_the_package():
    found = dict(modules())
    assert "edgeq.runtime.engine" in found and "edgeq.cpu_kernels.linear" in found and "edgeq.cli.run" in found
    assert ("edgeq.runtime.engine", "edgeq.runtime.sampling") in set(edges())


def test_the_library_never_sees_argparse():
    # a developer tool run as `python -m` (gpu_kernels/ptx_check.py) is a front end of its own
    users = sorted({mod for mod, path in modules() for target in imports(mod, path)
                    if target == "argparse" and not mod.startswith("edgeq.cli")
                    and 'if __name__ == "__main__"' not in path.read_text(encoding="utf-8")})
    assert not users, f"argparse imported outside edgeq/cli: {users}"


@pytest.mark.parametrize("rule", ["layers", "verbs"])
def test_dependencies_point_one_way(rule):
    bad = []
    for mod, target in edges():
        if rule == "layers":
            a, b = layer(mod), layer(target)
            if a is not None and b is not None and b > a:
                bad.append(f"{mod} -> {target}")
        elif mod.startswith("edgeq.cli.") and target.startswith("edgeq.cli.") and mod != "edgeq.cli.__main__":
            if target not in ("edgeq.cli.common",) and not target.startswith("edgeq.cli.common."):
                bad.append(f"{mod} -> {target}")
    assert not bad, "imports against the direction:\n" + "\n".join(sorted(set(bad)))
