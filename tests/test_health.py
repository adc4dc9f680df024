"""gradient_health: the optax transformation under jit, its flags, and the summary."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcheck
from cases import enable_x64

PARAMS = {"dead": jnp.ones(3), "head": {"b": jnp.zeros(2), "w": jnp.ones((2, 2))}}


def grads_at(step, *, dead=1.0, spike_at=None, nan_at=None, collapse_at=None):
    """Constant gradients (so the running average equals the norm), with planted events."""
    w = np.full((2, 2), 0.5, np.float32)
    if spike_at is not None and step == spike_at:
        w = w * np.float32(100.0)
    if nan_at is not None and step == nan_at:
        w[0, 1] = np.nan
    b = np.array([0.3, -0.4], np.float32)
    if collapse_at is not None and step >= collapse_at:
        b = b * np.float32(1e-5)
    return {"dead": np.full(3, dead, np.float32), "head": {"b": b, "w": w}}


def run(opt, steps, params=PARAMS, **planted):
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(steps):
        updates, state = update(grads_at(step, **planted), state, params)
    return updates, state


def test_healthy_run_in_a_chain_under_jit():
    opt = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-3))
    _, state = run(opt, 30)
    h = state[0]
    assert isinstance(h, jaxcheck.HealthState)
    assert h.paths == ("['dead']", "['head']['b']", "['head']['w']")
    assert int(h.step) == 30
    np.testing.assert_allclose(h.grad_norm, [np.sqrt(3.0), 0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(h.average, [np.sqrt(3.0), 0.5, 1.0], rtol=1e-5)
    np.testing.assert_allclose(h.param_norm, [np.sqrt(3.0), 0.0, 2.0], rtol=1e-6)
    summary = jaxcheck.health(state)
    assert summary.ok and summary.steps == 30 and summary.flagged == ()
    assert str(summary) == (
        "jaxcheck.health: healthy — 3 leaves after 30 steps, nothing vanishing, exploding "
        "or non-finite"
    )
    leaf = summary.leaves[2]
    assert leaf.path == "['head']['w']"
    assert leaf.ratio == pytest.approx(0.5, rel=1e-6)
    assert leaf.worst_spike == pytest.approx(1.0, rel=1e-5)


def test_updates_pass_through_unchanged():
    opt = jaxcheck.gradient_health()
    grads = grads_at(0, nan_at=0)
    updates, _ = jax.jit(opt.update)(grads, opt.init(PARAMS), PARAMS)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_array_equal(a, b)


def test_vanishing_leaf_is_flagged_from_the_end_of_warmup():
    opt = optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1))
    _, state = run(opt, 25, dead=1e-9)
    summary = jaxcheck.health(state)
    (leaf,) = summary.flagged
    assert leaf.path == "['dead']" and leaf.flags == ("vanishing",)
    assert leaf.first_vanishing == 10 and leaf.vanishing_steps == 15 and leaf.vanishing
    assert leaf.ratio == pytest.approx(1e-9, rel=1e-3)
    assert summary.first("vanishing") == 10 and summary.first("exploding") is None


def test_gradient_collapsing_against_its_own_history_is_vanishing():
    # ['head']['b'] has a zero parameter (ratio undefined): only its history can tell. Of
    # two elements, it must stay low on 2 steps in a row: flagged from step 21.
    _, state = run(jaxcheck.gradient_health(), 25, collapse_at=20)
    (leaf,) = jaxcheck.health(state).flagged
    assert leaf.path == "['head']['b']"
    assert (leaf.first_vanishing, leaf.vanishing_steps) == (21, 4)
    assert np.isnan(leaf.ratio)


def test_exploding_spike_is_flagged_once_and_does_not_poison_the_average():
    _, state = run(optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1)), 40, spike_at=25)
    summary = jaxcheck.health(state)
    (leaf,) = summary.flagged
    assert leaf.path == "['head']['w']" and leaf.flags == ("exploding",)
    assert (leaf.first_exploding, leaf.exploding_steps, leaf.exploding) == (25, 1, False)
    assert leaf.worst_spike == pytest.approx(100.0, rel=1e-4)
    # The spike entered the average clipped to 10x: the steps after it are not "collapsed".
    assert leaf.vanishing_steps == 0
    assert 1.0 < leaf.average < 1.3


def test_a_rise_of_a_gradient_at_rounding_level_is_not_exploding():
    """At a minimum the gradient falls to rounding (1e-8 of its parameter here), and
    rounding scatters by tenfold and more from step to step: vanishing, not exploding."""
    opt = jaxcheck.gradient_health()
    params = {"w": jnp.ones(4)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(30):
        size = 3e-7 if step == 25 else 1e-8
        _, state = update({"w": jnp.full(4, size / 2, jnp.float32)}, state, params)
    (leaf,) = jaxcheck.health(state).flagged
    assert leaf.flags == ("vanishing",) and leaf.exploding_steps == 0
    assert leaf.worst_spike == pytest.approx(30.0, rel=1e-4)


def test_nan_step_is_counted_and_named():
    _, state = run(optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1)), 20, nan_at=3)
    summary = jaxcheck.health(state)
    (leaf,) = summary.flagged
    assert leaf.path == "['head']['w']" and leaf.flags == ("nonfinite",)
    assert (leaf.first_nonfinite, leaf.nonfinite_steps, leaf.nonfinite) == (3, 1, False)
    assert leaf.exploding_steps == 0 and leaf.vanishing_steps == 0
    assert summary.skipped == 0


def test_skip_nonfinite_zeroes_the_update_and_counts_it():
    opt = optax.chain(jaxcheck.gradient_health(skip_nonfinite=True), optax.sgd(1.0))
    state = opt.init(PARAMS)
    update = jax.jit(opt.update)
    updates, state = update(grads_at(0, nan_at=0), state, PARAMS)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    updates, state = update(grads_at(1), state, PARAMS)
    np.testing.assert_allclose(updates["dead"], -jnp.ones(3))
    summary = jaxcheck.health(state)
    assert summary.skipped == 1
    assert "1 update(s) with NaN/Inf were replaced by zeros" in str(summary)


def test_summary_table_text():
    def grads(step):
        g = grads_at(step, dead=1e-9, spike_at=12, nan_at=14)
        return g

    opt = optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1))
    state = opt.init(PARAMS)
    update = jax.jit(opt.update)
    for step in range(16):
        _, state = update(grads(step), state, PARAMS)
    text = str(jaxcheck.health(state))
    assert text == "\n".join(
        [
            "jaxcheck.health: 2 of 3 leaves flagged after 16 steps",
            "  leaf           flag        since  steps  now  grad norm  average  grad/param"
            "  worst spike",
            "  ['dead']       vanishing   10     6      yes  1.7e-09    1.7e-09  1.0e-09     x1",
            "  ['head']['w']  non-finite  14     1      no   1.0e+00    1.6e+00  5.0e-01     x100",
            "  ['head']['w']  exploding   12     1      no   1.0e+00    1.6e+00  5.0e-01     x100",
        ]
    )


def test_to_dict_is_json():
    _, state = run(jaxcheck.gradient_health(), 12, nan_at=11)
    d = jaxcheck.health(state).to_dict()
    json.dumps(d)
    assert d["ok"] is False and d["steps"] == 12
    w = d["leaves"][2]
    assert w["path"] == "['head']['w']" and w["grad_norm"] is None
    assert (w["first_nonfinite"], w["nonfinite_steps"], w["first_exploding"]) == (11, 1, None)


def test_parameter_norms_are_refreshed_every_10_steps():
    opt = jaxcheck.gradient_health()
    state = opt.init(PARAMS)
    update = jax.jit(opt.update)
    seen = []
    for step in range(12):
        params = jax.tree.map(lambda p, k=step + 1.0: p * k, PARAMS)
        _, state = update(grads_at(step), state, params)
        seen.append(float(state.param_norm[0]))
    root3 = np.sqrt(3.0)
    np.testing.assert_allclose(seen, [root3] * 10 + [11 * root3] * 2, rtol=1e-6)


def test_norms_of_leaves_of_any_rank_and_dtype():
    # Matrices and higher-rank leaves are summed flat on one CPU device: same norms.
    rng = np.random.default_rng(0)
    grads = {
        "m": rng.standard_normal((3, 4)).astype(np.float32),
        "t": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "c": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "s": np.float32(-2.0),
    }
    opt = jaxcheck.gradient_health()
    _, state = jax.jit(opt.update)(grads, opt.init(grads), grads)
    expected = [np.sqrt(np.sum(np.abs(grads[k]) ** 2)) for k in ("c", "m", "s", "t")]
    np.testing.assert_allclose(state.grad_norm, expected, rtol=1e-6)
    np.testing.assert_allclose(state.param_norm, expected, rtol=1e-6)


def test_nan_params_are_still_params():
    """After an update made the parameters NaN, the summary still knows they were passed
    (it said "update got no params", reading a NaN norm as "none given")."""
    opt = jaxcheck.gradient_health()
    state = opt.init(PARAMS)
    nan_params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), PARAMS)
    _, state = jax.jit(opt.update)(grads_at(0, nan_at=0), state, nan_params)
    summary = jaxcheck.health(state)
    assert summary.params_seen
    assert np.isnan(summary.leaves[0].param_norm)
    assert "update got no params" not in str(summary)
    assert float(opt.init(PARAMS).param_norm[0]) == -1.0  # none given yet


def test_params_with_a_none_leaf_beside_an_update():
    """A parameter given as None where its update is an array (a frozen leaf) has no known
    norm; the others' are kept. It raised JAX's "cond branches must have equal output
    types" (one norm fewer than updates)."""
    opt = jaxcheck.gradient_health()
    params = {"dead": jnp.ones(3), "head": {"b": None, "w": jnp.ones((2, 2))}}
    _, state = jax.jit(opt.update)(grads_at(0), opt.init(PARAMS), params)
    np.testing.assert_allclose(state.param_norm, [np.sqrt(3.0), -1.0, 2.0])
    assert jaxcheck.health(state).params_seen


def test_update_without_params():
    opt = jaxcheck.gradient_health()
    state = opt.init(PARAMS)
    for step in range(12):
        _, state = jax.jit(opt.update)(grads_at(step, dead=1e-9), state)
    summary = jaxcheck.health(state)
    assert not summary.params_seen and summary.ok  # 1e-9 is tiny only relative to params
    assert np.isnan(summary.leaves[0].ratio)
    assert str(summary).splitlines()[1] == (
        "  update got no params: grad/param ratios are unknown and vanishing is judged "
        "against each leaf's own history only"
    )


def test_multisteps_sees_one_accumulated_gradient_per_optimizer_step():
    inner = optax.chain(jaxcheck.gradient_health(warmup=1), optax.sgd(0.1))
    _, state = run(optax.MultiSteps(inner, 2), 7, spike_at=4)
    summary = jaxcheck.health(state)
    assert summary.steps == 3
    # Minibatches 4 and 5 make optimizer step 2: (100 + 1) / 2 times the usual norm.
    (leaf,) = summary.flagged
    assert leaf.first_exploding == 2
    assert leaf.worst_spike == pytest.approx(50.5, rel=1e-4)


@pytest.mark.parametrize("where", ["after", "around", "thresholds"])
def test_inject_hyperparams(where):
    if where == "after":
        inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
        opt = optax.chain(jaxcheck.gradient_health(), inner)
    elif where == "around":
        opt = optax.inject_hyperparams(
            lambda learning_rate: optax.chain(jaxcheck.gradient_health(), optax.sgd(learning_rate))
        )(learning_rate=0.1)
    else:
        opt = optax.inject_hyperparams(jaxcheck.gradient_health)(explode_factor=50.0)
    _, state = run(opt, 30, spike_at=20)
    (leaf,) = jaxcheck.health(state).flagged
    assert (leaf.path, leaf.first_exploding) == ("['head']['w']", 20)


def test_injected_float64_options_keep_the_state_float32_in_a_scan(strict_numerics):
    """Under x64 `inject_hyperparams` hands the options in as float64 arrays (the params'
    dtype): the state stayed float32 only until the first update, so a `lax.scan` carry
    changed type (and strict promotion refused float64 times float32)."""
    with enable_x64():
        params = {"w": jnp.full(3, 0.1, jnp.float64)}
        x = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float64).reshape(4, 3)
        health = optax.inject_hyperparams(jaxcheck.gradient_health)(explode_factor=5.0)
        opt = optax.chain(health, optax.sgd(jnp.float64(1e-2)))

        def loss(p):
            return jnp.mean((jnp.tanh(x @ p["w"]) - 0.3) ** 2)

        def body(carry, _):
            p, state = carry
            updates, state = opt.update(jax.grad(loss)(p), state, p)
            return (optax.apply_updates(p, updates), state), None

        (_, state), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=20)
    inner = state[0].inner_state
    assert {inner.average.dtype, inner.moment.dtype, inner.grad_norm.dtype} == {
        jnp.dtype(jnp.float32)
    }
    summary = jaxcheck.health(state)
    assert summary.steps == 20 and summary.ok, str(summary)


def test_flags_only_read_at_the_end_no_transfer_per_step():
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    x = jnp.linspace(-1.0, 1.0, 8 * 4).reshape(8, 4)
    opt = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-2))

    @jax.jit
    def step(params, state):
        def loss(p):
            return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - 0.5) ** 2)

        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    params, state = step(params, state)
    with jax.transfer_guard("disallow"):
        for _ in range(20):
            params, state = step(params, state)
    summary = jaxcheck.health(state)
    assert summary.steps == 21 and summary.ok, str(summary)


def test_under_strict_numerics_and_bfloat16(strict_numerics):
    params = {"w": jnp.ones(4, jnp.bfloat16), "v": jnp.ones(2, jnp.float32)}
    opt = jaxcheck.gradient_health()
    state = opt.init(params)
    grads = {"w": jnp.full(4, 3.0, jnp.bfloat16), "v": jnp.full(2, 1e-30, jnp.float32)}
    for _ in range(12):
        _, state = jax.jit(opt.update)(grads, state, params)
    summary = jaxcheck.health(state)
    assert summary.leaves[1].grad_norm == pytest.approx(6.0)
    (leaf,) = summary.flagged
    assert leaf.path == "['v']" and leaf.first_vanishing == 11  # two elements: 2 steps


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"explode_factor=0\.5 must be > 1, e.g\. 10"):
        jaxcheck.gradient_health(explode_factor=0.5)
    with pytest.raises(ValueError, match=r"decay=1\.0 must be in \[0, 1\)"):
        jaxcheck.gradient_health(decay=1.0)
    # (a decay below 1 that rounds to 1 in the float32 state never averages anything)
    with pytest.raises(ValueError, match=r"decay=0\.99999999 must be .*below 1 in float32"):
        jaxcheck.gradient_health(decay=0.99999999)
    with pytest.raises(
        ValueError, match=r"explode_factor=1\.00000001 must be .*above 1 in float32"
    ):
        jaxcheck.gradient_health(explode_factor=1.00000001)
    with pytest.raises(TypeError, match="found no gradient_health state in the tuple"):
        jaxcheck.health(optax.adam(1e-3).init(PARAMS))
    opt = optax.chain(jaxcheck.gradient_health(), jaxcheck.gradient_health())
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the state holds 2 gradient_health states, at state[0], state[1]; pass the one "
            "you want, e.g. jaxcheck.health(state[0])."
        ),
    ):
        jaxcheck.health(opt.init(PARAMS))
    split = optax.multi_transform(
        {"a": jaxcheck.gradient_health(), "b": jaxcheck.gradient_health()},
        {"dead": "a", "head": "b"},
    )
    with pytest.raises(ValueError, match=r"at state\.inner_states\['a'\]\.inner_state, state"):
        jaxcheck.health(split.init(PARAMS))
    opt = jaxcheck.gradient_health()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "the updates have the leaves ['w'], but the state was made from parameters with "
            "['dead'], ['head']['b'], ['head']['w']; missing ['dead'], ['head']['b'], "
            "['head']['w']; not in the state ['w']. Call init with the parameters"
        ),
    ):
        opt.update({"w": jnp.ones(2)}, opt.init(PARAMS))
    renamed = {"dead": jnp.ones(3), "tail": {"b": jnp.zeros(2), "w": jnp.ones((2, 2))}}
    with pytest.raises(ValueError, match=r"missing \['head'\]\['b'\], \['head'\]\['w'\]; not in"):
        opt.update(renamed, opt.init(PARAMS))
    # params unlike the updates: JAX's bare pytree error before; a wrong shape was taken
    grads = {"w": jnp.ones(2), "b": jnp.ones(1)}
    state = opt.init(grads)
    with pytest.raises(ValueError) as info:
        opt.update(grads, state, {"w": jnp.ones(2)})
    assert str(info.value).startswith(
        "gradient_health: params do not have the structure of the updates (ValueError: Dict "
        "key mismatch; expected keys: ['b', 'w']; present keys: ['w']"
    )
    assert str(info.value).endswith(
        "Pass the parameters being trained, the pytree the updates are the gradient of, as "
        "update's third argument."
    )
    with pytest.raises(ValueError) as info:
        opt.update({"w": jnp.ones(7), "b": jnp.ones(1)}, state, grads)
    assert str(info.value) == (
        "gradient_health: the update ['w'] has shape (7,), but its parameter has shape (2,). "
        "Pass the parameters being trained, the pytree the updates are the gradient of."
    )
    with pytest.raises(TypeError, match="warmup=True must be an int >= 0"):
        jaxcheck.gradient_health(warmup=True)
    with pytest.raises(
        ValueError,
        match=r"warmup=np.int64\(-3\) must be an int >= 0, e.g. 10; "
        r"explode_factor=np.float32\(0.5\) must be > 1",
    ):
        jaxcheck.gradient_health(warmup=np.int64(-3), explode_factor=np.float32(0.5))
    jaxcheck.gradient_health(warmup=np.int64(3), explode_factor=np.float32(5.0))
    with pytest.raises(TypeError, match="cannot run inside jax.jit"):
        jax.jit(lambda s: jaxcheck.health(s).steps)(opt.init(PARAMS))


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, jaxcheck
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    rows = NamedSharding(mesh, P("fsdp", None))
    params = {"w1": jnp.ones((16, 4)) / 4, "w2": jnp.ones((16, 4)) / 4, "b": jnp.zeros(4)}
    params = {k: jax.device_put(v, rows if v.ndim == 2 else NamedSharding(mesh, P()))
              for k, v in params.items()}
    x = jnp.linspace(-1.0, 1.0, 8 * 16).reshape(8, 16)
    opt = optax.chain(jaxcheck.gradient_health(skip_nonfinite=True), optax.adam(1e-2))

    @jax.jit
    def step(params, state, i):
        def loss(p):
            h = jnp.tanh(x @ p["w1"] + p["b"])
            dead = 1e-9 * jnp.sum(p["w2"])  # w2 barely touches the loss: vanishing
            return jnp.mean((h - 0.5) ** 2) + dead
        g = jax.grad(loss)(params)
        g["w1"] = jnp.where(i == 15, g["w1"] * jnp.nan, g["w1"])
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for i in range(20):
        params, state = step(params, state, jnp.int32(i))
    h = state[0]
    assert params["w1"].sharding.spec[0] == "fsdp", params["w1"].sharding
    s = jaxcheck.health(state)
    by = {leaf.path: leaf for leaf in s.leaves}
    assert by["['w2']"].first_vanishing == 10, by["['w2']"]
    assert by["['w1']"].first_nonfinite == 15, by["['w1']"]
    assert by["['w1']"].nonfinite_steps == 1 and s.skipped == 1, s
    assert by["['b']"].flags == (), by["['b']"]
    # leaves committed to two devices: jax.jit's refusal named no leaf
    d0, d1 = jax.devices()[:2]
    apart = {"a": jax.device_put(jnp.ones(3), d0), "b": jax.device_put(jnp.ones(2), d1)}
    watch = jaxcheck.gradient_health()
    calls = {
        "params": lambda: watch.init(apart),
        "updates": lambda: watch.update(apart, watch.init(jax.device_put(apart, d0))),
    }
    for name, call in calls.items():
        try:
            call()
        except ValueError as err:
            assert str(err) == (
                f"gradient_health: {name} hold arrays committed to different devices "
                f"({name}['a'] on {d0}; {name}['b'] on {d1}). Its watch runs as one jitted "
                "program, which needs every array on the same devices: move them with "
                "jax.device_put(x, device), or shard them all over one mesh."
            ), str(err)
        else:
            raise AssertionError(f"{name} on two devices not refused")
    print("sharded ok", s.steps)
    """
)


def test_sharded_params_on_8_simulated_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "sharded ok 20" in result.stdout


@pytest.mark.parametrize("first", [0.0, np.nan])
def test_a_zero_or_nan_first_gradient_does_not_start_the_history(first):
    # a layer before a zero-initialized one gets a zero gradient at step 0; the running
    # average starts with the first finite, nonzero norm
    opt = jaxcheck.gradient_health(skip_nonfinite=True)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(30):
        grads = {"w": jnp.full(3, first if step == 0 else 0.1, jnp.float32)}
        _, state = update(grads, state, params)
    (leaf,) = jaxcheck.health(state).leaves
    assert leaf.average == pytest.approx(0.1 * np.sqrt(3.0), rel=1e-5)
    assert leaf.flags == (() if first == 0.0 else ("nonfinite",))
    assert int(state.entered[0]) == 29


def test_a_one_element_gradient_near_zero_on_one_step_is_not_vanishing():
    # a scalar bias at convergence: its gradient is the mean residual, which crosses zero
    rng = np.random.default_rng(0)
    values = rng.normal(size=40).astype(np.float32)
    values[20] = 1e-6  # one step far below a thousandth of its average: noise
    values[30:33] = 1e-6  # three in a row: flagged on the third
    opt = jaxcheck.gradient_health()
    # beside a weight that keeps learning (a collapse of the whole model is a minimum)
    params = {"b": jnp.ones(()), "w": jnp.ones(3)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for v, w in zip(values, rng.normal(size=(40, 3)).astype(np.float32)):
        _, state = update({"b": jnp.asarray(v), "w": jnp.asarray(w)}, state, params)
    (leaf,) = jaxcheck.health(state).flagged
    assert leaf.path == "['b']"
    assert (leaf.flags, leaf.first_vanishing, leaf.vanishing_steps) == (("vanishing",), 32, 1)


@pytest.mark.parametrize("dof, first", [(2, 61), (1, 62)])
@pytest.mark.parametrize("lasts", [False, True])
def test_a_three_element_gradient_of_few_degrees_of_freedom_dips_by_chance(dof, first, lasts):
    """A softmax bias's gradient sums to zero (two degrees of freedom of three elements): one
    minibatch took its norm below 1e-3 of its average at step 629 of a healthy run, and it
    was flagged vanishing. A dip of one step is noise; a gradient that stays down is
    flagged after 2 steps in a row (3 for a rank-one gradient, one degree of freedom)."""
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(70, 3)).astype(np.float32)
    if dof == 2:
        b = noise - noise.mean(axis=1, keepdims=True)
    else:
        b = noise[:, :1] * np.array([1.0, 2.0, -3.0], np.float32)
    b[60 : 70 if lasts else 61] *= np.float32(1e-5)
    w = rng.normal(size=(70, 3)).astype(np.float32)  # a weight that keeps learning
    params = {"b": jnp.zeros(3), "w": jnp.ones(3)}
    _, state = run_with(params, lambda step: {"b": b[step], "w": w[step]}, 70)
    flagged = [(leaf.path, leaf.first_vanishing) for leaf in jaxcheck.health(state).flagged]
    assert flagged == ([("['b']", first)] if lasts else [])


def test_an_exactly_zero_gradient_of_a_zero_parameter_is_vanishing():
    params = {"b": jnp.zeros(4), "w": jnp.ones(4)}
    _, state = run_with(params, lambda step: {"b": np.zeros(4), "w": np.ones(4)}, 14)
    (leaf,) = jaxcheck.health(state).flagged
    # (from warmup on, once 3 zero steps in a row are judged: steps 10 to 12)
    assert (leaf.path, leaf.first_vanishing, leaf.vanishing_steps) == ("['b']", 12, 2)
    assert np.isnan(leaf.average)


def run_with(params, grads, steps):
    opt = jaxcheck.gradient_health()
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(steps):
        g = jax.tree.map(lambda x: np.asarray(x, np.float32), grads(step))
        updates, state = update(g, state, params)
    return updates, state


def test_a_donated_state_and_none_leaves_with_skip_nonfinite():
    params = {"w": jnp.ones(3), "frozen": None}
    opt = optax.chain(jaxcheck.gradient_health(skip_nonfinite=True), optax.adam(1e-2))

    def step(params, state, g):
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    state = opt.init(params)
    params, state = step(params, state, {"w": jnp.full(3, jnp.nan), "frozen": None})
    params, state = step(params, state, {"w": jnp.ones(3), "frozen": None})
    assert params["frozen"] is None and np.all(np.isfinite(params["w"]))
    summary = jaxcheck.health(state)
    assert (summary.skipped, summary.leaves[0].first_nonfinite) == (1, 0)


def test_a_state_of_several_runs_is_read_one_run_at_a_time():
    opt = jaxcheck.gradient_health()
    params = {"w": jnp.ones((4, 3))}
    state = jax.vmap(opt.init)(params)
    _, state = jax.vmap(opt.update)(params, state, params)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "state has leading axes of shape (4,) (the states of several training runs, from "
            "jax.vmap, or of one run's copies on several devices, from jax.pmap); read one run "
            "or copy at a time, e.g. jaxcheck.health(jax.tree.map("
        ),
    ):
        jaxcheck.health(state)
    assert jaxcheck.health(jax.tree.map(lambda a: a[0], state)).steps == 1


def test_the_state_round_trips_through_flax_serialization():
    serialization = pytest.importorskip("flax.serialization")
    opt = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-3))
    _, state = run(opt, 12, nan_at=3)
    restored = serialization.from_bytes(opt.init(PARAMS), serialization.to_bytes(state))
    assert str(jaxcheck.health(restored)) == str(jaxcheck.health(state))
    assert jaxcheck.health(restored).leaves[2].first_nonfinite == 3
    # a checkpoint saved before the state had its `recent` levels restores without them
    saved = serialization.to_state_dict(state)
    saved["0"].pop("recent")
    older = serialization.from_state_dict(opt.init(PARAMS), saved)
    assert str(jaxcheck.health(older)) == str(jaxcheck.health(state))
    assert not np.any(np.asarray(older[0].recent))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"vanishing_ratio": "1e-6"}, r"vanishing_ratio='1e-6' must be a number in \[0, 1\)"),
        ({"explode_factor": None}, "explode_factor=None must be a number > 1, e.g. 10"),
        ({"decay": "0.9"}, r"decay='0.9' must be a number in \[0, 1\)"),
        ({"skip_nonfinite": "no"}, "skip_nonfinite='no' must be True or False"),
        ({"warmup": 2.5}, "warmup=2.5 must be an int >= 0"),
    ],
)
def test_options_of_the_wrong_type_are_refused_by_name(options, message):
    with pytest.raises(TypeError, match=r"^gradient_health: " + message):
        jaxcheck.gradient_health(**options)


@pytest.mark.parametrize("ratio", [float("inf"), 1.0, -1e-6])
def test_a_vanishing_ratio_out_of_range_is_refused(ratio):
    """inf was accepted, and every healthy gradient was then vanishing."""
    with pytest.raises(ValueError, match=r"vanishing_ratio=.* must be in \[0, 1\), e.g. 1e-6"):
        jaxcheck.gradient_health(vanishing_ratio=ratio)


def test_out_of_range_arrays_are_refused_and_injected_ones_checked_at_init():
    with pytest.raises(ValueError, match=r"explode_factor=Array\(0\.5, .*\) must be > 1"):
        jaxcheck.gradient_health(explode_factor=jnp.array(0.5))
    opt = optax.inject_hyperparams(jaxcheck.gradient_health)(explode_factor=-5.0, decay=2.0)
    with pytest.raises(
        ValueError,
        match=r"decay=Array\(2\., .*\) must be in \[0, 1\).*"
        r"explode_factor=Array\(-5\., .*\) must be > 1",
    ):
        opt.init(PARAMS)


def test_the_state_holds_no_nan_of_its_own_under_debug_nans():
    """jax_debug_nans must report the training's NaNs, not ones the state keeps on purpose:
    a healthy run with a zero parameter (no grad/param ratio) and a zero gradient runs
    through, and a NaN gradient is still reported by JAX."""
    params = {"b": jnp.zeros(()), "w": jnp.full(3, 0.5)}
    grads = {"b": jnp.zeros(()), "w": jnp.full(3, 0.5)}
    with jax.debug_nans(True):
        opt = optax.chain(jaxcheck.gradient_health(warmup=0), optax.adam(1e-2))
        state = opt.init(params)
        update = jax.jit(opt.update)
        for _ in range(12):
            _, state = update(grads, state, params)
        summary = jaxcheck.health(state)
        with pytest.raises(FloatingPointError, match=r"invalid value \(nan\)"):
            update({"b": jnp.zeros(()), "w": jnp.full(3, jnp.nan)}, state, params)
    # with warmup=0 a leaf is judged against its running average only once it has one
    assert [(leaf.path, leaf.flags) for leaf in summary.leaves] == [
        ("['b']", ("vanishing",)),
        ("['w']", ()),
    ]
    assert summary.leaves[0].first_vanishing == 2  # a one-element leaf: 3 steps in a row
    assert np.isnan(summary.leaves[0].worst_spike)  # no average, no spike
    assert summary.leaves[1].worst_spike == pytest.approx(1.0)
    assert np.all(np.isfinite(np.asarray(state[0].worst_spike)))


def test_a_whole_float_warmup_is_taken_as_its_steps():
    """warmup=10.0 was refused as not an int, where PeriodicCheck takes every=10.0."""
    params = {"w": jnp.ones(3)}
    states = []
    for warmup in (2, 2.0):
        health = jaxcheck.gradient_health(warmup=warmup)
        state = health.init(params)
        for scale in (1.0, 1.0, 1.0, 100.0):
            _, state = health.update({"w": jnp.full(3, scale)}, state, params)
        states.append(jaxcheck.health(state).leaves[0])
    assert states[0] == states[1] and states[0].flags == ("exploding",)


def test_explode_factor_inf_turns_exploding_off_without_a_nan_of_its_own():
    params = {"w": jnp.ones(3)}
    health = jaxcheck.gradient_health(warmup=0, explode_factor=float("inf"))
    state = health.init(params)
    with jax.debug_nans(True):
        for scale in (1.0, 1.0, 1e6):  # a millionfold spike at the last step
            _, state = health.update({"w": jnp.full(3, scale)}, state, params)
    summary = jaxcheck.health(state)
    assert summary.leaves[0].flags == ()
    assert summary.leaves[0].worst_spike == pytest.approx(1e6, rel=1e-3)


def test_a_parameter_gone_inf_is_non_finite_not_also_vanishing():
    """grad / inf = 0 is no vanished gradient: the gradient there is as large as ever."""
    health = jaxcheck.gradient_health(warmup=0)
    state = health.init({"w": jnp.ones(4)})
    broken = {"w": jnp.array([1.0, 1.0, jnp.inf, 1.0])}
    for step in range(12):
        _, state = health.update(
            {"w": jnp.full(4, 0.1)}, state, broken if step else {"w": jnp.ones(4)}
        )
    summary = jaxcheck.health(state)
    leaf = summary.leaves[0]
    assert leaf.flags == ("nonfinite",)
    assert leaf.first_vanishing is None
    # nor a ratio of 0 in the table, which reads as a vanished gradient
    assert math.isinf(leaf.param_norm) and math.isnan(leaf.ratio)
    assert str(summary).splitlines()[-1].split()[-2] == "—", str(summary)


def test_update_with_its_arguments_swapped_says_so():
    params = {"w": jnp.ones(3)}
    health = jaxcheck.gradient_health()
    state = health.init(params)
    with pytest.raises(TypeError) as caught:
        health.update(state, params)
    assert str(caught.value) == (
        "gradient_health: update(updates, state, params=None) got a state of type dict, not "
        "the state its init returned (its updates are that state: the arguments are "
        "swapped; optax's order is update(updates, state, params))."
    )
    with pytest.raises(TypeError, match="got a state of type list, not the state its init"):
        health.update(params, [1.0])


def test_integer_bool_and_empty_leaves_are_not_watched():
    """Step counters, masks and empty arrays have no gradient to watch (under allow_int
    their gradients are float0): never flagged, while a float leaf beside them is."""
    params = {
        "dead": jnp.ones(3),
        "empty": jnp.zeros((0, 4)),
        "mask": jnp.array([True, False]),
        "step": jnp.array(0),
        "w": jnp.ones(3),
    }
    grad = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(params)
    opt = optax.chain(jaxcheck.gradient_health(), optax.identity())
    state = opt.init(params)
    update = jax.jit(opt.update)
    for _ in range(15):
        _, state = update(grad, state, params)
    summary = jaxcheck.health(state)
    assert [(leaf.path, leaf.flags) for leaf in summary.flagged] == [("['dead']", ("vanishing",))]
    assert str(summary).startswith("jaxcheck.health: 1 of 5 leaves flagged after 15 steps")


def test_an_integer_update_of_a_float_parameter_is_refused():
    # (its norm would not be watched: a gradient cast to an integer by mistake)
    params = {"step": jnp.array(0), "w": jnp.ones(3)}
    opt = jaxcheck.gradient_health()
    state = opt.init(params)
    with pytest.raises(TypeError) as info:
        jax.jit(opt.update)({"step": jnp.array(1), "w": jnp.ones(3, jnp.int32)}, state, params)
    assert str(info.value) == (
        "gradient_health: the update of ['w'] has dtype int32 while its parameter is float32: "
        "an integer update of a floating parameter has no gradient norm to watch (was the "
        "gradient cast to an integer?). Pass the update in a floating dtype."
    )


def test_flax_nnx_optimizer_passes_variables_to_init_and_arrays_to_update():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for _ in range(3):
        grads = nnx.grad(lambda m: jnp.mean(m(jnp.ones((4, 3))) ** 2))(model)
        optimizer.update(model, grads)
    summary = jaxcheck.health(optimizer.opt_state)
    assert [leaf.path for leaf in summary.leaves] == ["['bias']", "['kernel']"]
    assert summary.ok and summary.steps == 3 and summary.params_seen
    assert summary.leaves[1].grad_norm > 0
    # nnx.state(optimizer) (what one checkpoints) holds the state's fields, not the state
    with pytest.raises(TypeError) as raised:
        jaxcheck.health(nnx.state(optimizer))
    assert str(raised.value) == (
        "jaxcheck.health: the State passed holds the fields of a gradient_health state (at "
        "state['opt_state'][0]) but not the state itself, which knows the leaves' paths: "
        "nnx.state(optimizer) converts it so, and so does a checkpoint restored without a "
        "target. Pass the optimizer state as the optimizer holds it (optimizer.opt_state), "
        "or the nnx.Optimizer itself; restore a checkpoint onto the structure "
        "opt.init(params) gives (orbax: restore(path, opt.init(params)))."
    )


def test_a_state_restored_without_its_structure_is_told_to_restore_onto_one():
    """A checkpoint restored without a target (orbax gives lists and dicts of arrays)
    holds the fields of the state but not its leaves' paths; the message spoke of nnx."""
    opt = optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1))
    params = {"w": jnp.ones(3)}
    _, state = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
    fields = [f.name for f in dataclasses.fields(state[0]) if f.name != "paths"]
    restored = [{name: np.asarray(getattr(state[0], name)) for name in fields}, {}]
    with pytest.raises(TypeError) as raised:
        jaxcheck.health(restored)
    assert "restore a checkpoint onto the structure opt.init(params) gives" in str(raised.value)
    assert "(at state[0])" in str(raised.value)


def test_gradient_health_masked_out_everywhere_says_so():
    """optax.masked with a mask False for every leaf hands init MaskedNodes only: the
    message said the user passed no arrays, though they passed their params."""
    params = {"frozen": jnp.ones(3), "w": jnp.ones(3)}
    opt = optax.masked(jaxcheck.gradient_health(), {"frozen": False, "w": False})
    with pytest.raises(TypeError) as raised:
        opt.init(params)
    assert str(raised.value) == (
        "gradient_health: every leaf of params is masked out (optax.masked's mask is False "
        "for all of them), so there is nothing to watch. Set the mask True for the leaves "
        "to watch, or leave gradient_health out of optax.masked."
    )


def test_flax_serialization_imported_after_init_saves_after_an_update():
    # in a subprocess: flax must not be imported yet when the state is made
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, optax, jaxcheck
        tx = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-3))
        state = tx.init({"w": jnp.ones(3)})
        from flax import serialization
        _, state = jax.jit(tx.update)({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)})
        saved = serialization.to_bytes(state)  # before any other init
        restored = serialization.from_bytes(tx.init({"w": jnp.ones(3)}), saved)
        print(jaxcheck.health(restored).steps)
        """
    )
    pytest.importorskip("flax.serialization")
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"


def test_the_step_count_of_the_optimizer_after_it_can_still_be_read():
    """The state held an optax.EmaState, whose field `count` made
    `optax.tree.get(opt_state, "count")` find two values and raise, where the chain
    without gradient_health gave adam's step count."""
    get = optax.tree.get if hasattr(optax, "tree") else optax.tree_utils.tree_get
    params = {"w": jnp.ones(3)}
    opt = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-3))
    state = opt.init(params)
    for _ in range(3):
        _, state = opt.update({"w": jnp.ones(3)}, state, params)
    assert int(get(state, "count")) == 3
    assert int(state[0].entered[0]) == 3


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_a_parameter_gone_non_finite_is_flagged_though_its_gradient_is_finite(bad):
    """A NaN parameter whose gradient stayed finite (a leaf the loss does not reach) was
    "healthy"."""
    params = {"w": jnp.array([1.0, bad, 2.0]), "b": jnp.ones(2)}
    opt = jaxcheck.gradient_health()
    state = opt.init(params)
    update = jax.jit(opt.update)
    for _ in range(3):
        _, state = update({"w": jnp.ones(3), "b": jnp.ones(2)}, state, params)
    rows = {leaf.path: leaf for leaf in jaxcheck.health(state).leaves}
    assert rows["['w']"].flags == ("nonfinite",)
    assert rows["['w']"].first_nonfinite == 0
    assert rows["['b']"].flags == ()
    # without params, nothing is known about them: not flagged
    state = opt.init(params)
    _, state = update({"w": jnp.ones(3), "b": jnp.ones(2)}, state)
    assert jaxcheck.health(state).ok


@pytest.mark.parametrize("steps", [100, 2000])
def test_a_full_batch_run_reaching_its_minimum_stays_healthy(steps):
    """The README's example run for 2000 steps: Adam circles the minimum, where the
    gradients pass near zero (below 1e-6 of the parameters, and 1000x below their average)
    and spike by hundreds of times by turns. Both leaves were flagged vanishing (from steps
    132 and 210) and exploding (from 1410)."""

    def loss(p, x, y):
        return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)

    x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
    y = 0.5 * jnp.sin(3.0 * x[:, 0])
    params = {"w": jnp.full(3, 0.1), "b": jnp.zeros(())}
    opt = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-2))
    state = opt.init(params)

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(jax.grad(loss)(params, x, y), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), length=steps)
    summary = jaxcheck.health(state)
    assert summary.ok, str(summary)
    if steps == 2000:  # at the minimum indeed: the gradient is 1e-4 of its start or less
        assert max(leaf.grad_norm for leaf in summary.leaves) < 1e-4


@pytest.mark.parametrize("cut", [False, True])
def test_an_output_bias_converging_ahead_of_the_weights_is_not_vanishing(cut):
    """Full-batch regression with SGD and momentum: the output bias's gradient fell
    150-fold below its running average while the weights learned on, then passed near
    zero without changing sign as the momentum turned (6.7e-6, 5.0e-8, 6.2e-6 against an
    average of 1.1e-2): flagged vanishing at step 179 of a healthy run. A bias cut off
    after converging so is still flagged."""
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(k[0], (64, 3))
    y = jnp.sin(x[:, 0]) + 0.3 * x[:, 1]
    params = {
        "w1": jax.random.normal(k[1], (3, 16)) / 2,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k[2], (16,)) / 4,
        "b2": jnp.zeros(()),
    }

    def loss(p, scale):
        b2 = p["b2"] * scale + jax.lax.stop_gradient(p["b2"] * (1 - scale))
        return jnp.mean((jax.nn.silu(x @ p["w1"] + p["b1"]) @ p["w2"] + b2 - y) ** 2)

    opt = optax.chain(jaxcheck.gradient_health(), optax.sgd(0.05, momentum=0.9))

    def step(carry, i):
        p, s = carry
        scale = jnp.where(cut & (i >= 250), 1e-5, 1.0)
        u, s = opt.update(jax.grad(loss)(p, scale), s, p)
        return (optax.apply_updates(p, u), s), None

    (_, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(400)))(
        (params, opt.init(params))
    )
    summary = jaxcheck.health(state)
    if not cut:
        assert summary.ok, str(summary)
        return
    flagged = {leaf.path: leaf.first_vanishing for leaf in summary.flagged}
    assert list(flagged) == ["['b2']"] and 250 < flagged["['b2']"] <= 280, str(summary)


def _teacher_student(scale: float, steps: int = 2500, dies_at: int = 1500):
    """A student MLP learning a teacher's outputs with adam on minibatches, its first
    layer's gradient scaled by `scale` from step `dies_at` on (the forward unchanged): by
    then the running average of all gradients is 50x below its largest."""
    key = jax.random.PRNGKey(0)
    x_all = jax.random.normal(key, (512, 4))

    def init(k):
        out = {}
        for i, (a, b) in enumerate([(4, 32), (32, 32), (32, 1)]):
            k, kk = jax.random.split(k)
            out[f"l{i}"] = {"w": jax.random.normal(kk, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        return out

    def mlp(p, x, s=1.0):
        for i in range(3):
            x = x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"]
            if i == 0:
                x = x * s + jax.lax.stop_gradient(x * (1 - s))
            if i < 2:
                x = jnp.tanh(x)
        return x

    y_all = mlp(init(jax.random.PRNGKey(7)), x_all)
    opt = optax.chain(jaxcheck.gradient_health(), optax.adam(3e-3))
    params = init(jax.random.PRNGKey(1))

    def step(carry, i):
        p, s = carry
        idx = jax.random.randint(jax.random.fold_in(key, i), (32,), 0, 512)
        s_i = jnp.where(i >= dies_at, scale, 1.0)
        g = jax.grad(lambda p: jnp.mean((mlp(p, x_all[idx], s_i) - y_all[idx]) ** 2))(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (_, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))(
        (params, opt.init(params))
    )
    return jaxcheck.health(state)


@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_a_layer_dying_after_training_converged_far_is_flagged(scale):
    """Once the running average of all gradients was far below its largest (a minimum
    near), vanishing was judged by exact zeros alone: a layer whose gradient fell 1e4-fold
    while the others learned on was never flagged. It is now, after 25 low steps in a row,
    where another leaf still learns; the healthy run stays healthy."""
    summary = _teacher_student(scale)
    flagged = {leaf.path: leaf.first_vanishing for leaf in summary.flagged}
    if scale == 1.0:
        assert summary.ok, str(summary)
        return
    assert set(flagged) == {"['l0']['b']", "['l0']['w']"}, str(summary)
    assert all(1500 < step <= 1530 for step in flagged.values()), flagged


@pytest.mark.parametrize("draw", ["turns", "random"])
@pytest.mark.parametrize("tasks", [2, 3])
def test_heads_of_alternating_tasks_are_not_vanishing_until_one_stops(tasks, draw):
    """Multitask training, one head per task: each head's gradient is exactly zero on the
    other tasks' steps. By turns, one head was flagged "vanishing" (zero whatever its
    norm) and the other not; with the task drawn at random each step, every head was
    flagged at a run of zeros longer than any before (at steps 12, 34 and 42 of 2000). A
    run as likely as the head's share of zero steps makes it is by design; when its task
    stops being trained, the longer run is flagged."""
    key = jax.random.key(0)
    params = {"trunk": 0.5 * jax.random.normal(key, (4, 16))}
    for t in range(tasks):
        params[f"head{t}"] = 0.1 * jax.random.normal(jax.random.fold_in(key, t), (16,))

    def loss(p, x, task):
        h = jnp.tanh(x @ p["trunk"])
        losses = jnp.stack(
            [jnp.mean((h @ p[f"head{t}"] - jnp.sin(x[:, t])) ** 2) for t in range(tasks)]
        )
        return losses[task]

    optimizer = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-2))

    @jax.jit
    def step(p, s, i, task):
        x = jax.random.normal(jax.random.fold_in(key, i), (32, 4))
        updates, s = optimizer.update(jax.grad(loss)(p, x, task), s, p)
        return optax.apply_updates(p, updates), s

    state = optimizer.init(params)
    steps = 120 if draw == "turns" else 2000
    drawn = np.random.default_rng(0).integers(0, tasks, steps)
    for i in range(steps):
        params, state = step(params, state, i, i % tasks if draw == "turns" else drawn[i])
    summary = jaxcheck.health(state)
    assert summary.flagged == (), str(summary)
    # task 0 alone from here: the other heads' zeros go on, flagged once a run of that
    # length has a chance below 1e-9 at their share of zero steps (1/2: after 30 steps, 2/3:
    # after 52)
    for i in range(steps, steps + 60):
        params, state = step(params, state, i, 0)
    leaves = jaxcheck.health(state).leaves
    flagged = {leaf.path: leaf.first_vanishing for leaf in leaves if leaf.vanishing}
    assert set(flagged) == {f"['head{t}']" for t in range(1, tasks)}, str(jaxcheck.health(state))
    assert all(steps <= first < steps + 60 for first in flagged.values()), flagged


def test_a_zero_started_bias_whose_gradient_is_rounding_is_not_vanishing_under_adam():
    """A key projection's bias before a softmax (flax's attention has one by default) has
    a gradient that is zero but for rounding: the softmax of a query's scores ignores
    q . b_k, the same for every key. Adam moves it by about the learning rate each step all
    the same, and its gradient fell below 1e-6 of that norm: flagged "vanishing" on every
    such model. A parameter that started at zero is not judged by its ratio; one that
    started elsewhere with the same gradient still is."""
    key = jax.random.key(0)
    keys = jax.random.split(key, 4)
    params = {
        "q": jax.random.normal(keys[0], (4, 4)) / 2,
        "k": jax.random.normal(keys[1], (4, 4)) / 2,
        "k_bias": jnp.zeros(4),
        "v": jax.random.normal(keys[2], (4, 4)) / 2,
    }
    x = jax.random.normal(keys[3], (64, 5, 4))

    def loss(p, x):
        scores = jnp.einsum("btd,bsd->bts", x @ p["q"], x @ p["k"] + p["k_bias"])
        out = jax.nn.softmax(scores, axis=-1) @ (x @ p["v"])
        return jnp.mean((out - jnp.roll(x, 1, axis=1)) ** 2)

    optimizer = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-2))

    @jax.jit
    def step(p, s, i):
        batch = jax.lax.dynamic_slice_in_dim(x, (i % 4) * 16, 16)
        updates, s = optimizer.update(jax.grad(loss)(p, batch), s, p)
        return optax.apply_updates(p, updates), s

    state = optimizer.init(params)
    for i in range(100):
        params, state = step(params, state, i)
    summary = jaxcheck.health(state)
    bias = {leaf.path: leaf for leaf in summary.leaves}["['k_bias']"]
    assert bias.ratio < 1e-5 and bias.param_norm > 1e-2, str(bias)  # Adam moved it
    assert summary.ok, str(summary)

    # the same gradients for a parameter that did not start at zero: vanishing, as a
    # layer deep in a saturated network is
    params = {"b": jnp.full(4, 1e-2), "w": jnp.ones(4)}
    _, state = run_with(params, lambda step: {"b": np.full(4, 1e-9), "w": np.ones(4)}, 12)
    assert [leaf.path for leaf in jaxcheck.health(state).flagged] == ["['b']"]


def test_a_bias_before_a_batch_norm_swinging_at_rounding_level_is_not_exploding():
    """A convolution's bias before a batch norm has a gradient that is rounding by design
    (the norm removes the mean), about 3e-8 of the whole gradient, and its parameter stays
    near zero: a tenfold swing of that rounding was flagged "exploding". A leaf's rise at
    the rounding of the whole gradient is not; the same rise of a leaf at 1e-3 of it is."""
    opt = jaxcheck.gradient_health()
    params = {"b": jnp.zeros(4), "w": jnp.ones((8, 8))}
    state = opt.init(params)
    update = jax.jit(opt.update)
    moved = {"b": jnp.full(4, 1e-7), "w": jnp.ones((8, 8))}
    for step in range(40):
        size = 3e-8 * (15.0 if step == 30 else 1.0 + 0.3 * (step % 3))
        grads = {"b": np.full(4, size, np.float32), "w": np.full((8, 8), 0.1, np.float32)}
        _, state = update(grads, state, moved)
    assert jaxcheck.health(state).ok, str(jaxcheck.health(state))

    state = opt.init(params)
    for step in range(40):
        size = 1e-4 * (15.0 if step == 30 else 1.0 + 0.3 * (step % 3))
        grads = {"b": np.full(4, size, np.float32), "w": np.full((8, 8), 0.1, np.float32)}
        _, state = update(grads, state, moved)
    (leaf,) = jaxcheck.health(state).flagged
    assert (leaf.path, leaf.flags, leaf.first_exploding) == ("['b']", ("exploding",), 30)


def test_update_of_a_state_of_several_runs_says_what_it_got():
    """A state updated under jax.vmap (several runs), then passed to a plain update: JAX's
    error from inside the transformation, about a lax.cond predicate."""
    opt = jaxcheck.gradient_health()
    params = {"w": jnp.ones((3, 2))}
    grads = {"w": jnp.full((3, 2), 0.1)}
    state = opt.init(params)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), grads)
    runs = jax.vmap(opt.update, in_axes=(0, None, None))(stacked, state, params)[1]
    with pytest.raises(ValueError, match=re.escape("a state with leading axes of shape (2,)")):
        opt.update(grads, runs, params)


def test_a_layer_frozen_on_purpose_is_left_out_with_optax_masked():
    """As the README says: a leaf whose gradient is exactly zero by design (frozen with
    stop_gradient) is flagged vanishing, and optax.masked leaves it out."""
    params = {"frozen": jnp.ones(3), "w": jnp.ones(3)}

    def grads(step):
        return {"frozen": np.zeros(3), "w": np.full(3, 0.5 + 0.1 * (step % 3))}

    _, state = run_with(params, grads, 20)
    assert [leaf.path for leaf in jaxcheck.health(state).flagged] == ["['frozen']"]
    opt = optax.masked(jaxcheck.gradient_health(), {"frozen": False, "w": True})
    state = opt.init(params)
    for step in range(20):
        g = jax.tree.map(lambda x: np.asarray(x, np.float32), grads(step))
        _, state = jax.jit(opt.update)(g, state, params)
    summary = jaxcheck.health(state)
    assert summary.ok and [leaf.path for leaf in summary.leaves] == ["['w']"], str(summary)


_COMPILES = []


def _count_compiles(name, seconds, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(seconds)


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_an_eager_update_is_one_compiled_program(skip_nonfinite):
    """Without jax.jit around the step, an update compiles one program (its first time) and
    then runs it, rather than dispatching each of its operations."""
    opt = jaxcheck.gradient_health(skip_nonfinite=skip_nonfinite, decay=0.97)
    # shapes no other test uses: nothing of this update is compiled before
    params = {"a": jnp.ones((7, 11)), "b": jnp.zeros((13,)), "c": None}
    grads = {"a": jnp.full((7, 11), 0.5), "b": jnp.full((13,), jnp.nan), "c": None}
    state = opt.init(params)
    before = len(_COMPILES)
    updates, state = opt.update(grads, state, params)
    assert len(_COMPILES) - before == 1
    before = len(_COMPILES)
    updates, state = opt.update(grads, state, params)
    assert len(_COMPILES) == before
    assert updates["c"] is None
    assert bool(jnp.isnan(updates["b"]).any()) != skip_nonfinite
    assert int(state.skipped) == (2 if skip_nonfinite else 0)
    assert jaxcheck.health(state).leaves[1].flags == ("nonfinite",)


def test_a_health_state_after_adam_in_its_chain_is_said_to_watch_rescaled_updates():
    """After Adam, gradient_health watches updates of about 1 whatever the gradient: a
    gradient of 1e-12 read "healthy" without a word."""
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    grads = {"w": jnp.full(3, 0.1), "b": jnp.full(2, 1e-12)}
    late = optax.chain(optax.adam(1e-2), jaxcheck.gradient_health())
    first = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-2))
    # optax.named_chain holds its states in a dict, in the chain's order
    named = optax.named_chain(("adam", optax.adam(1e-2)), ("health", jaxcheck.gradient_health()))
    named_first = optax.named_chain(
        ("health", jaxcheck.gradient_health()), ("adam", optax.adam(1e-2))
    )
    # optax.multi_transform's partitions are parallel: another partition's Adam is not before
    parallel = optax.multi_transform(
        {"a": optax.adam(1e-2), "b": optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1))},
        {"w": "a", "b": "b"},
    )
    adam = ("ScaleByAdamState",)
    cases = [(late, adam), (first, ()), (named, adam), (named_first, ()), (parallel, ())]
    for opt, after in cases:
        state = opt.init(params)
        for _ in range(3):
            _, state = opt.update(grads, state, params)
        summary = jaxcheck.health(state)
        assert summary.after == after
        assert summary.to_dict()["after"] == list(after)
        said = [line for line in str(summary).splitlines() if "comes after" in line]
        assert said == (
            [
                "  gradient_health comes after ScaleByAdamState in its chain: it watched the "
                "updates rescaled there, not the gradients (Adam's are about 1 whatever the "
                "gradient's size, so vanishing and exploding go unseen); put it first, "
                "optax.chain(jaxcheck.gradient_health(), ...)"
            ]
            if after
            else []
        )


@pytest.mark.parametrize(
    "before, after, why",
    [
        (
            optax.sgd(0.1, momentum=0.9),
            "TraceState",
            "a momentum or average sums the steps, so a spike or a collapse shows late, smoothed",
        ),
        (optax.zero_nans(), "ZeroNansState", "NaN/Inf zeroed there went unseen"),
    ],
)
def test_a_health_state_after_a_momentum_or_zero_nans_says_what_it_missed(before, after, why):
    """After a momentum (optax.trace) or optax.zero_nans, gradient_health watched what
    they returned without a word: after zero_nans a NaN gradient read "healthy"."""
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    opt = optax.chain(before, jaxcheck.gradient_health())
    state = opt.init(params)
    for step in range(3):
        grads = {"w": jnp.full(3, 0.1), "b": jnp.full(2, jnp.nan if step == 1 else 0.1)}
        _, state = opt.update(grads, state, params)
    summary = jaxcheck.health(state)
    assert summary.after == (after,)
    said = [line for line in str(summary).splitlines() if "comes after" in line]
    assert said == [
        f"  gradient_health comes after {after} in its chain: it watched the updates made "
        f"there, not the gradients ({why}); put it first, "
        "optax.chain(jaxcheck.gradient_health(), ...)"
    ]


def test_a_health_state_after_a_clipping_says_it_watched_what_that_returned():
    """optax.chain(clip_by_global_norm(1.0), gradient_health(), adam(...)): a spike of 1e4
    times the gradient was clipped before the state saw it, and the summary said
    "healthy" with no word; a clipping keeps no state of its own (optax's EmptyState, as
    scale's), so the note says which kinds it may be."""
    params, spike = jnp.ones(3), jnp.full(3, 1e4)
    for clip_first in (True, False):
        parts = [optax.clip_by_global_norm(1.0), jaxcheck.gradient_health()]
        opt = optax.chain(*(parts if clip_first else parts[::-1]), optax.adam(1e-2))
        state = opt.init(params)
        for step in range(40):
            grads = spike if step == 30 else jnp.full(3, 0.1)
            _, state = opt.update(grads, state, params)
        summary = jaxcheck.health(state)
        assert summary.ok is clip_first, str(summary)
        assert summary.after == (("EmptyState",) if clip_first else ())
        said = [line for line in str(summary).splitlines() if "comes after" in line]
        assert said == (
            [
                "  gradient_health comes after a transformation that keeps no state in its "
                "chain (optax.clip_by_global_norm, clip, scale, add_decayed_weights?): it "
                "watched the updates returned there, and where that clips them, spikes beyond "
                "its bound went unseen (and where it scales all leaves together, as "
                "clip_by_global_norm does, the other leaves shrank with a spike and may be "
                "flagged vanishing); put it first, optax.chain(jaxcheck.gradient_health(), "
                "...)"
            ]
            if clip_first
            else []
        )


def test_an_unknown_option_is_named_with_the_option_meant():
    """gradient_health(warmpu=3) gave Python's bare "unexpected keyword argument"."""
    with pytest.raises(TypeError) as info:
        jaxcheck.gradient_health(warmpu=3)
    assert str(info.value) == (
        "jaxcheck.gradient_health got unexpected keyword argument(s) 'warmpu' (did you mean "
        "'warmup'?); its options are decay, warmup, vanishing_ratio, collapse_factor, "
        "explode_factor, skip_nonfinite."
    )


@pytest.mark.parametrize("turn", [2, 3])
def test_a_head_trained_by_turns_is_not_exploding(turn):
    """A task's head whose gradient is noise on its own task's steps and exactly zero on
    the others': the zeros entered its running average, diluting it by the task's share,
    and its own steps looked like spikes (every third step: flagged exploding in 5 of 5
    runs, at up to 39 times the diluted average)."""
    rng = np.random.default_rng(0)
    steps = 1500
    noise = rng.normal(size=steps).astype(np.float32) * 0.01
    own = (np.arange(steps) % turn == 0).astype(np.float32)
    trunk = 0.01 * (1 + 0.05 * rng.normal(size=steps)).astype(np.float32)
    params = {"head": jnp.zeros(()), "trunk": jnp.ones(64)}
    opt = jaxcheck.gradient_health()

    def step(state, g):
        grads = {"head": g[0] * g[1], "trunk": jnp.full(64, g[2])}
        return opt.update(grads, state, params)[1], None

    state, _ = jax.lax.scan(step, opt.init(params), jnp.stack([noise, own, trunk], axis=1))
    head = jaxcheck.health(state).leaves[0]
    assert head.path == "['head']"
    assert head.exploding_steps == 0 and head.vanishing_steps == 0, head
    # its average is that of its own steps' norms, |N(0, 0.01)|: 0.008 on average
    assert 0.004 < head.average < 0.012, head.average


def test_an_integer_parameter_with_float_zero_updates_is_not_watched():
    """An int32 counter and a bool mask whose updates arrive as float zeros (float0
    gradients replaced by zeros) were flagged vanishing at step 11."""
    params = {"count": jnp.arange(3), "mask": jnp.ones(2, bool), "w": jnp.ones(3)}
    opt = jaxcheck.gradient_health()
    state = opt.init(params)
    grads = {"count": jnp.zeros(3), "mask": jnp.zeros(2), "w": jnp.full(3, 0.1)}
    for _ in range(20):
        _, state = jax.jit(opt.update)(grads, state, params)
    summary = jaxcheck.health(state)
    assert summary.ok and not summary.flagged, str(summary)


def test_float32_norms_below_and_above_their_squares_range():
    """A float32 leaf whose entries are all 1e-20 had its sum of squares underflow: norm 0,
    flagged vanishing with vanishing_ratio=0 and collapse_factor=0. One of 2e19 entries,
    finite and of a norm float32 holds, overflowed: non-finite, and skip_nonfinite
    zeroed an update that optax.apply_if_finite applies."""
    params = {"tiny": jnp.full(8, 1e-18, jnp.float32), "huge": jnp.ones(4), "w": jnp.ones(8)}
    grads = {
        "tiny": jnp.full(8, 1e-20, jnp.float32),
        "huge": jnp.full(4, 2e19, jnp.float32),
        "w": jnp.full(8, 0.1, jnp.float32),
    }
    opt = jaxcheck.gradient_health(vanishing_ratio=0.0, collapse_factor=0.0, skip_nonfinite=True)
    state = opt.init(params)
    for _ in range(15):
        updates, state = jax.jit(opt.update)(grads, state, params)
    np.testing.assert_allclose(state.grad_norm, [4e19, 2.828e-20, 0.2828], rtol=1e-3)
    assert updates["huge"][0] == np.float32(2e19) and int(state.skipped) == 0
    summary = jaxcheck.health(state)
    assert summary.ok and not summary.flagged, str(summary)
    # an Inf is still non-finite, and makes no NaN of jaxcheck's own
    with jax.debug_nans(True):
        _, state = opt.update({**grads, "huge": grads["huge"].at[0].set(np.inf)}, state, params)
    assert [leaf.path for leaf in jaxcheck.health(state).flagged] == ["['huge']"]
    assert np.isinf(state.grad_norm[0]) and int(state.skipped) == 1


def test_a_checkpoint_of_another_model_is_refused_when_restored():
    serialization = pytest.importorskip("flax.serialization")
    opt = jaxcheck.gradient_health()
    small = {"a": jnp.ones(3), "b": jnp.ones(2)}
    blob = serialization.to_bytes(opt.init(small))
    with pytest.raises(ValueError) as caught:
        serialization.from_bytes(opt.init({**small, "c": jnp.ones(4)}), blob)
    assert str(caught.value) == (
        "gradient_health: the checkpoint holds the state of 2 parameter leaves, and the "
        "state it is restored into has 3 (['a'], ['b'], ['c']): it was saved for another "
        "model. Restore it into the state of that model, or start this one from "
        "gradient_health's init."
    )


def test_skip_nonfinite_takes_a_zero_dimensional_bool_array():
    opt = jaxcheck.gradient_health(skip_nonfinite=jnp.array(True))
    params = {"w": jnp.ones(2)}
    updates, state = opt.update({"w": jnp.array([np.nan, 1.0])}, opt.init(params), params)
    assert int(state.skipped) == 1 and updates["w"].tolist() == [0.0, 0.0]
    wrong = r"skip_nonfinite=Array\(\[ True, False\], dtype=bool\) must be True or False"
    with pytest.raises(TypeError, match=wrong):
        jaxcheck.gradient_health(skip_nonfinite=jnp.array([True, False]))


@pytest.mark.parametrize("inside", [True, False])
def test_updates_dropped_by_apply_if_finite_around_it_are_said_unseen(inside):
    """optax.apply_if_finite around gradient_health keeps the inner state of the step
    before a NaN update: the summary read "healthy ... after 29 steps" after 30 updates,
    one of them NaN. Outside it, gradient_health sees the NaN itself."""
    params = {"w": jnp.ones(3), "n": jnp.ones(2)}
    health_first = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-2))
    if inside:
        opt = optax.apply_if_finite(health_first, 10)
    else:
        opt = optax.chain(jaxcheck.gradient_health(), optax.apply_if_finite(optax.adam(1e-2), 10))
    state = opt.init(params)
    for step in range(30):
        grads = {"w": jnp.full(3, 0.1), "n": jnp.full(2, jnp.nan if step == 20 else 0.1)}
        _, state = opt.update(grads, state, params)
    summary = jaxcheck.health(state)
    assert not summary.ok
    if not inside:
        assert summary.dropped == 0 and summary.first("nonfinite") == 20, str(summary)
        return
    assert summary.dropped == 1 and summary.steps == 29 and not summary.flagged
    assert summary.to_dict()["dropped"] == 1
    assert str(summary).splitlines() == [
        "jaxcheck.health: 1 update(s) with NaN/Inf dropped unseen by optax.apply_if_finite — "
        "2 leaves after 29 steps, nothing flagged",
        "  gradient_health runs inside optax.apply_if_finite, which dropped 1 update(s) with "
        "NaN/Inf and the state gradient_health had made of them: their non-finite gradients "
        "are not counted here; put it outside, optax.chain(jaxcheck.gradient_health(), "
        "optax.apply_if_finite(...)), or use gradient_health(skip_nonfinite=True)",
    ]


@pytest.mark.parametrize("zeros", [[40], [40, 41], [40, 41, 42]])
def test_a_step_or_two_of_exactly_zero_gradient_is_not_vanishing(zeros):
    """A step whose batch does not reach a leaf (a hinge loss whose batch meets every
    margin, an expert no token was routed to) flagged it vanishing at once, and `ok`
    stayed False for the rest of the run; 3 zero steps in a row are flagged."""
    rng = np.random.default_rng(0)
    noise = [rng.normal(size=5).astype(np.float32) * 0.1 for _ in range(60)]
    params = {"w": jnp.ones(5), "b": jnp.ones(5)}

    def grads(step):
        g = np.zeros(5, np.float32) if step in zeros else noise[step]
        return {"w": g, "b": noise[step][::-1].copy()}

    _, state = run_with(params, grads, 60)
    flagged = [(leaf.path, leaf.first_vanishing) for leaf in jaxcheck.health(state).flagged]
    assert flagged == ([("['w']", 42)] if len(zeros) == 3 else []), flagged


def test_a_donated_state_is_refused_with_a_message():
    """A state donated to the jitted step (donate_argnums) raised JAX's "Array has been
    deleted" from inside health() and PeriodicCheck(opt_state=)."""
    params = {"w": jnp.ones(3)}
    opt = optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1))

    def step(p, s):
        u, s = opt.update(jax.grad(lambda q: jnp.sum(q["w"] ** 2))(p), s, p)
        return optax.apply_updates(p, u), s

    old = opt.init(params)
    params, state = jax.jit(step, donate_argnums=(0, 1))(params, old)
    if not old[0].step.is_deleted():
        pytest.skip("this backend does not donate buffers")
    said = (
        "the gradient_health state (at state[0]) holds an array that has been deleted (at "
        ".step): the optimizer state was donated to a jax.jit function (donate_argnums), "
        "whose buffers are gone. Read the state that function returned instead."
    )
    with pytest.raises(ValueError, match=re.escape(f"jaxcheck.health: {said}")):
        jaxcheck.health(old)
    check = jaxcheck.PeriodicCheck(lambda p: jnp.sum(p["w"] ** 2), every=5)
    with pytest.raises(ValueError, match=re.escape(f"flags, and {said}")):
        check(1, params, opt_state=old)
    assert jaxcheck.health(state).ok


def test_a_jitted_step_does_not_ask_its_tracers_where_they_are_placed(monkeypatch):
    """Asked for `.committed`, a tracer raises an error whose message walks the whole trace:
    per leaf, that made tracing a jitted step with gradient_health quadratic in the number
    of leaves (600 leaves: 114 s against 1.3 s without)."""
    asked = []
    tracer_type = None  # (the type of the step's tracers, once traced)
    params = {f"w{i}": jnp.full(3, 0.1) for i in range(4)}
    tx = optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1))

    def step(p, s):
        nonlocal tracer_type
        leaf = jax.tree.leaves(p)[0]
        tracer_type = type(leaf)
        monkeypatch.setattr(
            tracer_type, "committed", property(lambda self: asked.append(1)), raising=False
        )
        updates, s = tx.update(p, s, p)
        return optax.apply_updates(p, updates), s

    jax.jit(step).lower(params, tx.init(params))
    assert issubclass(tracer_type, jax.core.Tracer)
    assert asked == []


def test_a_summary_has_no_truth_value():
    """`assert jaxcheck.health(state)` passed with a leaf flagged non-finite (a summary was
    always true); it raises, as a Report does, pointing to summary.ok."""
    opt = optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1))
    params = {"w": jnp.ones(3)}
    _, state = opt.update({"w": jnp.full(3, jnp.nan)}, opt.init(params), params)
    summary = jaxcheck.health(state)
    assert not summary.ok
    with pytest.raises(TypeError, match="HealthSummary has no truth value: use summary.ok"):
        assert summary
