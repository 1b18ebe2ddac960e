"""Models from the Hugging Face hub: `OWNER/REPO[:QUANT]` references to GGUF repos, and checkpoint repos
for the converter.

    pull(parse_ref("hf.co/bartowski/SmolLM2-360M-Instruct-GGUF:Q4_K_M"))   # → models/SmolLM2-...gguf

A pull lists the repo's files (one request), picks the GGUF file for QUANT (default Q4_K_M, else the
listed type closest to it in bits per weight), downloads it with huggingface_hub's HTTP client into a
`.part` file in our models folder (kept between runs, so an interrupted pull resumes where it stopped),
checks the sha256 the hub declares for the LFS file, and only then renames it to its readable local name.
Split files (`-00001-of-0000N`) are each checked, then merged into one GGUF file. `hub.json` beside the
models remembers which reference each file came from, so the local copy is used without the network.

Everything is read at call time: HF_ENDPOINT (default https://huggingface.co), HF_TOKEN (gated repos),
HF_HUB_OFFLINE=1 (never touch the network). Hub answers are untrusted: file names are checked before they
become local names, and every failure is one AssetError line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from edgeq import assets
from edgeq.assets import AssetError

DEFAULT_QUANT = "Q4_K_M"
DEFAULT_ENDPOINT = "https://huggingface.co"
REGISTRY = "hub.json"

# What a model repo needs for conversion: never the GGUF, .bin or original/ copies of the weights.
CHECKPOINT_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                       "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                       "added_tokens.json", "chat_template.jinja", "chat_template.json"]

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, file name)

# HF repo ids: "owner/name", letters, digits, "-", "_", "." (no "--" or ".." in the real hub, no path parts).
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REF = re.compile(rf"(?:(?:https?://)?(?:hf\.co|huggingface\.co)/)?(?P<repo>{_PART}/{_PART})"
                  rf"(?::(?P<quant>[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}))?")
_SPLIT = re.compile(r"(?P<base>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf", re.IGNORECASE)
# A quant tag as llama.cpp names files: Q4_K_M, IQ4_XS, Q8_0, F16, BF16... between separators.
_QUANT = re.compile(r"(?:^|(?<=[-_.]))((?:I?Q\d(?:_[A-Z0-9]{1,4}){0,3})|BF16|F16|F32|FP16)(?=[-_.]|$)",
                    re.IGNORECASE)


@dataclass(frozen=True)
class HubRef:
    repo: str                # "owner/name"
    quant: str | None = None  # "Q4_K_M", a file name ending in .gguf, or None for the default

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def parse_ref(text: str) -> HubRef | None:
    """`[hf.co/]OWNER/REPO[:QUANT]` → HubRef, recognised by its shape alone; None for anything else.

    A name ending in .gguf (a relative path to a file) is not a repo, and nothing here touches the disk."""
    m = _REF.fullmatch(text.strip())
    if not m or ".." in m["repo"] or "--" in m["repo"] or m["repo"].lower().endswith(".gguf"):
        return None
    quant = m["quant"]
    if quant and not quant.lower().endswith(".gguf"):
        quant = quant.upper()
    return HubRef(m["repo"], quant)


def is_repo_id(text: str) -> bool:
    """`OWNER/REPO` with nothing else (the converter's repo ids)."""
    ref = parse_ref(text)
    return ref is not None and ref.quant is None and "/" in text and not text.startswith(("hf.co/", "http"))


# ---------------------------------------------------------------- environment
def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or None  # None: huggingface_hub falls back to a stored login


def describe_hub_error(e: BaseException, what: str) -> AssetError | None:
    """One line for a huggingface_hub/HTTP failure about `what` (a repo or file); None when `e` is not one."""
    from huggingface_hub import errors as hf

    if isinstance(e, hf.GatedRepoError):
        return AssetError(f"{what} is gated: accept its terms on {endpoint()}/{what.split(':')[0]} and set HF_TOKEN "
                          f"to a token of that account (HTTP {_status(e)})")
    if isinstance(e, hf.RepositoryNotFoundError):
        return AssetError(f"{what}: no such repo on the hub (or it is private: set HF_TOKEN) (HTTP {_status(e)})")
    if isinstance(e, (hf.RemoteEntryNotFoundError, hf.RevisionNotFoundError)):
        return AssetError(f"{what}: not found on the hub (HTTP {_status(e)})")
    if isinstance(e, hf.HfHubHTTPError):
        status = _status(e)
        if status in (401, 403):
            return AssetError(f"{what}: access denied (HTTP {status}); set HF_TOKEN to a token that can read it")
        return AssetError(f"{what}: the hub answered HTTP {status}")
    if isinstance(e, hf.OfflineModeIsEnabled):
        return AssetError(f"{what}: not here and HF_HUB_OFFLINE is set")
    import httpx2

    if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return AssetError(f"{what}: cannot reach {endpoint()} ({type(e).__name__}); "
                          f"set HF_HUB_OFFLINE=1 to use local copies only")
    return None


def _status(e) -> int | str:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", "?")


# ---------------------------------------------------------------- choosing a file
def quant_of(filename: str) -> str | None:
    """The quant tag in a GGUF file name ("x-Q4_K_M.gguf", "x.q8_0-00001-of-00002.gguf"), upper case."""
    name = filename.rsplit("/", 1)[-1]
    m = _SPLIT.fullmatch(name)
    stem = m["base"] if m else re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    tags = _QUANT.findall(stem)
    return tags[-1].upper().replace("FP16", "F16") if tags else None


def bits_per_weight(quant: str) -> float:
    """A rough size for ranking quant types by closeness (Q4_K_M ≈ 4.85), from the name alone."""
    q = quant.upper()
    if q in ("F16", "BF16"):
        return 16.0
    if q == "F32":
        return 32.0
    m = re.match(r"I?Q(\d)(.*)", q)
    if not m:
        return 99.0
    extra = {"_K_XL": 1.0, "_K_L": 0.95, "_K_M": 0.85, "_K_S": 0.5, "_K": 0.56, "_0": 0.5, "_1": 1.0,
             "_XS": 0.25, "_NL": 0.5, "_XXS": 0.06, "_S": 0.44, "_M": 0.66}
    return int(m[1]) + next((v for k, v in extra.items() if m[2].startswith(k)), 0.5)


@dataclass(frozen=True)
class RemoteFile:
    path: str            # in the repo
    size: int
    sha256: str | None   # LFS sha256 the hub declares (None for a file kept in git)
    blob_id: str | None  # git blob id (checks files kept in git)


@dataclass(frozen=True)
class Choice:
    quant: str
    files: tuple[RemoteFile, ...]  # one file, or the parts of a split file in order

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def gguf_choices(files: list[RemoteFile]) -> dict[str, list[Choice]]:
    """The model GGUF files of a listing grouped by quant tag (split parts joined; projector and imatrix
    files left out, and split sets with a missing part too)."""
    singles: list[Choice] = []
    splits: dict[str, dict[int, RemoteFile]] = {}
    counts: dict[str, int] = {}
    for f in files:
        name = f.path.rsplit("/", 1)[-1]
        if not name.lower().endswith(".gguf") or name.lower().startswith("mmproj") or "imatrix" in name.lower():
            continue
        q = quant_of(f.path)
        if q is None:
            continue
        m = _SPLIT.fullmatch(name)
        if m:
            key = f.path[: len(f.path) - len(name)] + m["base"]
            splits.setdefault(key, {})[int(m["no"])] = f
            counts[key] = int(m["count"])
        else:
            singles.append(Choice(q, (f,)))
    for key, parts in splits.items():
        n = counts[key]
        if 0 < n <= 1000 and sorted(parts) == list(range(1, n + 1)):
            singles.append(Choice(quant_of(parts[1].path) or "?", tuple(parts[i] for i in range(1, n + 1))))
    out: dict[str, list[Choice]] = {}
    for c in sorted(singles, key=lambda c: (c.files[0].path.count("/"), len(c.files[0].path), c.files[0].path)):
        out.setdefault(c.quant, []).append(c)
    return out


def choose(ref: HubRef, files: list[RemoteFile]) -> Choice:
    """The file(s) for `ref`: its quant (or exact file name), or by default Q4_K_M or the closest type."""
    choices = gguf_choices(files)
    if not choices:
        raise AssetError(f"{ref.repo} has no GGUF model files (for a checkpoint repo use `edgeq convert {ref.repo}`)")
    available = ", ".join(sorted(choices, key=bits_per_weight))
    if ref.quant and ref.quant.lower().endswith(".gguf"):
        for group in choices.values():
            for c in group:
                if ref.quant in (c.files[0].path, c.files[0].path.rsplit("/", 1)[-1]):
                    return c
        raise AssetError(f"{ref.repo} has no file {ref.quant!r}; quant types there: {available}")
    if ref.quant:
        if ref.quant not in choices:
            raise AssetError(f"{ref.repo} has no {ref.quant} file; available: {available}")
        return choices[ref.quant][0]
    want = bits_per_weight(DEFAULT_QUANT)
    best = DEFAULT_QUANT if DEFAULT_QUANT in choices else \
        min(choices, key=lambda q: (abs(bits_per_weight(q) - want), bits_per_weight(q), q))
    return choices[best][0]


def list_files(repo: str, revision: str = "main") -> tuple[str, list[RemoteFile]]:
    """(commit sha, files with sizes and declared hashes) of a model repo: one request."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint(), token=token()).model_info(repo, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - hub and network errors become one line; others are bugs
        err = describe_hub_error(e, repo)
        if err is None:
            raise
        raise err from None
    files = [RemoteFile(s.rfilename, int(s.size or (s.lfs.size if s.lfs else 0) or 0),
                        s.lfs.sha256 if s.lfs else None, s.blob_id) for s in (info.siblings or [])]
    if not info.sha:
        raise AssetError(f"{repo}: the hub gave no commit for {revision}")
    return info.sha, files


# ---------------------------------------------------------------- local names and the registry
def _registry_path() -> Path:
    return assets.models_dir() / REGISTRY


def load_registry() -> dict[str, dict]:
    """{local file name: {"repo", "quant", "files", "revision", "sha256", "size"}}; damaged → empty."""
    try:
        data = json.loads(_registry_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and assets._is_plain_name(k)}


def _save_registry(reg: dict[str, dict]) -> None:
    path = _registry_path()
    tmp = path.with_name(f".{REGISTRY}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(reg, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def local_entry(ref: HubRef) -> tuple[str, dict] | None:
    """The registry entry a reference was pulled as: same repo and quant (no quant: Q4_K_M first, else any)."""
    reg = load_registry()
    mine = [(name, e) for name, e in reg.items() if str(e.get("repo", "")).lower() == ref.repo.lower()]
    if ref.quant:
        key = "source" if ref.quant.lower().endswith(".gguf") else "quant"
        mine = [(n, e) for n, e in mine if str(e.get(key, "")).upper() == ref.quant.upper()
                or (key == "source" and ref.quant in e.get("files", []))]
    mine.sort(key=lambda ne: (ne[1].get("quant") != DEFAULT_QUANT, not ne[1].get("default", False), ne[0]))
    return mine[0] if mine else None


def _entry_asset(name: str, entry: dict) -> assets.Asset:
    return assets.Asset(name, name, str(entry.get("sha256", "")), int(entry.get("size", 0) or 0), str(entry.get("repo")))


def local_copy(ref: HubRef) -> Path | None:
    """The intact local file pulled for `ref`, if any (size every time, sha256 once per file version)."""
    found = local_entry(ref)
    if found is None:
        return None
    name, entry = found
    path = assets.models_dir() / name
    if path.is_file() and assets.check_file(_entry_asset(name, entry), path) is None:
        return path
    return None


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def local_name(repo: str, choice: Choice, reg: dict[str, dict]) -> str:
    """A readable file name in the models folder: the hub's own (split suffix dropped), its characters
    limited to a safe set; prefixed with the owner when another source already uses it."""
    name = choice.files[0].path.rsplit("/", 1)[-1]
    m = _SPLIT.fullmatch(name)
    if m:
        name = m["base"] + ".gguf"
    name = _UNSAFE.sub("_", name).lstrip(".")[-200:] or "model.gguf"
    if not name.lower().endswith(".gguf"):
        name += ".gguf"
    taken = {a.filename for a in assets.MODELS.values()} | {p.name for p in assets.models_dir().glob("*.gguf")}
    mine = reg.get(name, {}).get("repo") == repo and reg.get(name, {}).get("files") == [f.path for f in choice.files]
    if name in taken and not mine:
        name = _UNSAFE.sub("_", repo.split("/")[0]) + "--" + name
    return name


# ---------------------------------------------------------------- downloading
class _Counting:
    """The file http_get writes to, counting bytes for the progress callback (resume included)."""

    def __init__(self, f, done: int, total: int, label: str, progress: Progress | None):
        self.f, self.done, self.total, self.label, self.progress = f, done, total, label, progress

    def write(self, b: bytes) -> int:
        n = self.f.write(b)
        self.done += len(b)
        if self.progress:
            self.progress(self.done, self.total, self.label)
        return n

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, *a):
        return self.f.seek(*a)

    def truncate(self, *a):
        self.done = a[0] if a else self.f.tell()
        return self.f.truncate(*a)


def _same_host(a: str, b: str) -> bool:
    return urlsplit(a).netloc == urlsplit(b).netloc


def _lock(f) -> None:
    """One pull per .part file: a second one would append to the same bytes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the sha256 still catches a mixed file
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise AssetError(f"another pull is writing {Path(f.name).name}") from None


def _hidden_tqdm():
    """A tqdm class that draws nothing but keeps its counters (snapshot_download reads them)."""
    from tqdm.auto import tqdm

    class Hidden(tqdm):
        def __init__(self, *a, **k):
            k["disable"] = True
            super().__init__(*a, **k)
    return Hidden


@contextlib.contextmanager
def _quiet_hf_logger():
    log = logging.getLogger("huggingface_hub.file_download")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _git_blob_id(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


def download(repo: str, revision: str, rf: RemoteFile, dest: Path, progress: Progress | None = None) -> Path:
    """Download one file to `dest` (a .part file: resumed if bytes are already there), check its hash,
    and return `dest`. A mismatch deletes the bytes and raises."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers
    from huggingface_hub.utils.tqdm import silent_tqdm

    url = hf_hub_url(repo, rf.path, revision=revision, endpoint=endpoint())
    label = rf.path.rsplit("/", 1)[-1]
    try:
        meta = get_hf_file_metadata(url, token=token(), endpoint=endpoint())
        expected = meta.size if meta.size is not None else rf.size
        if rf.sha256 and meta.etag and re.fullmatch(r"[0-9a-f]{64}", meta.etag) and meta.etag != rf.sha256:
            raise AssetError(f"{repo}/{rf.path}: the listing and the file disagree on its sha256 (changed on the hub?)")
        with open(dest, "ab") as f:
            _lock(f)
            have = f.tell()
            if have > expected:  # not a prefix of this file
                f.seek(0)
                f.truncate()
                have = 0
            # Auth goes to the hub only; a signed CDN location carries its own authorization.
            headers = build_hf_headers(token=token()) if _same_host(url, meta.location) else {}
            out = _Counting(f, have, expected, label, progress)
            if progress:
                progress(have, expected, label)
            with _quiet_hf_logger():  # its retry warnings are two lines; the retry itself is all we need
                http_get(meta.location, out, resume_size=have, headers=headers, expected_size=expected,
                         displayed_filename=label, tqdm_class=silent_tqdm)
    except AssetError:
        raise
    except Exception as e:  # noqa: BLE001 - hub and network errors become one line (the bytes stay: resumable)
        err = describe_hub_error(e, f"{repo}/{rf.path}")
        if err is None and isinstance(e, OSError) and "Consistency check failed" in str(e):
            err = AssetError(f"{repo}/{rf.path}: the download ended early; run the pull again to resume")
        if err is None:
            raise
        raise err from None
    if rf.sha256:
        got = assets.sha256_file(dest)
        if got != rf.sha256:
            dest.unlink(missing_ok=True)
            raise AssetError(f"sha256 mismatch for {repo}/{rf.path}: got {got[:16]}…, the hub declares {rf.sha256[:16]}…")
    elif rf.blob_id and _git_blob_id(dest) != rf.blob_id:
        dest.unlink(missing_ok=True)
        raise AssetError(f"{repo}/{rf.path}: content does not match the hub's git blob id")
    return dest


def _part_path(name: str, rf: RemoteFile) -> Path:
    # Named after the content it will hold, so a resume never mixes two versions of a file.
    tag = (rf.sha256 or rf.blob_id or "x")[:16]
    return assets.models_dir() / f".{name}.{tag}.part"


def merge_split(parts: list[Path], out: Path) -> None:
    """Join llama.cpp split GGUF files into one (metadata of the first, tensors of all, in order)."""
    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.formats.gguf_write import GGUFOutput, copy_metadata

    files = [GGUFFile(p) for p in parts]
    try:
        with GGUFOutput(out, files[0].arch) as w:
            copy_metadata(files[0], w, skip={"split.no", "split.count", "split.tensors.count"})
            tensors = [t for gf in files for t in gf.tensors.values()]
            for t in tensors:
                w.add_tensor_info(t.name, t.qtype, t.shape)
            for t in tensors:
                w.write_tensor(t.name, t.data)
    finally:
        for gf in files:
            gf.close()


def pull(ref: HubRef, *, name: str | None = None, progress: Progress | None = None,
         report: Callable[[str], None] | None = None) -> Path:
    """The local path of `ref`'s GGUF file: the local copy when it is here and intact, else downloaded,
    checked and registered (under `name` when given: catalog entries). HF_HUB_OFFLINE=1: local only."""
    here = local_copy(ref)
    if here is not None and (name is None or here.name == name):
        return here
    if offline():
        raise AssetError(f"{ref} is not here and HF_HUB_OFFLINE is set (pull it once online)")
    revision, files = list_files(ref.repo)
    choice = choose(ref, files)
    d = assets.models_dir()
    d.mkdir(parents=True, exist_ok=True)
    reg = load_registry()
    name = name or local_name(ref.repo, choice, reg)
    final = d / name
    if report:
        report(f"pulling {ref.repo}: {', '.join(f.path for f in choice.files)} "
               f"({choice.quant}, {choice.size / 1e6:.0f} MB) into {d}")
    parts = [download(ref.repo, revision, rf, _part_path(name, rf), progress) for rf in choice.files]
    try:
        if len(parts) == 1:
            os.replace(parts[0], final)
        else:
            if report:
                report(f"joining {len(parts)} parts into {name}")
            merge_split(parts, final)
    finally:
        for p in parts:
            p.unlink(missing_ok=True)
    entry = {"repo": ref.repo, "quant": choice.quant, "files": [f.path for f in choice.files], "revision": revision,
             "size": final.stat().st_size, "default": ref.quant is None,
             "source": choice.files[0].path.rsplit("/", 1)[-1],
             "sha256": choice.files[0].sha256 if len(parts) == 1 and choice.files[0].sha256 else assets.sha256_file(final)}
    reg = load_registry()
    reg[name] = entry
    _save_registry(reg)
    assets.check_file(_entry_asset(name, entry), final)  # stamps the verified sha256: later checks are cheap
    return final


def forget(name: str) -> None:
    """Drop a removed file's registry entry."""
    reg = load_registry()
    if reg.pop(name, None) is not None:
        _save_registry(reg)


# ---------------------------------------------------------------- checkpoints for the converter
def checkpoint(repo: str, quiet: bool = True) -> Path:
    """A checkpoint repo's snapshot folder in the Hugging Face cache, downloading only what conversion
    needs (config, tokenizer files, safetensors); HF_HUB_OFFLINE=1: the cached snapshot only."""
    from huggingface_hub import snapshot_download

    try:
        with _quiet_hf_logger():
            return Path(snapshot_download(repo, allow_patterns=CHECKPOINT_PATTERNS, endpoint=endpoint(),
                                          token=token(), local_files_only=offline(),
                                          tqdm_class=_hidden_tqdm() if quiet else None))
    except Exception as e:  # noqa: BLE001 - one line for hub, network and cache misses
        from huggingface_hub.errors import LocalEntryNotFoundError

        if isinstance(e, LocalEntryNotFoundError):
            why = "HF_HUB_OFFLINE is set" if offline() else "the hub cannot be reached"
            raise AssetError(f"{repo}: not in the local Hugging Face cache and {why}") from None
        err = describe_hub_error(e, repo)
        if err is None:
            raise
        raise err from None
