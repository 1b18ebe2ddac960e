"""Generation API on the real SmolLM2 model: determinism, stop strings, cancel, chat cache reuse, limits."""
import threading

import numpy as np
import pytest

import edgeq
from edgeq.errors import ContextError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(smollm2_path):
    return edgeq.load(str(smollm2_path), n_ctx=512, threads=2)


def text(it):
    return "".join(it)


def test_greedy_and_seeded_sampling_are_reproducible(model):
    a = text(model.generate("The sky is", max_tokens=12, temperature=0))
    b = text(model.generate("The sky is", max_tokens=12, temperature=0))
    assert a == b and len(a) > 0
    s1 = text(model.generate("The sky is", max_tokens=12, temperature=1.0, seed=123))
    s2 = text(model.generate("The sky is", max_tokens=12, temperature=1.0, seed=123))
    assert s1 == s2


def test_stop_string_cuts_the_output(model):
    full = text(model.generate("List three colors:", max_tokens=30, temperature=0))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    cut = text(model.generate("List three colors:", max_tokens=30, temperature=0, stop=[stop]))
    assert cut == full[:full.index(stop)]


def test_the_same_prompt_generates_the_same_text_past_a_quantized_key_group(model):
    """Greedy generation of one prompt, three times: the repeats reuse the cached prompt (nothing evaluated) and
    rewind into the per-channel key group that the first run's tokens filled and quantized; the prompt's mark
    (KVCache.mark) gives that group back as it was, so all three texts are the same."""
    model.reset()
    outs = []
    for _ in range(3):
        outs.append(text(model.generate("List three colors:", max_tokens=60, temperature=0)))
        evaluated = model.last_stats["prompt_eval_tokens"]
    assert evaluated == 0 and len(set(outs)) == 1, outs


def test_cancel_stops_generation(model):
    ev = threading.Event()
    pieces = []
    for p in model.generate("Count to one hundred:", max_tokens=200, temperature=0, cancel=ev):
        pieces.append(p)
        if len(pieces) == 3:
            ev.set()
    assert len(pieces) <= 4
    assert model.last_stats["stop"] == "cancelled"


def test_chat_reuses_the_cache_across_turns(model):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    reply = text(model.chat(msgs, max_tokens=16, temperature=0))
    first_eval = model.last_stats["prompt_eval_tokens"]
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And 3+3?"}]
    text(model.chat(msgs, max_tokens=8, temperature=0))
    s = model.last_stats
    assert s["prompt_tokens"] > first_eval
    assert s["prompt_eval_tokens"] < s["prompt_tokens"] - first_eval + 8, s  # only the new turn was processed


def test_chat_ends_at_end_of_turn(model):
    reply = text(model.chat([{"role": "user", "content": "Say hi."}], max_tokens=100, temperature=0))
    assert "<|im_end|>" not in reply
    assert model.last_stats["stop"] in ("eos", "length")


def test_prompt_longer_than_context_is_a_clear_error(model):
    with pytest.raises(ContextError, match="context"):
        text(model.generate("word " * 2000, max_tokens=4))


def test_n_ctx_above_trained_length_is_refused(smollm2_path):
    with pytest.raises(ContextError, match="trained context"):
        edgeq.load(str(smollm2_path), n_ctx=100000)


def test_generation_from_a_worker_thread_while_main_thread_computes(model, smollm2_path):
    other = edgeq.load(str(smollm2_path), n_ctx=64, threads=2)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("t", text(model.generate("Hello", max_tokens=16, temperature=0))))
    th.start()
    for _ in range(5):
        lg = other.logits([1, 2, 3, 4])
    th.join()
    assert np.isfinite(lg).all() and out["t"]
