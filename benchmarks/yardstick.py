"""What the benchmark scripts share: where the yardstick (llama.cpp through ../shared/tools) lives, which
python runs it, and reading the one JSON line a measuring command prints.

The scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path and `from yardstick import ...`
works without installing anything.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(os.environ.get("EDGEQ_SHARED_TOOLS", ROOT.parent / "shared" / "tools"))
if not TOOLS.is_dir():
    TOOLS = Path("/work/shared/tools")


def llamacpp_python(build: bool = False) -> str | None:
    """The python of a llama-cpp-python venv: EDGEQ_LLAMACPP_PY, else the no-AMX build (the stock GGML_NATIVE
    build crashes on VMs whose CPU lacks AMX/AVX-VNNI), else the stock one. None when there is none, unless
    `build`: then llamacpp-env.sh builds the stock one (~10 min)."""
    for cand in (os.environ.get("EDGEQ_LLAMACPP_PY"), Path.home() / ".cache/edgeq-llamacpp-noamx/bin/python",
                 Path.home() / ".cache/edgeq-llamacpp/bin/python"):
        if cand and Path(cand).is_file():
            return str(cand)
    if not build:
        return None
    return subprocess.run([str(TOOLS / "llamacpp-env.sh")], capture_output=True, text=True, check=True).stdout.strip()


def last_json(out: str) -> dict:
    """The last line of `out` that is a JSON object."""
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON in output: {out[-500:]}")


def run_json(cmd: list) -> dict:
    """Run a command that prints a JSON line; its stderr tail is the error when it fails."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {p.stderr.strip()[-1500:]}")
    return last_json(p.stdout)
