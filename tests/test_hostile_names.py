"""Hostile names and files in the data folder: `rm` and name lookups never reach outside the models folder,
`list` survives any file there, and nothing a file holds reaches the terminal as a control character."""
import os
import struct
import subprocess
import time

import pytest

from edgeq import assets
from edgeq.cli import main
from edgeq.formats.gguf_write import write_gguf
from edgeq.text import safe_line, safe_terminal_text

CONTROLS = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} - {"\n", "\t"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    return tmp_path / "home"


def small_gguf(path, arch="llama", name="small"):
    write_gguf(path, arch, {"general.name": name}, [("w", "F32", (2, 32), b"\0" * 256)])
    return path


def nested_arrays_gguf(path, depth=5000):
    """A 60 KB header whose one value is an array of arrays ... 5,000 deep (a recursive parser overflows)."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    value = struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 0, 0)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("deep") + value)
    return path


def err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---------------------------------------------------------------- rm and name lookups
@pytest.mark.parametrize("arg", ["{victim}", "{victim_stem}", "../victim.gguf", "../victim", "../../home/victim.gguf",
                                 "./../victim.gguf", "~/victim.gguf"])
def test_rm_refuses_paths_and_deletes_nothing(home, capsys, monkeypatch, arg):
    monkeypatch.setenv("HOME", str(home))  # "~/victim.gguf" would name the victim
    victim = small_gguf(home / "victim.gguf")
    arg = arg.format(victim=victim, victim_stem=home / "victim")
    assert main(["rm", arg]) == 1
    assert victim.exists()
    err = err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("edgeq rm: ") and "Traceback" not in err[0]


def test_rm_takes_only_gguf_names_inside_the_models_folder(home, capsys):
    notes = home / "models" / "notes.txt"
    notes.write_text("mine")
    assert main(["rm", "notes.txt"]) == 1 and notes.exists()
    capsys.readouterr()
    mine = small_gguf(home / "models" / "mine.gguf")
    assert main(["rm", "mine"]) == 0 and not mine.exists()   # the stem of a local file still works
    assert "removed" in capsys.readouterr().out


def test_name_lookups_stay_in_the_models_folder(home, monkeypatch):
    victim = small_gguf(home / "victim.gguf")
    assert assets.resolve_model(str(victim)) == victim  # an explicit path to a file is still loadable
    monkeypatch.chdir("/")  # relative names below are no existing path from here
    for name in ("../victim", "../victim.gguf", str(home / "victim"), "..", "."):
        assert assets.find_local(name) is None
        with pytest.raises(assets.AssetError):
            assets.resolve_model(name)
        with pytest.raises(assets.AssetError):
            assets.remove(name)
    assert victim.exists()


# ---------------------------------------------------------------- list: one validated reader
def test_list_survives_deeply_nested_arrays_and_notes_the_file(home, capsys):
    nested_arrays_gguf(home / "models" / "deep.gguf")
    small_gguf(home / "models" / "good.gguf")
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    deep = [line for line in out if line.startswith("deep.gguf")]
    good = [line for line in out if line.startswith("good.gguf")]
    assert len(deep) == 1 and "unreadable" in deep[0] and "arrays of arrays" in deep[0]
    assert good and good[0].split()[3:5] == ["F32", "llama"]
    m = {x.name: x for x in assets.list_local()}
    assert m["deep.gguf"].problem and m["good.gguf"].problem is None


def test_gguf_summary_is_the_validated_reader(home):
    from edgeq.formats.errors import FormatError

    with pytest.raises(FormatError):
        assets.gguf_summary(nested_arrays_gguf(home / "deep.gguf"))
    truncated = home / "cut.gguf"
    truncated.write_bytes(small_gguf(home / "whole.gguf").read_bytes()[:-100])  # tensor data runs past the end
    with pytest.raises(FormatError):
        assets.gguf_summary(truncated)


def test_list_escapes_names_and_header_fields(home, capsys):
    small_gguf(home / "models" / "evil\x1b]0;TITLE\x07.gguf", arch="\x1b]52;c;ZXZpbA==\x07\x9b2J")
    os.close(os.open(os.fsencode(home / "models") + b"/bad\xff name.gguf", os.O_CREAT | os.O_WRONLY))
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert not CONTROLS & set(out) and "\\x1b]0;TITLE\\x07" in out
    assert "bad\ufffd name.gguf" in out  # an undecodable byte cannot crash the print


# ---------------------------------------------------------------- the helper and the dispatcher's line
def test_safe_terminal_text():
    assert safe_terminal_text("a\tb\nc") == "a\tb\nc"
    assert safe_terminal_text("\x1b]0;T\x07\r\x08\x7f\x9b2J") == "\\x1b]0;T\\x07\\x0d\\x08\\x7f\\x9b2J"
    pieces = ["ok \x1b", "]52;c;ZXZpbA==\x07", "\x9b"]  # a sequence split across streamed pieces
    assert not CONTROLS & set("".join(map(safe_terminal_text, pieces)))
    assert safe_terminal_text("caf\udce9") == "caf\ufffd"
    line = safe_line("x\ny\tz" * 1000)
    assert "\n" not in line and len(line) == 400 and line.endswith("…")


def test_error_line_is_escaped_and_cut(tmp_path, capsys):
    f = small_gguf(tmp_path / "m.gguf", arch="\x1b]0;PWNED\x07\nnext line" + "A" * 5000)
    assert main(["run", str(f), "-p", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgeq run: ")
    assert not CONTROLS & set(err) and len(err) <= len("edgeq run: ") + 400 + 1 and "PWNED" in err


# ---------------------------------------------------------------- a killed writer's temp files
def test_stale_writer_temps_removed_on_the_next_write(tmp_path):
    from edgeq.formats.gguf_write import remove_stale_temps

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = os.getppid()
    old = time.time() - 3600
    names = {
        f".out.gguf.{dead.pid}.abcdefgh.tmp": False,     # killed writer: removed
        ".out.gguf.abcd_fgh.tmp": False,                  # killed writer of a version without the pid: removed
        f".out.gguf.{alive}.abcdefgh.tmp": True,         # a writer that still runs
        f".other.gguf.{dead.pid}.abcdefgh.tmp": True,    # another output's
        ".out.gguf.notes.tmp": True, "out.gguf.abcdefgh.tmp": True, "notes.tmp": True,  # not our pattern
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (old, old))
    recent = tmp_path / ".out.gguf.zyxwvuts.tmp"   # written since this process started: not stale
    recent.write_bytes(b"x")
    write_gguf(tmp_path / "out.gguf", "llama", {}, [("w", "F32", (32,), b"\0" * 128)])
    for name, kept in names.items():
        assert (tmp_path / name).exists() == kept, name
    assert recent.exists()
    assert remove_stale_temps(tmp_path / "out.gguf") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.gguf.") and str(os.getpid()) in p.name]
