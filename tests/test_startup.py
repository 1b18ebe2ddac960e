"""edgeq/startup.py: `edgeq run` turns Python's garbage collector off until its model is loaded and its first token
is out, then freezes what exists and turns it back on; every other path leaves the collector alone."""
import gc

import pytest

from edgeq import startup
from edgeq.cli import main


@pytest.fixture
def collector():
    """The collector as the test found it, afterwards: on, nothing frozen by the test, startup holding nothing."""
    was = gc.isenabled()
    yield
    startup._held = False
    gc.unfreeze()
    (gc.enable if was else gc.disable)()


def test_pause_then_resume_freezes_and_turns_it_back_on(collector):
    gc.enable()
    gc.unfreeze()
    startup.pause()
    assert not gc.isenabled()
    kept = [[i] for i in range(1000)]  # container objects made while paused
    startup.resume()
    assert gc.isenabled() and gc.get_freeze_count() >= len(kept)
    startup.resume()  # a second resume (cli.main's finally after the run's own) changes nothing
    assert gc.isenabled()


def test_resume_without_pause_changes_nothing(collector):
    gc.disable()  # someone else's choice: resume() must not turn it on
    startup.resume()
    assert not gc.isenabled() and gc.get_freeze_count() == 0
    gc.enable()
    startup.pause()
    startup.pause()  # paused already: still one pause to undo
    startup.resume()
    assert gc.isenabled()


@pytest.mark.slow
def test_run_turns_the_collector_back_on(smollm2_path, capsys, collector):
    gc.enable()
    assert main(["run", str(smollm2_path), "-p", "Hi", "-n", "3", "--temp", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hi")
    assert gc.isenabled() and not startup._held and gc.get_freeze_count() > 0


def test_a_failed_run_turns_the_collector_back_on(tmp_path, capsys, collector):
    gc.enable()
    assert main(["run", str(tmp_path / "missing.gguf"), "-p", "Hi"]) == 1
    assert "edgeq run:" in capsys.readouterr().err
    assert gc.isenabled() and not startup._held


def test_other_verbs_leave_the_collector_alone(capsys, collector):
    gc.enable()
    assert main(["list"]) == 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
