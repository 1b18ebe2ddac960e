"""benchmarks/serve_load.py's verdicts: each edgeq level against the decode baseline measured around it, the ratio
targets on the median of the rounds (the benchmark's arithmetic; the load itself runs in benchmarks, not here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


@pytest.fixture(scope="module")
def serve_load():
    spec = importlib.util.spec_from_file_location("serve_load_under_test", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(server, clients, tok_s, decode_s=None, rnd=1, tpot=0.008, ttft95=0.3, errors=0):
    r = {"server": server, "clients": clients, "tok_s": tok_s, "tok_s_drained": tok_s, "tpot_p50": tpot,
         "ttft_p95": ttft95, "errors": errors, "round": rnd}
    if decode_s is not None:
        r["decode_s"] = decode_s
    return r


def _line(lines, start):
    (hit,) = [ln for ln in lines if ln.startswith(start)]
    return hit


def test_each_level_is_judged_against_its_own_baseline(serve_load):
    # the same throughput passes against a slow baseline beside it and fails against a fast one
    slow = serve_load.verdicts([_row("edgeq", 8, 300.0, decode_s=1 / 100)])
    fast = serve_load.verdicts([_row("edgeq", 8, 300.0, decode_s=1 / 150)])
    assert _line(slow, "- 8 clients: 300.0 tok/s = 3.00x").endswith("PASS; with the level's drain 3.00x")
    assert "2.00x" in _line(fast, "- 8 clients: 300.0") and "FAIL" in _line(fast, "- 8 clients: 300.0")


def test_ratio_targets_take_the_median_of_the_rounds(serve_load):
    rows = [_row("edgeq", 8, t, decode_s=1 / 100, rnd=i + 1) for i, t in enumerate((240.0, 260.0, 270.0))]
    rows += [_row("llama-cpp-python", 8, t, rnd=i + 1) for i, t in enumerate((100.0, 200.0, 100.0))]
    out = serve_load.verdicts(rows)
    line = _line(out, "- 8 clients: 260.0 tok/s")
    assert "2.60x" in line and "median of 3 rounds: 2.40, 2.60, 2.70" in line and "PASS" in line
    # against llama-cpp-python round by round (240/100, 260/200, 270/100), then the median
    lc = _line(out, "- 8 clients: 2.40x llama-cpp-python's server (100.0 tok/s)")
    assert "(median of 3 rounds: 2.40, 1.30, 2.70)" in lc and lc.endswith("PASS")
    assert serve_load.median([3.0, 1.0, 2.0, 10.0]) == 2.5


def test_time_to_first_token_takes_the_worst_round_and_errors_add_up(serve_load):
    rows = [_row("edgeq", 4, 200.0, decode_s=0.01, rnd=1, ttft95=0.4),
            _row("edgeq", 4, 200.0, decode_s=0.01, rnd=2, ttft95=1.6, errors=2)]
    out = serve_load.verdicts(rows)
    assert _line(out, "- 4 clients:") == ("- 4 clients: p95 time to first token 1.60 s (the worst round) "
                                          "(target <= 1.5 s): FAIL")
    assert _line(out, "- edgeq errors:") == "- edgeq errors: 2: FAIL"


def test_pass_ceiling_is_the_arithmetic_of_the_levels_counters(serve_load):
    # 10 requests of 128 tokens: 1.0 s of prompt passes (0.1 s a request), 2 of them mixed; 150 decode passes in
    # 1.5 s (10 ms) and 1216 rows over the 152 passes that decode (8 a pass, so the mixed passes gave 16 tokens:
    # 1.6 a request): a request costs 0.1 + (127 - 1.6) x 10 ms / 8 = 0.2568 s, so 128 / 0.2568 = 498.5 tok/s
    r = _row("edgeq", 8, 400.0, decode_s=1 / 200)
    r["gen_per_request"] = 128
    r["engine"] = {"wall": 3.0, "prefill_s": 0.6, "mixed_s": 0.4, "decode_s": 1.5, "steps": 152.0, "rows": 1216.0,
                   "decode_passes": 150.0, "mixed_passes": 2.0, "requests": 10}
    c = serve_load.pass_ceiling(r)
    assert c["step_s"] == pytest.approx(0.01) and c["batch"] == pytest.approx(8.0)
    assert c["prompt_s"] == pytest.approx(0.1)
    assert c["tok_s"] == pytest.approx(128 / (0.1 + (127 - 1.6) * 0.01 / 8))
    # nothing to say without decode passes (a level that only prefilled, or llama-cpp-python's rows)
    r["engine"]["decode_passes"] = 0.0
    assert serve_load.pass_ceiling(r) is None
    assert serve_load.pass_ceiling(_row("llama-cpp-python", 8, 50.0)) is None
