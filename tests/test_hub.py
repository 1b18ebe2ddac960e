"""The hub (`edgeq pull OWNER/REPO[:QUANT]`, hub references everywhere, `edgeq convert OWNER/REPO`) against a
fake hub on a loopback port that answers the routes huggingface_hub calls: repo info
(`/api/models/{repo}/revision/{rev}`), the tree listing (`/api/models/{repo}/tree/{rev}`), and HEAD/GET
`/{repo}/resolve/{rev}/{file}` with ETag, X-Repo-Commit, X-Linked-Etag/-Size and HTTP Range. No internet."""
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_pull import tiny_gguf

from edgeq import assets, hub
from edgeq.cli import main

COMMIT = "c0ffee" + "0" * 34


class FakeHub:
    """repos: {repo: {path: bytes}}; `gated` repos answer 401 on file downloads without the right token;
    `cut` files send half their bytes on the first `cut[path]` GETs, then drop the connection;
    `lie` files are listed with a sha256 that is not theirs."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: dict[str, str] = {}   # repo → the token that opens it
        self.cut: dict[str, int] = {}
        self.fail_after_cut: set[str] = set()  # after a cut, answer 500 (the pull gives up; the bytes stay)
        self.lie: set[str] = set()
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.sent: dict[str, int] = {}  # file → body bytes sent
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                self.handle_any(head=True)

            def do_GET(self):
                self.handle_any(head=False)

            def fail(self, status, code=None):
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def handle_any(self, head):
                path = self.path.split("?")[0]
                fake.log.append((self.command, path, self.headers.get("Range")))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
                if m:
                    files = fake.repos.get(m[1])
                    if files is None:
                        return self.fail(404, "RepoNotFound")
                    if m[2] == "revision":
                        body = {"id": m[1], "sha": COMMIT, "gated": "auto" if m[1] in fake.gated else False,
                                "siblings": [{"rfilename": p, "size": len(b), "blobId": "0" * 40,
                                              "lfs": {"sha256": fake.sha(p, b), "size": len(b), "pointerSize": 130}}
                                             for p, b in files.items()]}
                    else:
                        body = [{"type": "file", "path": p, "size": len(b), "oid": "0" * 40,
                                 "lfs": {"oid": fake.sha(p, b), "size": len(b), "pointerSize": 130}}
                                for p, b in files.items()]
                    return self.reply(json.dumps(body).encode(), "application/json", head)
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not m or m[1] not in fake.repos:
                    return self.fail(404, "RepoNotFound")
                if m[1] in fake.gated and self.headers.get("Authorization") != f"Bearer {fake.gated[m[1]]}":
                    return self.fail(401, "GatedRepo")
                data = fake.repos[m[1]].get(m[3])
                if data is None:
                    return self.fail(404, "EntryNotFound")
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
                if not head and m[3] in fake.fail_after_cut and not fake.cut.get(m[3]) and m[3] in fake.sent:
                    return self.fail(500)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{fake.sha(m[3], data)}"')
                self.send_header("X-Linked-Etag", f'"{fake.sha(m[3], data)}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                body = data[start:]
                if fake.cut.get(m[3]):
                    fake.cut[m[3]] -= 1
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()
                fake.sent[m[3]] = fake.sent.get(m[3], 0) + len(body)

            def reply(self, body, ctype, head):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def sha(self, path, data):
        return ("f" * 64) if path in self.lie else hashlib.sha256(data).hexdigest()

    def gets(self, path):
        return [r for r in self.log if r[0] == "GET" and r[1].endswith("/" + path)]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    fake = FakeHub()
    fake.thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("EDGEQ_HOME", str(tmp_path / "home"))
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub reads it at import; edgeq reads it per call
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def gguf_variant(tag: str) -> bytes:
    """A tiny valid GGUF file whose bytes differ per tag (the tag is its architecture string)."""
    return tiny_gguf(arch=f"llama{tag}")


def models(tmp_path) -> list[str]:
    d = tmp_path / "home" / "models"
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


REPO = "someone/Tiny-GGUF"


def add_tiny_repo(fake):
    fake.repos[REPO] = {"Tiny-Q4_K_M.gguf": gguf_variant("a"), "Tiny-Q8_0.gguf": gguf_variant("bb"),
                        "Tiny-F16.gguf": gguf_variant("ccc"), "mmproj-Tiny-F16.gguf": b"x", "README.md": b"hi"}


# ---------------------------------------------------------------- references and choices
@pytest.mark.parametrize("text, want", [
    ("owner/Repo-GGUF", ("owner/Repo-GGUF", None)),
    ("hf.co/owner/Repo-GGUF:q8_0", ("owner/Repo-GGUF", "Q8_0")),
    ("https://huggingface.co/owner/r:Q4_K_M", ("owner/r", "Q4_K_M")),
    ("owner/r:file-Q5_K_M.gguf", ("owner/r", "file-Q5_K_M.gguf")),
    ("models/x.gguf", None), ("../a/b", None), ("/abs/path", None), ("a/b/c", None), ("smollm2", None),
    ("~/x/y", None), ("a/b:bad quant", None), ("a/b\x1b[2J", None),
])
def test_parse_ref(text, want):
    ref = hub.parse_ref(text)
    assert (ref and (ref.repo, ref.quant)) == (want or None)


def remote(*names):
    return [hub.RemoteFile(n, 10, "0" * 64, None) for n in names]


def test_choose_by_tag_default_closest_and_split():
    files = remote("M-Q8_0.gguf", "M-Q5_K_M.gguf", "M-IQ4_XS.gguf", "M-F16-00001-of-00002.gguf",
                   "M-F16-00002-of-00002.gguf", "M-Q6_K-00001-of-00002.gguf", "mmproj-M-Q4_K_M.gguf")
    assert hub.choose(hub.HubRef("o/r", "Q8_0"), files).files[0].path == "M-Q8_0.gguf"
    assert hub.choose(hub.HubRef("o/r"), files).quant == "IQ4_XS"  # no Q4_K_M: the closest in bits
    split = hub.choose(hub.HubRef("o/r", "F16"), files)
    assert [f.path for f in split.files] == ["M-F16-00001-of-00002.gguf", "M-F16-00002-of-00002.gguf"]
    with pytest.raises(assets.AssetError, match=r"no Q6_K file; available: IQ4_XS, Q5_K_M, Q8_0, F16"):
        hub.choose(hub.HubRef("o/r", "Q6_K"), files)  # a split set with a missing part is not offered
    assert hub.choose(hub.HubRef("o/r"), remote("M-q4_k_m.gguf", "M-Q4_K_S.gguf")).files[0].path == "M-q4_k_m.gguf"


# ---------------------------------------------------------------- pull
def test_pull_by_tag_registers_and_is_used_offline(fake_hub, tmp_path, capsys, monkeypatch):
    add_tiny_repo(fake_hub)
    assert main(["pull", f"hf.co/{REPO}:Q8_0"]) == 0
    out = capsys.readouterr().out
    final = tmp_path / "home" / "models" / "Tiny-Q8_0.gguf"
    assert final.read_bytes() == gguf_variant("bb") and str(final) in out
    assert len(fake_hub.gets("Tiny-Q8_0.gguf")) == 1 and not fake_hub.gets("Tiny-Q4_K_M.gguf")
    assert assets.resolve_model(f"{REPO}:q8_0") == final  # the same reference, any spelling: the local copy
    n = len(fake_hub.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert assets.resolve_model(f"{REPO}:Q8_0") == final and len(fake_hub.log) == n  # no request at all
    with pytest.raises(assets.AssetError, match="HF_HUB_OFFLINE"):
        assets.resolve_model(f"{REPO}:F16")
    assert len(fake_hub.log) == n
    assert main(["list"]) == 0 and "Tiny-Q8_0" in capsys.readouterr().out
    assert main(["rm", "Tiny-Q8_0.gguf"]) == 0 and hub.load_registry() == {}


def test_pull_default_quant_and_name_collision(fake_hub, tmp_path, capsys):
    add_tiny_repo(fake_hub)
    fake_hub.repos["other/Tiny-GGUF"] = {"Tiny-Q4_K_M.gguf": gguf_variant("zz")}
    assert main(["pull", REPO, "-q"]) == 0
    assert main(["pull", "other/Tiny-GGUF", "-q"]) == 0
    assert models(tmp_path) == ["Tiny-Q4_K_M.gguf", "hub.json", "other--Tiny-Q4_K_M.gguf"]
    assert assets.resolve_model("other/Tiny-GGUF").read_bytes() == gguf_variant("zz")
    assert assets.resolve_model(REPO).read_bytes() == gguf_variant("a")
    capsys.readouterr()
    assert main(["pull", REPO]) == 0 and "already here" in capsys.readouterr().out


@pytest.fixture
def small_chunks(monkeypatch):
    """huggingface_hub writes in DOWNLOAD_CHUNK_SIZE pieces (10 MB): small ones make a cut leave bytes behind."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 256)


def test_a_cut_transfer_resumes_within_the_pull(fake_hub, tmp_path, small_chunks):
    data = gguf_variant("r" * 3000)
    fake_hub.repos[REPO] = {"Tiny-Q4_K_M.gguf": data}
    fake_hub.cut["Tiny-Q4_K_M.gguf"] = 1
    path = hub.pull(hub.HubRef(REPO))
    assert path.read_bytes() == data
    ranges = [r[2] for r in fake_hub.gets("Tiny-Q4_K_M.gguf")]
    assert ranges[0] is None and re.fullmatch(r"bytes=(\d+)-", ranges[1])
    assert 0 < int(ranges[1][6:-1]) <= len(data) // 2  # the second request asks only for the rest


def test_resume_across_pulls_keeps_the_bytes(fake_hub, tmp_path, capsys, small_chunks):
    data = gguf_variant("r" * 3000)
    fake_hub.repos[REPO] = {"Tiny-Q4_K_M.gguf": data}
    fake_hub.cut["Tiny-Q4_K_M.gguf"] = 1
    fake_hub.fail_after_cut.add("Tiny-Q4_K_M.gguf")  # the hub goes down after the cut: this pull fails
    assert main(["pull", REPO, "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeq pull: ") and "HTTP 500" in err[0]
    part = next((tmp_path / "home" / "models").glob(".*.part"))
    kept = part.stat().st_size
    assert 0 < kept <= len(data) // 2 and data.startswith(part.read_bytes())
    assert not (tmp_path / "home" / "models" / "Tiny-Q4_K_M.gguf").exists()
    fake_hub.fail_after_cut.clear()
    assert main(["pull", REPO, "-q"]) == 0
    assert (tmp_path / "home" / "models" / "Tiny-Q4_K_M.gguf").read_bytes() == data
    assert fake_hub.gets("Tiny-Q4_K_M.gguf")[-1][2] == f"bytes={kept}-"  # only the missing bytes asked for
    assert models(tmp_path) == ["Tiny-Q4_K_M.gguf", "hub.json"] and not part.exists()


def test_sha256_mismatch_leaves_nothing(fake_hub, tmp_path, capsys):
    add_tiny_repo(fake_hub)
    fake_hub.lie.add("Tiny-Q4_K_M.gguf")
    assert main(["pull", REPO, "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeq pull: sha256 mismatch")
    assert [n for n in models(tmp_path) if n != "hub.json"] == []


@pytest.mark.parametrize("ref, words", [
    ("nobody/Missing-GGUF", "no such repo on the hub"),
    (f"{REPO}:Q2_K", "has no Q2_K file; available: Q4_K_M, Q8_0, F16"),
    ("gated/Tiny-GGUF", "is gated"),
])
def test_pull_errors_are_one_line(fake_hub, tmp_path, capsys, ref, words):
    add_tiny_repo(fake_hub)
    fake_hub.repos["gated/Tiny-GGUF"] = dict(fake_hub.repos[REPO])
    fake_hub.gated["gated/Tiny-GGUF"] = "hf_secret"
    assert main(["pull", ref]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeq pull: ") and words in err[-1] and "Traceback" not in "".join(err)
    assert [n for n in models(tmp_path) if not n.endswith(".part")] == []


def test_gated_repo_opens_with_hf_token(fake_hub, tmp_path, capsys, monkeypatch):
    fake_hub.repos["gated/Tiny-GGUF"] = {"Tiny-Q4_K_M.gguf": gguf_variant("g")}
    fake_hub.gated["gated/Tiny-GGUF"] = "hf_secret"
    assert main(["pull", "gated/Tiny-GGUF", "-q"]) == 1
    assert "401" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert main(["pull", "gated/Tiny-GGUF", "-q"]) == 0


def test_split_files_are_joined(fake_hub, tmp_path):
    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.formats.gguf_write import write_gguf

    src = tmp_path / "src"
    src.mkdir()
    t0, t1 = bytes(range(128)), bytes(range(128, 256))
    write_gguf(src / "1.gguf", "llama", {"general.name": "split", "split.no": 0, "split.count": 2},
               [("a.weight", "F32", (1, 32), t0)])
    write_gguf(src / "2.gguf", "llama", {"split.no": 1, "split.count": 2}, [("b.weight", "F32", (1, 32), t1)])
    fake_hub.repos[REPO] = {"Big-Q4_K_M-00001-of-00002.gguf": (src / "1.gguf").read_bytes(),
                            "Big-Q4_K_M-00002-of-00002.gguf": (src / "2.gguf").read_bytes()}
    path = hub.pull(hub.HubRef(REPO))
    assert path.name == "Big-Q4_K_M.gguf" and not [p for p in path.parent.iterdir() if p.suffix == ".part"]
    with GGUFFile(path) as gf:
        assert gf.get("general.name") == "split" and gf.get("split.count") is None
        assert bytes(gf.tensors["a.weight"].data) == t0 and bytes(gf.tensors["b.weight"].data) == t1
    assert hub.local_copy(hub.HubRef(REPO)) == path


def test_a_path_shaped_like_a_repo_is_never_sent(fake_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)
    with pytest.raises(assets.AssetError, match="directory"):
        assets.resolve_model("a/b")
    with pytest.raises(assets.AssetError, match="no such model file"):
        assets.resolve_model("a/missing.gguf")
    assert fake_hub.log == []


def test_list_all_shows_hub_catalog_with_sizes_and_unsupported_archs(fake_hub, capsys, monkeypatch):
    monkeypatch.setitem(assets.MODELS, "mamba-tiny", assets.Asset("mamba-tiny", "mamba-tiny.gguf", "", 0, "tiny",
                                                                  hf_repo=REPO, hf_quant="Q8_0", arch="mamba"))
    assert main(["list", "-a"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "hub bartowski/SmolLM2-360M-Instruct-GGUF:Q4_K_M" in rows["smollm2-360m-instruct"]
    assert "271 MB" in rows["smollm2-360m-instruct"] and "not supported" not in rows["smollm2-360m-instruct"]
    assert "mamba: not supported" in rows["mamba-tiny"]
    assert "not supported" not in rows["qwen3-0.6b"] + rows["phi-4-mini-instruct"]
    assert fake_hub.log == []


def test_catalog_hub_entry_pulls_under_its_catalog_name(fake_hub, tmp_path, monkeypatch):
    a = assets.Asset("tiny-hub", "tiny-hub.gguf", "", 0, "tiny", hf_repo=REPO, hf_quant="Q8_0", arch="llama")
    monkeypatch.setitem(assets.MODELS, "tiny-hub", a)
    add_tiny_repo(fake_hub)
    path = assets.resolve_model("tiny-hub")
    assert path == tmp_path / "home" / "models" / "tiny-hub.gguf" and path.read_bytes() == gguf_variant("bb")
    assert assets.is_local("tiny-hub") and assets.resolve_model("tiny-hub") == path


# ---------------------------------------------------------------- convert from a repo id
def test_convert_from_repo_id_downloads_only_what_it_needs(fake_hub, tmp_path, monkeypatch):
    from test_convert import make_tiny

    ckpt = make_tiny("gemma3", tmp_path / "ckpt", None)
    files = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    files["original/consolidated.pth"] = b"not needed"
    files["model-Q4_K_M.gguf"] = b"not needed either"
    fake_hub.repos["someone/tiny-gemma3"] = files
    out = tmp_path / "m.gguf"
    assert main(["convert", "someone/tiny-gemma3", "-o", str(out), "--type", "F16", "-q"]) == 0
    from edgeq.formats.gguf_file import GGUFFile

    with GGUFFile(out) as gf:
        assert gf.arch == "gemma3"
    got = {r[1].split("/resolve/", 1)[1].split("/", 1)[1] for r in fake_hub.log if r[0] == "GET" and "/resolve/" in r[1]}
    assert "model.safetensors" in got and "config.json" in got
    assert not {"original/consolidated.pth", "model-Q4_K_M.gguf"} & got
    # offline: the cached snapshot, no request
    n = len(fake_hub.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out.unlink()
    assert main(["convert", "someone/tiny-gemma3", "-o", str(out), "--type", "F16", "-q"]) == 0
    assert len(fake_hub.log) == n and out.is_file()


def test_convert_unknown_repo_is_one_line(fake_hub, tmp_path, capsys):
    assert main(["convert", "nobody/nothing", "-o", str(tmp_path / "m.gguf"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such repo on the hub" in err[0]
    assert Path(tmp_path / "m.gguf").exists() is False
