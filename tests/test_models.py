"""Real models against an independent oracle: transformers' fp32 model loaded from the same GGUF file."""
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow

NEAR_TIE = 0.5  # a greedy divergence is accepted only where the oracle's top-two logits are this close


def hf_model(path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32, attn_implementation="eager")


def hf_logits(m, ids):
    import torch

    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request):
    import edgeq

    path = str(request.getfixturevalue(f"{request.param}_path"))
    return edgeq.load(path, n_ctx=1024, threads=2), hf_model(path)


def test_greedy_32_tokens_match_transformers(pair):
    ours, ref = pair
    ids = ours.encode_prompt("Once upon a time")
    ours.reset()
    mine, theirs = list(ids), list(ids)
    logits = ours._forward(ids)
    for step in range(32):
        mine.append(int(np.argmax(logits)))
        ref_logits = hf_logits(ref, theirs)[-1]
        theirs.append(int(np.argmax(ref_logits)))
        if mine[-1] != theirs[-1]:
            top2 = np.sort(ref_logits)[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, f"diverged at step {step} without a near-tie ({top2})"
            return
        logits = ours._forward([mine[-1]])
    assert mine == theirs


def test_prefill_logits_match_transformers_across_batches_and_window(pair, hamlet_path):
    """700 tokens: two prefill batches (512 + 188) and, for Gemma3, past the 512-token sliding window."""
    ours, ref = pair
    text = hamlet_path.read_text(encoding="utf-8")[5000:12000]
    ids = ours.encode_prompt(text)[:700]
    got = ours.logits(ids)
    want = hf_logits(ref, ids)
    assert got.shape == want.shape
    # int8 activations per 32 values in every product (prefill as decode, as llama.cpp): measured median 0.024 /
    # 0.023, max 0.073 / 0.071, same top token 95.1% / 96.0% (SmolLM2 / Gemma 3); the decode path of the same
    # tokens: median 0.025 / 0.024, max 0.094 / 0.062. A wrong kernel is far outside these bounds.
    rel = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
    assert np.median(rel) < 0.03 and rel.max() < 0.12, (np.median(rel), rel.max())
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.93


def test_decode_path_equals_prefill(pair):
    ours, _ = pair
    ids = ours.encode_prompt("The capital of France is Paris. The capital of Italy is")
    full = ours.logits(ids)
    ours.reset()
    ours._forward(ids[:-3])
    steps = [ours._forward([t]) for t in ids[-3:]]
    for k, row in enumerate(steps):
        want = full[len(ids) - 3 + k]
        assert np.abs(row - want).max() < 0.05 * np.abs(want).max()
