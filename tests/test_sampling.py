import numpy as np
import pytest

from edgeq.runtime.engine import split_stop
from edgeq.errors import EdgeqError
from edgeq.runtime.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1], np.float32)
    assert Sampler(SamplingParams(temperature=0))(logits) == 1


def test_same_seed_same_draws():
    logits = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    a = [Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=7))(logits) for _ in range(1)]
    s1 = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=7))
    s2 = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=7))
    assert [s1(logits) for _ in range(50)] == [s2(logits) for _ in range(50)]
    assert a[0] == Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=7))(logits)


def test_top_k_limits_candidates():
    logits = np.arange(100, dtype=np.float32)
    s = Sampler(SamplingParams(temperature=5.0, top_k=3, top_p=1.0, min_p=0, seed=0))
    assert {s(logits) for _ in range(300)} <= {97, 98, 99}


def test_top_p_and_min_p_cut_the_tail():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0, seed=0))
    assert {s(logits) for _ in range(300)} == {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=0))
    assert {s(logits) for _ in range(300)} == {0, 1, 2}


def test_repeat_penalty_discourages_history():
    logits = np.array([2.0, 1.9, 0.0], np.float32)
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5))
    assert s(logits, history=[0]) == 1


def test_bad_params_rejected():
    with pytest.raises(EdgeqError):
        Sampler(SamplingParams(top_p=0))
    with pytest.raises(EdgeqError):
        Sampler(SamplingParams(temperature=-1))


def test_split_stop_holds_back_partial_matches():
    assert split_stop("hello wor", ["world"]) == ("hello ", "wor", False)
    assert split_stop("hello world!", ["world"]) == ("hello ", "", True)
    assert split_stop("abc", []) == ("abc", "", False)


def test_top_k_prefilter_equals_full_sort():
    """The max-pooled top-k prefilter (large vocabularies) keeps exactly the k largest values, ties included."""
    from edgeq.runtime.sampling import _top_k_indices

    rng = np.random.default_rng(3)
    for n, k in [(262144, 40), (49152, 40), (262144, 1), (65536, 100), (1000, 5)]:
        for _ in range(5):
            x = (rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(np.float32)
            if rng.random() < 0.5:
                x = np.round(x)  # many ties
            got = _top_k_indices(x, k)
            assert len(got) == k and len(set(got.tolist())) == k
            assert np.array_equal(np.sort(x[got]), np.sort(x)[-k:])


def test_sampling_kernel_draws_what_its_numpy_twin_draws():
    """cpu_kernels/ops.sample_top_k (the Sampler's path for top_k <= FAST_TOP_K) against Sampler.numpy_draw: the
    same seed gives the same tokens, on the pooled prefilter's vocabularies (n % 64 == 0, large) and the plain
    scan's (n odd, or small)."""
    rng = np.random.default_rng(5)
    for trial in range(120):
        n = [49152, 1000, 32001, 262144][trial % 4]
        logits = (rng.standard_normal(n) * rng.uniform(0.5, 4)).astype(np.float32)
        params = dict(temperature=float(rng.choice([0.3, 0.7, 1.5])), top_k=int(rng.choice([1, 5, 40, 256])),
                      top_p=float(rng.choice([1.0, 0.95, 0.5])), min_p=float(rng.choice([0.0, 0.05, 0.2])),
                      seed=trial)
        fast, twin = Sampler(SamplingParams(**params)), Sampler(SamplingParams(**params))
        got = [fast(logits) for _ in range(10)]
        assert got == [twin.numpy_draw(logits) for _ in range(10)], params


def test_sampling_kernel_ties_masks_and_non_finite_logits():
    from edgeq.cpu_kernels.ops import sample_top_k

    logits = np.full(64 * 8 * 4, -np.inf, np.float32)  # a grammar's mask: three tokens allowed
    logits[[7, 300, 1500]] = [1.0, 3.0, 2.0]
    # the top 2 of the allowed at weights 1 : e^-1, so cumulative 0.73, 1: the second only for u >= 0.73
    assert sample_top_k(logits, 2, 1.0, 0.0, 1.0, 0.99) == 1500
    assert sample_top_k(logits, 2, 1.0, 0.0, 1.0, 0.5) == 300
    assert sample_top_k(logits, 1, 1.0, 0.0, 1.0, 0.99) == 300
    tied = np.zeros(4096, np.float32)
    assert sample_top_k(tied, 3, 1.0, 0.0, 1.0, 0.0) == 0  # equal logits: the lowest index first
    assert sample_top_k(tied, 3, 1.0, 0.0, 1.0, 0.99) == 2
    for bad in (np.nan, np.inf):
        x = np.zeros(4096, np.float32)
        x[9] = bad
        x[10] = 1.0
        # a NaN is never kept past the first k; a NaN among them or an infinite best: -1, the numpy path decides
        assert sample_top_k(x, 5, 1.0, 0.0, 1.0, 0.1) == (-1 if bad == np.inf else 10)
        assert sample_top_k(x[9:], 5, 1.0, 0.0, 1.0, 0.1) == -1
    assert sample_top_k(np.full(4096, np.nan, np.float32), 5, 1.0, 0.0, 1.0, 0.5) == -1
