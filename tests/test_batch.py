"""Batched decode (models' forward_batch) and the continuous-batching scheduler, without HTTP."""
import threading

import numpy as np
import pytest

from edgeq.runtime.sampling import SamplingParams
from edgeq.runtime.scheduler import MAX_CHUNK, Done, GenRequest, Piece, QueueFull, Scheduler, chunk_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model(request):
    import edgeq

    return edgeq.load(str(request.getfixturevalue(f"{request.param}_path")), n_ctx=256, threads=2)


def _single_row_kernels(monkeypatch, model):
    """Batches take the single-row dots (not cpu_kernels/batch_dot.py's tiles, equal only up to float32 rounding),
    and so do prompts (not the int8 GEMM): a server step that carries a prompt chunk and decoding sequences together
    runs them through the prompt's products. The compiled decode step's tables (models/llama.decode_tables, which
    name their kernels once) are made afresh meanwhile."""
    from edgeq.cpu_kernels import batch_dot, linear

    for qtype in list(batch_dot.MIN_ROWS):
        monkeypatch.setitem(batch_dot.MIN_ROWS, qtype, 1 << 30)
    monkeypatch.setattr(linear, "_GEMM_MIN_T", 1 << 30)
    monkeypatch.setattr(model.weights, "_decode_tables", {}, raising=False)


def test_forward_batch_matches_each_sequence_alone(model, monkeypatch):
    """Three sequences at different positions in one step give each one's own single-sequence logits. With the
    single-row dots, as decoding alone: the multi-row tiles differ from them by float32 roundings, which the int8
    activation codes amplify (SmolLM2: a 1e-7 relative change of the embedding moves the logits by 2-4%); they
    are checked for batch independence in test_forward_batch_rows_do_not_depend_on_the_batch."""
    from edgeq.runtime.kv_cache import make_kv_cache

    _single_row_kernels(monkeypatch, model)
    m = model
    m._set_threads()
    prompts = [m.tokenizer.encode(t) for t in ("Hello there", "One two three four five six", "A")]
    caches = [make_kv_cache(m.cfg.kv_layouts(), 64, max_batch=32) for _ in range(6)]
    for c, ids in zip(caches, prompts + prompts):
        m.arch.forward(m.weights, m.cfg, np.asarray(ids, np.int64), 0, c)
    nxt = np.array([5, 6, 7])
    batch = m.arch.forward_batch(m.weights, m.cfg, nxt, np.array([len(p) for p in prompts]), caches[:3])
    assert batch.shape == (3, m.cfg.n_vocab)
    for i, ids in enumerate(prompts):
        one = m.arch.forward(m.weights, m.cfg, nxt[i:i + 1], len(ids), caches[3 + i])[0]
        assert np.abs(batch[i] - one).max() < 0.02 * np.abs(one).max()
        assert batch[i].argmax() == one.argmax()


def test_mixed_step_equals_the_prompt_chunk_and_the_decode_batch_apart(model, monkeypatch):
    """forward_batch with prompt_rows: a chunk of one sequence's prompt and one token of two others in one pass
    gives the chunk's last-token logits of `forward` over the chunk and the two rows of a decode batch, and leaves
    every cache as they do: the next token of each sequence, decoded alone, agrees. On the single-row kernels
    (prompts too), so both sides compute each row with the same products and agree to float32 roundings of the
    attention; with the real kernels the decode rows run in the prompt's int8 GEMM in one and in the multi-row or
    single-row dots in the other, whose float32 roundings the int8 activation codes amplify (Gemma 3: 2-6% of the
    logits, moving with any change of a kernel's summation order), which would hide a real mixing error."""
    from edgeq.runtime.kv_cache import make_kv_cache

    _single_row_kernels(monkeypatch, model)
    m = model
    m._set_threads()
    prompts = [m.tokenizer.encode(t) for t in ("Once upon a time there was a", "Hello there", "One two three")]
    chunk = np.asarray(m.tokenizer.encode(" small village by the sea, and in it"), np.int64)
    nxt = np.array([5, 6])

    def caches():
        cs = [make_kv_cache(m.cfg.kv_layouts(), 64, max_batch=32) for _ in prompts]
        for c, ids in zip(cs, prompts):
            m.arch.forward(m.weights, m.cfg, np.asarray(ids, np.int64), 0, c)
        return cs
    mixed_caches, apart_caches = caches(), caches()
    pos = np.array([len(p) for p in prompts])
    T = len(chunk)
    mixed = m.arch.forward_batch(m.weights, m.cfg, np.concatenate([chunk, nxt]),
                                 np.concatenate([np.arange(pos[0], pos[0] + T), pos[1:]]), mixed_caches, T)
    apart = np.concatenate([m.arch.forward(m.weights, m.cfg, chunk, pos[0], apart_caches[0]),
                            m.arch.forward_batch(m.weights, m.cfg, nxt, pos[1:], apart_caches[1:])])
    assert mixed.shape == (3, m.cfg.n_vocab)
    for a, b in zip(mixed, apart):
        assert np.abs(a - b).max() < 1e-3 * np.abs(b).max() and a.argmax() == b.argmax()
    after = pos + np.array([T, 1, 1])
    for i in range(3):
        a, b = (m.arch.forward(m.weights, m.cfg, np.array([7]), after[i], cs[i])[0]
                for cs in (mixed_caches, apart_caches))
        assert np.abs(a - b).max() < 1e-3 * np.abs(b).max() and a.argmax() == b.argmax()


def test_forward_batch_rows_do_not_depend_on_the_batch(model):
    """With the multi-row drivers (cpu_kernels/batch_dot.py): each sequence's logits are the same bits in a batch
    of three as in another batch of three rows (a copy of itself and another sequence, in another order): the
    same row count takes the same driver (tiles or lanes: batch_dot.LANES_FROM)."""
    from edgeq.runtime.kv_cache import make_kv_cache

    m = model
    m._set_threads()
    prompts = [m.tokenizer.encode(t) for t in ("Hello there", "One two three four five six", "A")]

    def step(rows):
        caches = [make_kv_cache(m.cfg.kv_layouts(), 64, max_batch=32) for _ in rows]
        for c, i in zip(caches, rows):
            m.arch.forward(m.weights, m.cfg, np.asarray(prompts[i], np.int64), 0, c)
        return m.arch.forward_batch(m.weights, m.cfg, np.array([5 + i for i in rows]),
                                    np.array([len(prompts[i]) for i in rows]), caches)
    three = step([0, 1, 2])
    for i in range(3):
        np.testing.assert_array_equal(step([(i + 1) % 3, i, i])[1], three[i])


def _run(sched, reqs, timeout=600):
    texts, done = [[] for _ in reqs], [None] * len(reqs)
    finished = threading.Event()

    def cb(i):
        def on_event(ev):
            if isinstance(ev, Piece):
                texts[i].append(ev.text)
            else:
                done[i] = ev
                if all(done):
                    finished.set()
        return on_event

    for i, r in enumerate(reqs):
        sched.submit(r, cb(i))
    assert finished.wait(timeout)
    return ["".join(t) for t in texts], done


def test_scheduler_batched_equals_sequential_and_reuses_prompts(model, monkeypatch):
    _single_row_kernels(monkeypatch, model)  # greedy text alone and batched: equal only where the products are (see above)
    m = model
    sched = Scheduler(m, n_slots=3, n_ctx=128, prefill_chunk=8).start()  # chunks of 8: prompts take several steps
    try:
        assert sched.ready.wait(600)
        prompts = [m.chat_ids([{"role": "user", "content": t}]) for t in ("Hi", "Name a color.", "What is 1+1?")]
        reqs = lambda: [GenRequest(ids, 6, SamplingParams(temperature=0)) for ids in prompts]
        together, done = _run(sched, reqs())
        assert sched.busy_s["mixed"] > 0  # a prompt chunk ran in the same pass as the decoding sequences
        alone = [_run(sched, [r])[0][0] for r in reqs()]
        assert together == alone
        assert all(d.finish in ("stop", "length") for d in done)
        again = _run(sched, reqs()[:1])[1][0]   # the same prompt: its slot still holds it
        assert again.cached_tokens == len(prompts[0])
        sched.prompt_reuse = False  # the measurement switch: every prompt from position 0
        assert _run(sched, reqs()[:1])[1][0].cached_tokens == 0
        assert sched.active_slots == 0 and sched.queue_depth == 0
    finally:
        sched.stop()


def test_scheduler_repeats_a_request_exactly_past_a_quantized_key_group(model):
    """The same greedy request three times on one slot: the repeats reuse the whole prompt and rewind into the
    per-channel key group that the first answer's tokens filled and quantized; the prompt's mark (KVCache.mark)
    restores that group as it was, so every answer is the same text (same request, same output)."""
    sched = Scheduler(model, n_slots=1, n_ctx=128).start()
    try:
        assert sched.ready.wait(600)
        ids = model.chat_ids([{"role": "user", "content": "Tell me a story about a cat."}])
        runs = [_run(sched, [GenRequest(ids, 48, SamplingParams(temperature=0))]) for _ in range(3)]
        texts = [t[0] for t, _ in runs]
        assert [d[0].cached_tokens for _, d in runs] == [0, len(ids), len(ids)]
        assert len(ids) % 32 and len(set(texts)) == 1, texts
    finally:
        sched.stop()


def test_scheduler_rejects_what_cannot_run_and_bounds_the_queue(model):
    from edgeq.errors import ContextError

    sched = Scheduler(model, n_slots=1, n_ctx=32, max_queue=1)  # not started: nothing leaves the queue
    with pytest.raises(ContextError):
        sched.submit(GenRequest(list(range(1, 40)), 4), lambda ev: None)
    sched.submit(GenRequest([1, 2], 4), lambda ev: None)
    sched.submit(GenRequest([1, 2], 4), lambda ev: None)
    with pytest.raises(QueueFull):
        sched.submit(GenRequest([1, 2], 4), lambda ev: None)
    assert isinstance(Done("stop", 1, 1, 0, 0.0, 0.0), Done)


def test_decode_batch_products_equal_one_row_products(model):
    """matmul_rows_many over 8 rows gives each row the same bits as in any other batch that takes the same
    driver (5 rows, another order: cpu_kernels/batch_dot.LANES_FROM), so a sequence's logits do not depend on
    what else is in the batch through the matrix products; and what matvec gives it alone up to float32
    rounding (tests/test_batch_dot.py)."""
    from edgeq.cpu_kernels.linear import matmul_rows_many

    L = model.weights.layers[0]
    X = np.random.default_rng(0).standard_normal((8, L.wq.n_in)).astype(np.float32)
    qs = [L.wq.q, L.wk.q, L.wv.q, L.w_gate.q]
    ys = matmul_rows_many(qs, X)
    for rows in ([7, 0, 5, 2, 4], [3, 6, 1, 2, 5, 4, 0, 7]):
        for y, part in zip(ys, matmul_rows_many(qs, X[rows])):
            np.testing.assert_array_equal(part, y[rows])
    for q, y in zip(qs, ys):
        assert y.shape == (8, q.n_out)
        for t in range(8):
            one = q.matvec(X[t])
            assert np.abs(y[t] - one).max() <= 2e-6 * np.abs(one).max()


def test_warm_up_meets_every_batch_driver(model):
    """After the scheduler's warm-up, decode batches of 1..8 sequences run on kernels already compiled for these
    weights (no dispatcher gains a signature): a driver first met while serving would stall every stream while
    it loads or, on a fresh install, compiles."""
    from edgeq.cpu_kernels import batch_dot, linear

    def dispatchers():
        ds = list(batch_dot.KERNELS.values()) + list(batch_dot.LANE_KERNELS.values())
        ds += list(batch_dot.ONE_ROW.values()) + [k for pair in linear._KERNELS.values() for k in pair if k]
        return {id(d): d for d in ds}.values()

    sched = Scheduler(model, n_slots=8, n_ctx=320)
    sched._warm_up()
    before = {id(d): len(d.signatures) for d in dispatchers()}
    m = model
    for k in range(1, 9):
        m.arch.forward_batch(m.weights, m.cfg, np.full(k, 7, np.int64), np.zeros(k, np.int64),
                             [s.cache for s in sched.slots[:k]])
    for T in (1, 5, 40, MAX_CHUNK):  # a prompt chunk and decoding sequences in one pass: the prompt's products
        m.arch.forward_batch(m.weights, m.cfg, np.full(T + 7, 7, np.int64), np.append(np.arange(T), np.zeros(7, int)),
                             [s.cache for s in sched.slots], T)
    grew = [d.__name__ for d in dispatchers() if len(d.signatures) != before[id(d)]]
    assert grew == []


def test_chunk_for_fits_the_step_budget():
    from edgeq.runtime.scheduler import STEP_BUDGET_S

    assert STEP_BUDGET_S == 0.1
    assert chunk_for(0.0, 0.5e-3) == 192      # 0.5 ms a token: 200 fit in 0.1 s, in multiples of 32
    assert chunk_for(0.02, 0.5e-3) == 160     # a pass's fixed 20 ms leaves room for 160
    assert chunk_for(0.0, 1e-3) == 96         # 1 ms a token
    assert chunk_for(0.0, 1e-5) == MAX_CHUNK == 256  # a fast machine: the bound
    assert chunk_for(0.0, 0.03) == 32         # a slow one: never below 32
    assert chunk_for(0.05, 0.02) == 32        # ... even where the fixed part leaves room for 2
    assert chunk_for(0.0, 0.0) == MAX_CHUNK   # a clock that did not move


def test_the_default_prompt_chunk_is_measured_at_warm_up(model, monkeypatch):
    """Without prefill_chunk the scheduler times warm passes of two prompt sizes after its warm-up, splits their
    cost into a fixed part and a part per token, and keeps chunk_for's answer for its life; an explicit
    prefill_chunk is kept as given."""
    from edgeq.runtime import scheduler as S

    seen = []
    monkeypatch.setattr(S, "chunk_for", lambda pass_s, per_token: seen.append((pass_s, per_token)) or chunk_for(
        pass_s, per_token))
    sched = Scheduler(model, n_slots=2, n_ctx=128).start()
    try:
        assert sched.ready.wait(600) and sched.failed is None
        assert len(seen) == 1 and 0 <= seen[0][0] <= S.STEP_BUDGET_S / 2 and seen[0][1] > 0
        assert sched.prefill_chunk == chunk_for(*seen[0])
        ids = model.chat_ids([{"role": "user", "content": "Hi"}])
        (text,), (done,) = _run(sched, [GenRequest(ids, 4, SamplingParams(temperature=0))])
        assert done.finish in ("stop", "length")
    finally:
        sched.stop()
    fixed = Scheduler(model, n_slots=1, n_ctx=64, prefill_chunk=8).start()
    try:
        assert fixed.ready.wait(600) and fixed.prefill_chunk == 8 and len(seen) == 1
    finally:
        fixed.stop()


def test_the_chunk_books_a_passs_fixed_cost_once(model, monkeypatch):
    """The warm-up's probes split a pass's cost into its fixed part and its per-token part: on a machine (here a
    forward pass that sleeps) where a pass costs 17 ms + 0.4 ms a token, the chunk is the 192 tokens that fit in
    the budget (83 ms), not the 128 that one 64-token probe's rate (total / tokens) gave."""
    import time as _time

    sched = Scheduler(model, n_slots=1, n_ctx=256)  # not started: the measurement alone
    sizes = []
    monkeypatch.setattr(model.arch, "forward", lambda w, cfg, tokens, *a, **k: sizes.append(len(tokens)) or
                        _time.sleep(0.017 + 0.0004 * len(tokens)))
    assert sched._measure_chunk() == 192
    assert sorted(set(sizes)) == [48, 128]
    assert abs(sched._pass_s - 0.017) < 0.004 and abs(sched._best_s_per_token - 0.0004) < 0.00004
    assert chunk_for(0.0, (0.017 + 0.0004 * 64) / 64) == 128  # what the rate of one 64-token pass gave


def test_prompt_passes_only_raise_the_chunk(model):
    """A prompt pass faster than any rate seen before raises the chunk (a warm-up probe on a busy machine does not
    set it for good); a slower one changes nothing; an explicit prefill_chunk is never touched."""
    sched = Scheduler(model, n_slots=1, n_ctx=64)  # not started: the rule alone
    sched._pass_s, sched._best_s_per_token, sched.prefill_chunk = 0.0, 1e-3, 96
    sched._refine_chunk(100, 0.2)
    assert sched.prefill_chunk == 96
    sched._refine_chunk(100, 0.05)
    assert sched.prefill_chunk == 192 and sched._best_s_per_token == 0.5e-3
    sched._refine_chunk(100, 0.09)
    assert sched.prefill_chunk == 192
    sched._pass_s = 0.02  # the fixed part is not booked on the tokens: 20 ms + 100 x 0.3 ms
    sched._refine_chunk(100, 0.05)
    assert sched.prefill_chunk == 256 and abs(sched._best_s_per_token - 0.3e-3) < 1e-12
    fixed = Scheduler(model, n_slots=1, n_ctx=128, prefill_chunk=48).start()
    try:
        assert fixed.ready.wait(600)
        text = "Go on counting in words: " + ", ".join(["one", "two", "three", "four", "five", "six", "seven"] * 3)
        ids = model.chat_ids([{"role": "user", "content": text}])
        assert len(ids) >= 40  # a prompt pass of 40-48 tokens alone, which would refine a measured chunk
        _run(fixed, [GenRequest(ids, 2, SamplingParams(temperature=0))])
        assert fixed.prefill_chunk == 48
    finally:
        fixed.stop()


def test_mixed_passes_raise_the_chunk_too(model):
    """A loaded server runs its prompts beside decoding sequences (mixed passes) and rarely alone: those passes
    refine a chunk that a warm-up probe on a slow minute left small too, the decoding rows counted with the chunk's
    (each costs about a prompt token in the products)."""
    sched = Scheduler(model, n_slots=2, n_ctx=256).start()
    refined = []
    refine = sched._refine_chunk
    sched._refine_chunk = lambda tokens, seconds: refined.append((tokens, dict(sched.passes))) or refine(tokens, seconds)
    try:
        assert sched.ready.wait(600)
        sched.prefill_chunk, sched._best_s_per_token = 32, 1.0  # as if the probe had run on a very slow machine
        short = model.chat_ids([{"role": "user", "content": "Hi"}])
        long = model.chat_ids([{"role": "user", "content": " ".join(["seven"] * 120)}])[:100]
        assert len(short) < 32 and len(long) == 100  # the short prompt's pass alone refines nothing
        eog = np.array(sorted(model.tokenizer.eog_ids), np.int64)
        decoding, finished = threading.Event(), threading.Event()
        done = []

        def on_event(ev):
            if isinstance(ev, Piece):
                decoding.set()
            elif isinstance(ev, Done):
                done.append(ev)
                if len(done) == 2:
                    finished.set()
        sched.submit(GenRequest(short, 60, SamplingParams(temperature=0),
                                logit_bias=(eog, np.full(len(eog), -100.0, np.float32))), on_event)
        assert decoding.wait(600)
        sched.submit(GenRequest(long, 1, SamplingParams(temperature=0)), on_event)
        assert finished.wait(600)
    finally:
        sched.stop()
    assert [d.finish for d in done] == ["length", "length"] and done[0].completion_tokens == 1
    # the long prompt's first pass: its chunk of 32 beside the decoding row, after no prompt pass alone of 32 or more
    assert refined and refined[0][0] == 33 and refined[0][1]["mixed"] >= 1
    assert sched.prefill_chunk > 32


def test_a_prompt_alone_takes_the_largest_chunks(model, monkeypatch):
    """With no sequence decoding, a prompt pass holds nobody back: a prompt longer than the measured chunk goes in
    passes of MAX_CHUNK; a chunk the caller fixed is kept even then."""
    calls = []
    forward = model.arch.forward
    monkeypatch.setattr(model.arch, "forward", lambda w, cfg, tokens, *a, **k: calls.append(len(tokens)) or forward(
        w, cfg, tokens, *a, **k))
    ids = model.chat_ids([{"role": "user", "content": " ".join(["seven"] * 120)}])[:100]
    for fixed, expected in ((None, [100]), (32, [32, 32, 32, 4])):
        sched = Scheduler(model, n_slots=1, n_ctx=160, prefill_chunk=fixed).start()
        try:
            assert sched.ready.wait(600)
            if fixed is None:
                sched.prefill_chunk = 32  # as measured on a slow machine
            calls.clear()
            _run(sched, [GenRequest(ids, 1, SamplingParams(temperature=0))])
            assert calls == expected
        finally:
            sched.stop()


def test_a_small_remainder_joins_the_chunk_before_it(model, monkeypatch):
    """Beside a decoding sequence a prompt goes in chunks; a remainder of at most an eighth of the chunk joins the
    chunk before it (a pass of its own would cost a pass's fixed part for a few tokens), a larger one gets its own
    pass; a chunk the caller fixed is never stretched."""
    calls = []
    forward_batch = model.arch.forward_batch
    monkeypatch.setattr(model.arch, "forward_batch", lambda w, cfg, tokens, positions, caches, prompt_rows=0:
                        calls.append(prompt_rows) or forward_batch(w, cfg, tokens, positions, caches, prompt_rows))
    long = model.chat_ids([{"role": "user", "content": " ".join(["seven"] * 60)}])
    first = model.chat_ids([{"role": "user", "content": "Hi"}])
    for fixed, n, expected in ((None, 36, [36]), (None, 37, [32, 5]), (32, 36, [32, 4])):
        sched = Scheduler(model, n_slots=2, n_ctx=160, prefill_chunk=fixed, prompt_reuse=False).start()
        try:
            assert sched.ready.wait(600)
            sched.prefill_chunk = 32  # as measured on a slow machine (or as fixed)
            calls.clear()
            # the first request's prompt goes alone (nobody decodes yet), then it decodes beside the second's chunks
            eog = np.array(sorted(model.tokenizer.eog_ids), np.int64)  # it decodes all 40: no end of turn
            _run(sched, [GenRequest(first, 40, SamplingParams(temperature=0),
                                    logit_bias=(eog, np.full(len(eog), -100, np.float32))),
                         GenRequest(long[:n], 1, SamplingParams(temperature=0))])
            assert [t for t in calls if t] == expected
        finally:
            sched.stop()


def test_on_step_hands_over_each_steps_events(model):
    """A consumer that only buffers on_event's events and takes them in on_step (the server wakes its event loop
    once a step, not once a token) sees every event at the end of the step that made it: one token of each
    decoding request per step, and the last Done before the next on_step."""
    log, finished = [], threading.Event()
    buffer = []

    def on_step():
        if buffer:
            log.append(list(buffer))
            buffer.clear()

    def on_event(i):
        def f(ev):
            buffer.append((i, ev))
            if isinstance(ev, Done) and sum(isinstance(e, Done) for _, e in buffer) + sum(
                    isinstance(e, Done) for step in log for _, e in step) == 3:
                finished.set()
        return f

    sched = Scheduler(model, n_slots=3, n_ctx=128, prefill_chunk=8, on_step=on_step).start()
    try:
        assert sched.ready.wait(600)
        for i, text in enumerate(("Hi", "Name a color.", "What is 1+1?")):
            sched.submit(GenRequest(model.chat_ids([{"role": "user", "content": text}]), 6,
                                    SamplingParams(temperature=0)), on_event(i))
        assert finished.wait(600)
    finally:
        sched.stop()  # hands over what is left, as after a step
    assert buffer == []
    for step in log:  # one token of a request per step (and, in the step that ends it, the text held back)
        ended = {i for i, ev in step if isinstance(ev, Done)}
        pieces = [i for i, ev in step if isinstance(ev, Piece)]
        assert all(pieces.count(i) <= (2 if i in ended else 1) for i in pieces), step
    assert max(len({i for i, ev in step if isinstance(ev, Piece)}) for step in log) > 1  # decoding together
    dones = [ev for step in log for _, ev in step if isinstance(ev, Done)]
    assert len(dones) == 3 and all(d.finish in ("stop", "length") for d in dones)


def test_packed_weights_change_no_token_and_can_be_off(model):
    """A server's batches read a copy of the 4-, 5- and 8-bit legacy matrices packed for the weight-row lanes
    (AVX-512: cpu_kernels/batch_dot.pack_rows16), made at warm-up; `packed_weights=False` (edgeq serve
    --no-packed-weights) keeps the file's bytes only: no copy, and the same greedy answers (the same products, bit
    for bit)."""
    from edgeq.cpu_kernels import batch_dot
    from edgeq.models.base import all_linears

    m = model
    prompts = [m.chat_ids([{"role": "user", "content": t}]) for t in ("Hi", "Name a color.", "What is 1+1?")]
    reqs = lambda: [GenRequest(ids, 8, SamplingParams(temperature=0)) for ids in prompts]
    packable = [lin.q for lin in all_linears(m.weights) if lin.q.qtype in batch_dot.PACKED_KERNELS]
    answers = {}
    for packed in (True, False, True):
        sched = Scheduler(m, n_slots=3, n_ctx=128, packed_weights=packed).start()
        try:
            assert sched.ready.wait(600)
            copies = [q for q in packable if q._packed is not None]
            assert len(copies) == (len(packable) if packed else 0)
            answers.setdefault(packed, []).append(_run(sched, reqs())[0])
        finally:
            sched.stop()
    assert answers[True][0] == answers[True][1] == answers[False][0]
