"""Unit tests of the pieces: direction generator, step balancing, error model."""

import functools
import math
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcheck
from cases import enable_x64, fresh_programs
from jaxcheck import (
    _autodiff,
    _check_grads,
    _differences,
    _directions,
    _error_model,
    _fingerprint,
    _plan,
)


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "rademacher"])
def test_directions_have_unit_variance_and_are_uncorrelated(kind):
    draw = jax.jit(lambda s, i: _directions.draw(s, i, (200, 50), kind))
    a, b = np.asarray(draw(np.uint32(7), 0)), np.asarray(draw(np.uint32(7), 1))
    # 10^4 samples: standard errors 0.01 (mean, correlation) and 0.014 (variance); 4 sigma
    assert abs(a.mean()) < 0.04 and abs(a.var() - 1) < 0.06
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.04
    assert abs(np.corrcoef(a.ravel()[:-1], a.ravel()[1:])[0, 1]) < 0.04
    if kind == "rademacher":
        assert set(np.unique(a)) == {-1.0, 1.0}
    elif kind == "uniform":  # 256 levels, evenly spaced over (-sqrt 3, sqrt 3)
        levels = np.arange(-255, 256, 2) * np.float32(np.sqrt(3.0) / 256)
        np.testing.assert_array_equal(np.unique(a), levels.astype(np.float32))
        assert 0.1 < np.mean(np.abs(a) < 0.2) < 0.13  # (0.2 / sqrt 3 = 0.115 of them)
    else:  # Gaussian tails: about 4.6 % beyond 2 sigma
        assert 0.04 < np.mean(np.abs(a) > 2) < 0.052


def test_gaussian_directions_are_finite_at_every_hash_value():
    """The extreme hashes give the extreme Gaussian values, finite and symmetric (the top
    one was Inf: a direction over a million parameters held one 6 % of the time)."""
    bits = jnp.asarray([0, 2**9 - 1, 2**9, 2**31, 2**32 - 2**9, 2**32 - 1], jnp.uint32)
    values = np.asarray(jax.jit(_directions.gaussians)(bits))
    assert np.isfinite(values).all(), values
    assert values[0] == -values[-1] and 5.0 < values[-1] < 5.5
    assert values[0] == values[1] and values[-1] == values[-2]  # (the low 9 bits unused)
    assert abs(values[3]) < 1e-6


@pytest.mark.parametrize("kind, dtype", [("rademacher", np.int8), ("uniform", np.int16)])
@pytest.mark.parametrize("shape", [(), (1,), (3,), (4, 5), (2, 3, 4)])
def test_signs_drawn_on_the_host_are_those_hashed_in_programs(shape, kind, dtype):
    """Small problems take their directions' signs (or "uniform" levels) as an input
    (`host_signs`), large ones hash them inside the program (`draw`): the same values,
    element for element and bit for bit, once `units` has scaled them in the program."""
    seeds = np.asarray([7, 2**32 - 1], np.uint32)
    index = np.asarray([0, 1, 5, 2**30 + 3, 2**31 - 1], np.int32)
    drawn = _directions.host_signs(seeds, index, [shape, (2,)], kind)
    assert [z.dtype for z in drawn] == [dtype, dtype]
    assert drawn[0].shape == (5, *shape) and drawn[1].shape == (5, 2)
    draw = jax.jit(lambda s, i, shape: _directions.draw(s, i, shape, kind), static_argnums=2)
    units = jax.jit(_directions.units)
    for leaf, (seed, leaf_shape) in enumerate(zip(seeds, [shape, (2,)])):
        for row, k in enumerate(index):
            expected = np.asarray(draw(seed, k, leaf_shape))
            np.testing.assert_array_equal(np.asarray(units(drawn[leaf][row])), expected)


@pytest.mark.parametrize(
    "options, size, on_host",
    [
        ({}, 5, True),
        ({"directions": "gaussian"}, 5, False),
        # (at most `_directions.SPANNED` elements are drawn on the host to span them, chunked
        # or not)
        ({"chunk_size": 1}, 5, True),
        ({"chunk_size": 1}, 40, False),
        ({}, 20000, False),  # above `_plan.SMALL_PROBLEM`: hashed in the program
    ],
)
def test_signs_are_drawn_on_the_host_only_for_small_unchunked_problems(
    monkeypatch, options, size, on_host
):
    import jaxcheck
    from jaxcheck import _state

    drawn = []
    original = _directions.host_signs
    monkeypatch.setattr(_directions, "host_signs", lambda *a: drawn.append(a[1]) or original(*a))
    # (an earlier check with the same key and shapes left its draws to reuse)
    monkeypatch.setattr(_state, "_DRAWN", type(_state._DRAWN)())
    report = jaxcheck.verify(lambda w: jnp.sum(jnp.sin(w) ** 2), jnp.ones(size), **options)
    assert report.status == "pass"
    assert bool(drawn) == on_host


def test_host_signs_are_drawn_once_for_checks_with_the_same_key(monkeypatch):
    import jaxcheck
    from jaxcheck import _state

    drawn = []
    original = _directions.host_signs
    monkeypatch.setattr(_directions, "host_signs", lambda *a: drawn.append(a[1]) or original(*a))
    monkeypatch.setattr(_state, "_DRAWN", type(_state._DRAWN)())
    checker = jaxcheck.Checker(lambda w: jnp.sum(jnp.sin(w) ** 2), key=3)
    assert checker(jnp.ones(5)).ok
    first = len(drawn)
    assert first > 0
    assert checker(jnp.linspace(0.1, 0.9, 5)).ok  # same key and shapes: nothing drawn
    assert len(drawn) == first
    kept = next(iter(_state._DRAWN.values()))[0][0]
    assert not kept.flags.writeable
    assert jaxcheck.verify(lambda w: jnp.sum(jnp.sin(w) ** 2), jnp.ones(5), key=4).ok
    assert len(drawn) > first  # another key: its own signs


def test_seeds_depend_on_key_and_path_only():
    key = jax.random.key(0)
    s1 = _directions.seeds(key, "params", ["['a']", "['b']"])
    s2 = _directions.seeds(key, "params", ["['z']", "['b']", "['a']"])
    assert s1[0] == s2[2] and s1[1] == s2[1]
    assert _directions.seeds(jax.random.key(1), "params", ["['a']"])[0] != s1[0]
    assert _directions.seeds(key, "outputs", ["['a']"])[0] != s1[0]


def test_balance_equalizes_contributions_within_range():
    scales = np.array([1.0, 1.0, 1.0])
    beta, share = _directions.balance(scales, np.array([1e3, 1.0, 1e-9]), 1e-4)
    c = beta * np.array([1e3, 1.0, 1e-9])
    assert c[0] == pytest.approx(c[1])  # the dominant leaf was brought down
    assert beta[2] == 1.0  # a weak leaf is never perturbed more than its natural step
    assert share.sum() == pytest.approx(1.0)
    # a roundoff requirement stops the balancing early
    beta2, _ = _directions.balance(scales, np.array([1e3, 1.0, 1e-9]), 1e-4, min_total=100.0)
    assert np.sqrt(np.sum((beta2 * np.array([1e3, 1.0, 1e-9])) ** 2)) >= 100.0 * (1 - 1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_level_for_total_reaches_the_target_exactly(seed):
    rng = np.random.default_rng(seed)
    c = np.sort(10.0 ** rng.uniform(-6, 3, size=rng.integers(1, 12)))
    total = lambda level: np.sqrt(np.sum(np.minimum(c, level) ** 2))  # noqa: E731
    target = total(c[-1]) * rng.uniform(0.01, 0.99)
    level = _directions._level_for_total(c, target)
    assert total(level) == pytest.approx(target, rel=1e-12)  # increasing: so the smallest
    assert _directions._level_for_total(c, 2 * total(c[-1])) == c[-1]


def test_richardson_is_exact_for_quartics():
    h = 0.1
    poly = lambda t: 1 + 2 * t - 3 * t**2 + 0.5 * t**3 + 4 * t**4  # noqa: E731
    phis = np.array([[poly(t * h) for t in _differences.OFFSETS]])
    c = _differences.combine(phis, np.array([poly(0.0)]), h)
    assert c["richardson"][0] == pytest.approx(2.0, abs=1e-12)
    # the fourth difference isolates the quartic term: 4 * 4! * (h/2)^4
    assert c["d4"][0] == pytest.approx(4 * 24 * (h / 2) ** 4, rel=1e-9)


def test_assess_flags_kinks_but_not_noise():
    rng = np.random.default_rng(0)
    h, n = 1e-3, 16
    t = np.asarray(_differences.OFFSETS) * h
    slopes = rng.normal(size=n)
    noise = 1e-12
    phis = slopes[:, None] * t[None, :] + noise * rng.normal(size=(n, 4))
    phis[:3] += 5.0 * np.abs(t)[None, :]  # three directions cross |t| at 0
    fd = _error_model.assess(phis, np.zeros(n), h, eps=1e-16, floor=1e-6)
    assert list(np.flatnonzero(~fd.smooth)) == [0, 1, 2]
    assert fd.noise == pytest.approx(noise, rel=1.0)
    np.testing.assert_allclose(fd.value[3:], slopes[3:], atol=1e-8)


def test_interval_covers_the_truth_at_the_stated_rate():
    """Gaussian projections of a fixed error: the 95 % interval covers its size ~95 % of runs."""
    rng = np.random.default_rng(1)
    n, d, truth, hits = 16, 200, 0.3, 0
    g = rng.normal(size=d)
    e = rng.normal(size=d)
    e *= truth * np.linalg.norm(g) / np.linalg.norm(e)
    for _ in range(400):
        v = rng.normal(size=(n, d))
        err = np.sqrt(np.sum((v @ e) ** 2) / np.sum((v @ g) ** 2))
        lo, hi = _error_model.interval(err, n)
        hits += lo <= truth <= hi
    assert 0.92 <= hits / 400 <= 0.99


def _unit_differences(n: int, bar: float):
    """Finite differences of value 1 along n smooth directions, each with error bar `bar`."""
    return _error_model.Differences(
        value=np.ones(n),
        bar=np.full(n, bar),
        finite=np.ones(n, bool),
        smooth=np.ones(n, bool),
        slopes=(np.ones(n), np.ones(n)),
        d4=np.zeros(n),
        noise=0.0,
        relative_noise=0.0,
        truncation=0.0,
        roundoff=0.0,
        h=1e-5,
    )


def test_comparison_tolerance_follows_measured_rounding():
    n = 16
    fd = _unit_differences(n, 1e-10)
    a = np.ones(n) + 1e-4 * np.resize([1.0, -1.0], n)
    c = _error_model.compare("x", fd, a, floor=1e-6, a_ref=np.ones(n))
    assert c.rounding == pytest.approx(1e-4) and c.passed
    c2 = _error_model.compare("x", fd, a, floor=1e-6)
    assert not c2.passed and c2.relative_error == pytest.approx(1e-4)


@pytest.mark.parametrize("bar", [1e-10, 3e-4])
def test_the_lower_end_of_the_interval_is_lowered_by_the_noise_floor(bar):
    """An error measured within finite-difference noise may be as small as 0: a float64
    loss near 1e10 whose gradient was 3e-8 off measured 6.9e-5 at a noise floor of 2.9e-4
    and said "95% 4.2e-05..1.1e-04"."""
    n = 16
    fd = _unit_differences(n, bar)
    a = np.ones(n) + 1e-4 * np.resize([1.0, -1.0], n)
    c = _error_model.compare("x", fd, a, floor=1e-6)
    assert c.relative_error == pytest.approx(1e-4) and c.noise_floor == pytest.approx(bar)
    low, high = _error_model.interval(1e-4, n)
    assert c.interval[1] == pytest.approx(high)
    assert c.interval[0] == (pytest.approx(low) if bar < low else 0.0)
    # a failing error's lower end stands: beyond twice the noise floor, which bounds the
    # differences' error from above (subtracting it said "0" for a 5 % error measured)
    wrong = 3 * max(bar, 1e-6)
    c = _error_model.compare("x", fd, np.ones(n) + wrong * np.resize([1.0, -1.0], n), 1e-6)
    assert not c.passed and c.interval[0] == pytest.approx(_error_model.interval(wrong, n)[0])


def test_scales_from_sums_of_squares_survive_overflow_and_tell_nan_apart():
    leaves = [
        jnp.zeros(3),
        jnp.full(2, 2.0),
        jnp.full(4, 1e30, jnp.float32),
        jnp.array([1.0, jnp.nan]),
    ]
    squares = np.asarray(jax.jit(_directions.sum_squares)(leaves))
    assert np.isinf(squares[2])  # 4e60 overflows float32
    values, finite = _directions.host_rms(squares, leaves)
    np.testing.assert_allclose(values[:3], [0.0, 2.0, 1e30], rtol=1e-6)
    assert finite.tolist() == [True, True, True, False]
    scales = _directions.with_floor(values[:2], [3, 2])
    np.testing.assert_allclose(scales, [math.sqrt(8 / 5), 2.0])  # zero leaf: pooled RMS


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_default_chunk_on_accelerators_bounds_memory_of_perturbed_copies(platform):
    from jaxcheck import _plan

    chunk = functools.partial(_plan.default_chunk, platform=platform, budget=1 << 30)
    assert chunk(1_000_000, 16, 2) is None  # 16 x 2 x 8 MB fit in 1 GiB: all vmapped
    assert chunk(10_000_000, 16, 2) == 6 and 6 * 2 * 10_000_000 * 8 <= 1 << 30
    assert chunk(10**9, 16, 2) == 1
    assert chunk(10_000_000, 16, 2, 4) == 13  # float32 copies: twice as many


def test_default_chunk_on_cpu_is_sequential():
    from jaxcheck import _plan

    assert _plan.default_chunk(100, 16, 2) == 1
    assert _plan.default_chunk(10**7, 16, 2, budget=1) == 1


def on_cpu(x):
    return jax.device_put(x, jax.devices("cpu")[0])


def test_plan_follows_the_parameters_device_and_caller():
    from jaxcheck import _plan

    leaves = [on_cpu(jnp.ones((1000, 20))), on_cpu(jnp.ones(3))]  # not small
    kw = {"chunk_size": None, "budget": None, "direction_sharding": None}
    plan = _plan.make_plan(leaves, 16, 2, 8, **kw)
    assert plan == _plan.Plan(1, False, (None, None), None)
    assert _plan.make_plan(leaves, 16, 2, 8, **(kw | {"chunk_size": 5})).chunk == 5


def test_memory_budget_is_a_share_of_free_accelerator_memory():
    from jaxcheck import _plan

    stats = {"bytes_limit": 8 << 30, "bytes_in_use": 4 << 30}
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: stats)
    assert _plan.memory_budget(gpu) == 1 << 30  # a quarter of the 4 GiB free
    silent = types.SimpleNamespace(platform="tpu", memory_stats=lambda: None)
    assert _plan.memory_budget(silent) == _plan.CPU_MEMORY_BUDGET
    assert _plan.memory_budget(jax.devices("cpu")[0]) == _plan.CPU_MEMORY_BUDGET


def test_small_problems_are_vmapped_whole_on_cpu():
    from jaxcheck import _plan

    kw = {"chunk_size": None, "budget": None, "direction_sharding": None}
    x = on_cpu(jnp.ones((4, 5)))
    assert _plan.make_plan([x], 16, 2, 8, **kw) == _plan.Plan(None, True, (None,))
    # held-fixed inputs count too: 20 + 20000 elements, 32 points each, is no longer small
    assert (20 + 20000) * 32 > _plan.SMALL_PROBLEM >= (20 + 16000) * 32
    assert _plan.make_plan([x], 16, 2, 8, other_elements=16000, **kw).chunk is None
    big = _plan.make_plan([x], 16, 2, 8, other_elements=20000, **kw)
    assert big == _plan.Plan(1, False, (None,))


def test_unknown_compile_options_are_dropped(monkeypatch):
    import jaxcheck
    from jaxcheck import _plan

    monkeypatch.setattr(_plan, "FAST_COMPILE_OPTIONS", {"xla_no_such_option_for_jaxcheck": 1})
    p = on_cpu(jnp.linspace(0.1, 0.9, 3))  # the options are CPU's
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.cos(p) * p), p)
    assert report.status == "pass" and report.num_compiled >= 2
    assert _plan.FAST_COMPILE_OPTIONS is None


@pytest.mark.parametrize(
    "share, floor, upper, chosen",
    [
        ([0.999, 0.001], None, 1e-7, [0, 1]),  # 0.1 % in either is under the tolerance 0.01
        ([0.999999, 1e-6], None, 1e-7, [0, 1]),
        ([1.0], None, 1e-7, []),  # one leaf: the all-leaf check was its own check
        ([1.0], 0.2, 0.1, []),
        ([0.999, 0.001], 1e-4, 1e-7, [0, 1]),
        # a loose floor: a floor-sized error in a leaf adds floor * sqrt(share) to the
        # all-leaf error, which the measured error's upper bound may rule out
        ([0.999, 0.001], 1e-3, 1e-7, []),
        ([0.999, 0.001], 1e-3, 1e-4, [1]),
        ([0.875, 0.125], 0.2, 0.2, [0, 1]),
        ([0.875, 0.125], 0.2, 0.11, [1]),
        ([0.875, 0.125], 0.2, 0.05, []),
        ([0.0, 0.0], 0.01, 0.0, []),  # a derivative and its error exactly zero
    ],
)
def test_leaves_checked_alone_after_a_pass(share, floor, upper, chosen):
    from jaxcheck import _localize
    from jaxcheck._report import Status

    got = _localize.chosen_leaves("auto", Status.PASS, share, 0.01, len(share), floor, upper)
    assert got == chosen
    assert _localize.chosen_leaves("auto", Status.FAIL, share, 0.01, len(share), floor) == list(
        range(len(share))
    )
    assert _localize.chosen_leaves(False, Status.FAIL, share, 0.01, len(share), floor) == []


def test_one_off_checks_compile_small_programs_for_compile_time(monkeypatch):
    """verify compiles CPU programs of few operations with XLA's fast-compile options even
    where their inputs are over FAST_COMPILE_BYTES; a Checker, which runs them again and
    again, compiles them for speed."""
    if jax.default_backend() != "cpu" or _plan.FAST_COMPILE_OPTIONS is None:
        pytest.skip("XLA:CPU's options")
    _plan._compiler().submit(lambda: None).result()  # compiles other tests started: done
    seen = []
    original = jax.stages.Lowered.compile

    def spy(self, compiler_options=None, **kwargs):
        seen.append(compiler_options)
        return original(self, compiler_options=compiler_options, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    w = jnp.full((80, 64), 0.01, jnp.float32)  # 20 KiB: over the bytes rule
    x = jnp.linspace(-1.0, 1.0, 4 * 80).reshape(4, 80)
    assert np.size(w) * 4 > _plan.FAST_COMPILE_BYTES
    report = jaxcheck.verify(lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2), w, x)
    assert report.ok and report.num_compiled == len(seen) >= 2
    assert all(options == _plan.FAST_COMPILE_OPTIONS for options in seen), seen
    seen.clear()
    checker = jaxcheck.Checker(lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2))
    assert checker(w, x).ok and checker.compilations == len(seen) >= 2
    assert all(options is None for options in seen), seen
    lowered = jax.jit(lambda w, x: jnp.tanh(x @ w)).lower(w, x)
    assert 2 * 4 * 80 * 64 <= _plan._operations(lowered) < _plan.FAST_COMPILE_FLOPS


@pytest.mark.parametrize("order", [1, 2])
def test_the_first_finite_difference_program_compiles_while_the_probe_does(monkeypatch, order):
    """A cold check lowers its finite-difference program while XLA compiles the probe's
    program in a background thread, and compiles it there too: nothing is compiled twice
    or for nothing, and the report is that of programs compiled one after the other."""
    _plan._compiler().submit(lambda: None).result()  # compiles other tests started: done
    threads = []
    original = jax.stages.Lowered.compile

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    fresh_programs(monkeypatch)  # (the other order's check made the same function)
    w = jnp.linspace(-1.0, 1.0, 8)  # (7: an entry at 1.5e-8, a packed leaf checked twice)

    def check():  # a function no other check has compiled
        return jaxcheck.verify(lambda w: jnp.sum(jnp.tanh(w * 1.25) ** 3), w, order=order)

    report = check()
    assert report.ok, str(report)
    assert report.num_compiled == len(threads) == 2 * order, threads
    assert all(name.startswith("jaxcheck-compile") for name in threads), threads
    threads.clear()
    monkeypatch.setattr(_plan, "AHEAD", False)
    # (the same lambda made anew would reuse the programs compiled for the first)
    fresh_programs(monkeypatch)
    alone = check()
    assert threads == ["MainThread"] * 2 * order
    assert alone.num_compiled == report.num_compiled
    assert alone.relative_error == report.relative_error
    assert alone.num_evaluations == report.num_evaluations


def test_a_program_lowered_ahead_for_nothing_changes_nothing(monkeypatch):
    """A guess that misses (the programs lowered ahead for a fn that then fails in float64,
    or for shapes never called) is dropped: the check goes on as without it."""
    monkeypatch.setattr(_plan, "_PENDING", {})  # (guesses other tests left unused)
    guesses = []
    original = _plan.lower_ahead
    monkeypatch.setattr(_plan, "lower_ahead", lambda *a: guesses.append(original(*a)))
    w = jnp.linspace(-1.0, 1.0, 5)

    def float32_only(w):
        if w.dtype != jnp.float32:
            raise TypeError(f"float32 only, got {w.dtype}")
        return jnp.sum(jnp.sin(w) ** 2)

    report = jaxcheck.verify(float32_only, w)
    assert report.ok and report.reference_dtype == "float32", str(report)
    assert guesses == [None]
    assert not _plan._PENDING  # nothing lowered: nothing left compiling
    for n in range(_plan.PENDING_KEPT + 2):  # never asked for: the oldest dropped
        _plan.lower_ahead(functools.partial(jnp.multiply, 2.0 + n), (w,))
    assert len(_plan._PENDING) == _plan.PENDING_KEPT


@pytest.mark.parametrize("shapes", [[()], [(2,)], [(3,), ()], [(2, 4)], [(3, 4)], [(2, 2), (3, 4)]])
def test_spanning_signs_make_every_block_orthogonal(shapes):
    n = sum(int(np.prod(s)) for s in shapes)
    m = 8 if n <= 8 else 16
    seeds = np.arange(11, 11 + len(shapes), dtype=np.uint32)
    signs = _directions.spanning_signs(seeds, np.arange(3 * m), shapes)
    v = np.concatenate([z.reshape(3 * m, -1) for z in signs], axis=1).astype(np.float64)
    assert set(np.unique(v)) == {-1.0, 1.0}
    for block in range(3):
        rows = v[block * m : (block + 1) * m]
        np.testing.assert_array_equal(rows.T @ rows, m * np.eye(n))
    assert not np.array_equal(v[:m], v[m : 2 * m])  # each block draws anew
    # a direction is the same whichever others are drawn with it
    some = _directions.spanning_signs(seeds, np.array([2**30 + 5, 4, 2**31 - 1]), shapes)
    np.testing.assert_array_equal(np.concatenate([z.reshape(3, -1) for z in some], 1)[1], v[4])


def test_numpy_inputs_are_converted_on_the_host(caplog):
    """A float64 NumPy argument with 64-bit types off is float32 on the device: converted
    there, it compiled a program per new shape (a test suite's every check)."""
    assert not jax.config.jax_enable_x64

    def fn(p, x):
        return jnp.sum(jnp.sin(p * x) ** 2)

    jaxcheck.verify(lambda p: jnp.sum(p**2), jnp.ones(2))  # the key, once per process
    p = jnp.linspace(0.1, 1.0, 17)
    with caplog.at_level("WARNING", logger="jax"), jax.log_compiles():
        report = jaxcheck.verify(fn, p, np.linspace(0.3, 1.0, 17))
    assert report.ok, str(report)
    messages = [r.getMessage() for r in caplog.records]
    compiled = [m.split()[4] for m in messages if m.startswith("Finished XLA compilation")]
    assert compiled and set(compiled) <= {"jit(probe_folded)", "jit(probe)", "jit(reference)"}, (
        compiled
    )


# -- what older JAX raises and wraps differently ---------------------------------------------


def bilinear_transpose(x, y):  # named as jax 0.9's rule that asserts on a nonlinear jvp
    if x is not None:
        raise AssertionError  # (a bare assert, as in JAX's module, which pytest leaves alone)


def _asserts():
    raise AssertionError  # a bare assertion outside any transpose rule


def _raised(f, *args):
    try:
        f(*args)
    except AssertionError as err:
        return err
    raise AssertionError("did not raise")


def test_a_bare_assertion_in_a_transpose_rule_is_taken_for_one():
    """jax 0.9 and older assert without a message where a jvp is not linear in its
    tangents; where their frames are filtered out, a second trace with filtering off
    finds them."""
    from jaxcheck import _rule_rows

    assert _rule_rows.untransposed(_raised(bilinear_transpose, 1, 2))
    elsewhere = _raised(_asserts)
    assert not _rule_rows.untransposed(elsewhere)
    filtered = AssertionError()  # as jax.jit's boundary leaves it: no frames, no message
    assert not _rule_rows.untransposed(filtered)
    assert _rule_rows.untransposed_when_traced(filtered, lambda: bilinear_transpose(1, 2))
    assert _rule_rows.untransposed(filtered)  # marked from then on
    other = AssertionError()
    assert not _rule_rows.untransposed_when_traced(other, lambda: None)
    assert not _rule_rows.untransposed_when_traced(AssertionError("x"), bilinear_transpose)


def test_a_constant_jax_wraps_in_an_array_like_of_its_own_is_keyed_by_content():
    """jax 0.7 gives a closed-over NumPy array to make_jaxpr's consts as a LiteralArray,
    a new object per trace and no ndarray: keyed by identity, every check compiled anew."""
    from jaxcheck import _tree

    class LiteralArray:
        def __init__(self, val):
            self.val = val

        def __array__(self, dtype=None, copy=None):
            return np.asarray(self.val, dtype)

    LiteralArray.__module__ = "jax._src.literals"
    table = np.ones(70_000, np.float32)
    assert _tree.digest(LiteralArray(table)) == _tree.digest(LiteralArray(table))
    assert _tree.digest(LiteralArray(table)) == _tree.digest(table)
    table[1] = 2.0
    assert _tree.digest(LiteralArray(table)) != _tree.digest(LiteralArray(np.ones(70_000)))


@pytest.mark.parametrize(
    "values, packed",
    [
        ([1e4, 0.05, 1.0], True),  # a rate, a damping, a mass
        ([1e13, 8e4, 0.5, 0.0], True),  # zeros do not count
        ([3.0, -2.0, 0.01], False),  # a spread of 300
        ([5.0, 0.0, 0.0], False),  # one nonzero entry
        ([1.0, float("nan"), 1e-6], False),
        (list(np.linspace(1e-5, 1.0, 65)), False),  # more than PACKED_SIZE entries
    ],
)
def test_packed_leaves_are_small_and_span_orders_of_magnitude(values, packed):
    leaf = jnp.asarray(values, jnp.float32)
    assert _directions.packed_leaves([leaf, jnp.ones(3)]) == (packed, False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_entry_scales_are_exact_in_every_precision(dtype):
    """The native and the reference programs must draw the same directions: the scales are
    |x| times a power of two, the smallest nonzero |x| at zeros; NumPy (the host's
    balancing) agrees bit for bit."""
    x = jnp.asarray([1e4, -0.05, 1.0, 0.0], dtype)
    with enable_x64():
        wide = _directions.entry_scales(x.astype(jnp.float64))
    own = _directions.entry_scales(x)
    host = _directions.entry_scales(np.asarray(x, np.float64))
    expected = np.abs(np.asarray(x, np.float64)) / 16384.0
    expected[3] = expected[1]
    np.testing.assert_array_equal(np.asarray(own, np.float64), expected)
    np.testing.assert_array_equal(np.asarray(wide), expected)
    np.testing.assert_array_equal(host, expected)


@pytest.mark.parametrize("size", [1e200, 1e-200])
def test_rms_of_values_whose_squares_leave_float64s_range(size):
    """Finite differences of a fn near 1e200 squared to Inf: every relative error became
    NaN, and the check failed with "—" for each."""
    expected = pytest.approx(size / math.sqrt(2), rel=1e-12, abs=0)
    assert _error_model.rms(np.asarray([size, -size, 0.0, 0.0])) == expected


def test_the_error_model_takes_infinite_values_without_numpy_warnings():
    """Inf - Inf in the stencil raised NumPy's RuntimeWarning, an error in a test suite that
    turns warnings into errors (as this one does); such a direction is non-finite."""
    phis = np.asarray(
        [[1.0, 2.0, 3.0, 4.0], [np.inf, 2.0, 3.0, np.inf], [1e308, -1e308, 1e308, -1e308]]
    )
    fd = _error_model.assess(phis, np.asarray([2.5, 2.5, 0.0]), 0.1, 2.2e-16, 1e-6)
    assert list(fd.finite) == [True, False, True]
    comparison = _error_model.compare("c", fd, np.asarray([10.0, 1.0, 0.0]), 1e-6)
    assert comparison.num_used >= 1


def test_host_rms_of_a_float64_leaf_too_large_to_square():
    """A float64 leaf at 1e160 sums its squares to Inf; its RMS fell back as if unknown, and
    the check of log|t| at [1e160, 2e160] was left unjudged."""
    with enable_x64():
        leaf = jnp.asarray([1e160, -1e160, 0.0, 0.0])
        values, finite = _directions.host_rms(np.asarray([np.inf]), [leaf])
    assert finite.tolist() == [True]
    assert values[0] == pytest.approx(1e160 / math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("with_rule", [False, True])
def test_derivative_maps_have_rules_only_where_their_code_calls_one(with_rule):
    """The order-2 maps hold their fixed tangent with a custom_jvp of jaxcheck's own
    (`_orders._held`): that is no rule of fn's, and a map counted as calling one had its
    primal compared with itself in every program (two more traces of the map a check).
    A rule of fn's is replaced by its derivative code in the map; a rule that code calls
    (here the cosine in the sine's jvp rule) is the map's own."""
    from jaxcheck import _orders, _rule_search

    cos = jax.custom_jvp(jnp.cos)
    cos.defjvp(lambda p, t: (jnp.cos(p[0]), -jnp.sin(p[0]) * t[0]))
    sin = jax.custom_jvp(jnp.sin)
    sin.defjvp(lambda p, t: (jnp.sin(p[0]), (cos if with_rule else jnp.cos)(p[0]) * t[0]))
    inner = lambda p: sin(p) * 2.0  # noqa: E731
    pair = _orders.PairMap(_orders.JvpMap(inner), _orders.VjpMap(inner))
    x = jnp.arange(3.0, dtype=jnp.float32)
    fixed = (([jnp.ones(3)], [jnp.ones(3)]), ([jnp.ones(3)], [jnp.ones(3)]))
    jaxpr = jax.make_jaxpr(lambda p: pair(p, fixed))(x)
    assert "_held" in str(jaxpr)
    assert _rule_search.calls(jaxpr.jaxpr, "custom_vjp", "custom_jvp") is with_rule


@pytest.mark.parametrize("rule", [False, True])
def test_a_scalar_fn_is_traced_once_for_its_value_and_gradient(monkeypatch, rule):
    # at many small leaves a trace of fn costs about as much as compiling it: the probe
    # traces fn once for value and gradient, the reference once more for its points; a fn
    # with a custom rule is traced for its own value beside the rule's primal
    calls, phase = [], []
    for module, name in [(_autodiff, "_probe"), (_differences, "_reference")]:
        inner = getattr(module, name)

        def counted(*args, _inner=inner, _name=name):
            phase.append(_name)
            try:
                return _inner(*args)
            finally:
                phase.pop()

        monkeypatch.setattr(module, name, counted)
    square = jax.custom_jvp(jnp.square)
    square.defjvp(lambda p, t: (jnp.square(p[0]), 2 * p[0] * t[0]))

    def fn(params, x):
        calls.extend(phase)
        return jnp.sum((square if rule else jnp.square)(params["w"] * x + 0.25))

    report = jaxcheck.verify(fn, {"w": jnp.arange(1.0, 4.0)}, jnp.linspace(0.5, 1.0, 3))
    assert report.ok
    extra = 1 if rule else 0
    assert calls.count("_probe") == 1 + extra
    assert calls.count("_reference") == 2 + extra


def test_a_fingerprint_traces_the_vjp_only_where_fn_calls_a_custom_rule():
    """The key of a check's programs: fn's own jaxpr where it calls no custom rule but
    JAX's own (its derivatives follow from it; the vjp cost several times as much to
    trace), the vjp's where it does (a rule's bwd shows there alone: one scaled by 1.01 is
    another key)."""
    x = jnp.linspace(0.1, 0.9, 3)

    def plain(p):
        return jnp.sum(jnp.sin(p) ** 2)

    def with_rule(scale):
        @jax.custom_vjp
        def f(p):
            return jnp.sin(p)

        f.defvjp(lambda p: (jnp.sin(p), p), lambda p, g: (scale * jnp.cos(p) * g,))
        return lambda p: jnp.sum(f(p) ** 2)

    own = str(jax.make_jaxpr(plain)(x).jaxpr)
    assert _fingerprint.of(plain, x)[0] == own
    # JAX's own rules (jax.nn.relu's custom_jvp) are fixed by JAX: fn's own jaxpr still
    with_relu = lambda p: jnp.sum(jax.nn.relu(p) ** 2)  # noqa: E731
    assert _fingerprint.of(with_relu, x)[0] == str(jax.make_jaxpr(with_relu)(x).jaxpr)
    # (fn's own jaxpr, then its vjp's, traced at a cotangent it takes as an input)
    right, wrong = (_fingerprint.of(with_rule(s), x)[1][0] for s in (1.0, 1.01))
    assert "cos" in right and right != wrong
    # the user's rule inside a checkpointed or a jitted function
    for wrap in (jax.checkpoint, jax.jit):
        inner, other = (_fingerprint.of(wrap(with_rule(s)), x) for s in (1.0, 1.01))
        assert inner != other
    # fn's own jaxpr does not tell the two rules apart
    assert str(jax.make_jaxpr(with_rule(1.0))(x).jaxpr) == str(
        jax.make_jaxpr(with_rule(1.01))(x).jaxpr
    )


@pytest.mark.parametrize(
    ("f", "searched"),
    [(lambda x: jnp.sum(jnp.sin(x) * x), False), (lambda x: jnp.sum(jax.nn.relu(x) * x), True)],
    ids=["smooth", "relu"],
)
def test_a_small_failing_check_looks_for_kinks_only_where_fn_can_have_them(
    monkeypatch, f, searched
):
    """A failure of at most 16 elements is checked for kinks directions of signs cannot
    show, each entry moved alone (a compile of its own): not where fn's primitives are all
    smooth."""
    calls = []
    one_sided = _check_grads._one_sided
    monkeypatch.setattr(
        _check_grads, "_one_sided", lambda *a, **k: calls.append(1) or one_sided(*a, **k)
    )
    x = jnp.linspace(0.1, 1.0, 8)
    report = jaxcheck.verify(f, x, grad_fn=lambda x: jax.grad(f)(x) * 1.01)
    assert report.status == "fail", str(report)
    assert bool(calls) is searched


def test_the_kink_search_keeps_a_cond_with_a_loop_a_cond():
    """The kink search evaluated fn's moved points under jax.vmap, which turns a cond whose
    predicate it batches into a select running both branches: a while_loop in the branch
    not taken, ending only on that branch's inputs, never ended (a failing check of such
    a fn hung in the kink search). Those points are now mapped one at a time."""
    from jaxcheck import _check_grads  # noqa: PLC0415

    def f(s):
        def climb(s):  # ends only for s > 0, the other branch's inputs
            return jax.lax.while_loop(lambda c: c < 0, lambda c: c - 1.0, s[0])

        return jax.lax.cond(s[0] > 0, climb, lambda s: s[0] ** 3, s)

    batch = (jnp.full((4, 1), -0.45),)
    mapped = jax.make_jaxpr(_check_grads._batched(f, batch))(*batch)
    assert "cond[" in str(mapped) and "select_n" not in str(mapped)
    plain = jax.make_jaxpr(_check_grads._batched(jnp.sin, batch))(*batch)
    assert "scan[" not in str(plain)  # (vmapped where nothing changes under vmap)


def test_check_grads_names_its_args_where_devices_differ():
    """check_grads passes its args to verify as params: the refusal of arrays on
    different devices read "params and args ... (params[0] on cpu:0; params[1] on
    cpu:1)" for arguments the user passed as args."""
    said = _check_grads._in_check_grads_terms(
        "params and args hold arrays committed to different devices (params[0] on cpu:0; "
        "params[1] on cpu:1). jax.jit, and so the check, needs every array on the same devices"
    )
    assert said.startswith(
        "args hold arrays committed to different devices (args[0] on cpu:0; args[1] on cpu:1)."
    ), said
