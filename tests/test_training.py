"""PeriodicCheck: gradient checks every N steps of a training loop, and their history."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcheck


def regression_data():
    """The textbook example: y = 3x + 2 + uniform noise in [0, 1), so w -> 3, b -> 2.5."""
    r = np.random.default_rng(0)
    x = jnp.asarray(r.random(1000), jnp.float32)
    y = 3.0 * x + 2.0 + jnp.asarray(r.random(1000), jnp.float32)
    return x, y


def loss(p, x, y):
    return jnp.mean((p["w"] * x + p["b"] - y) ** 2)


def textbook_grad(p, x, y):
    # As first written: the residual in dw forgets b, db forgets w and b.
    n = x.shape[0]
    dw = (2.0 / n) * jnp.sum((p["w"] * x - y) * x)
    db = (2.0 / n) * (x.sum() - y.sum())
    return {"w": dw, "b": db}


def corrected_grad(p, x, y):
    n = x.shape[0]
    residual = p["w"] * x + p["b"] - y
    return {"w": (2.0 / n) * jnp.sum(residual * x), "b": (2.0 / n) * jnp.sum(residual)}


def train(grad_fn, steps=200, every=50):
    x, y = regression_data()
    params = {"w": jnp.float32(0.5), "b": jnp.float32(0.1)}
    opt = optax.sgd(0.7)
    state = opt.init(params)
    check = jaxcheck.PeriodicCheck(loss, every=every, grad_fn=grad_fn, num_directions=8)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(grad_fn(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        check(i, params, x, y)
        params, state = step(params, state)
    return params, check


def test_textbook_gradient_fails_at_the_first_check():
    _, check = train(textbook_grad, steps=60)
    assert check.first_failure == 0
    first = check.history[0]
    assert (first.step, first.reason, first.status.value) == (0, "every N steps", "fail")
    assert set(first.failing) == {"['b']", "['w']"}
    assert first.relative_error > 1000 * first.tolerance
    assert "FAIL" in str(first.report)


def test_corrected_gradient_converges_and_every_check_passes():
    params, check = train(corrected_grad)
    assert float(params["w"]) == pytest.approx(3.0, abs=0.05)
    assert float(params["b"]) == pytest.approx(2.5, abs=0.05)
    x, y = regression_data()
    np.testing.assert_allclose(
        [params["w"], params["b"]], np.polyfit(np.asarray(x), np.asarray(y), 1), rtol=1e-4
    )
    assert [(r.step, r.status.value) for r in check.history] == [
        (0, "pass"),
        (50, "pass"),
        (100, "pass"),
        (150, "pass"),
    ]
    assert check.first_failure is None
    # Passing checks compare all leaves at once; no per-leaf checks were run.
    assert all(r.report.leaves == () for r in check.history)
    assert check.checker.compilations > 0
    # Compiled once: the programs of the later checks (a settled one compiles fewer) are reused.
    assert [r.report.num_compiled for r in check.history][2:] == [0, 0]


def test_only_due_steps_check_and_history_text():
    check = jaxcheck.PeriodicCheck(loss, every=3, grad_fn=textbook_grad, num_directions=8)
    x, y = regression_data()
    params = {"w": jnp.float32(0.5), "b": jnp.float32(0.1)}
    results = [check(step, params, x, y) for step in range(7)]
    assert [r is not None for r in results] == [True, False, False, True, False, False, True]
    assert [r.step for r in check.history] == [0, 3, 6]
    text = str(check).splitlines()
    assert text[0].startswith("PeriodicCheck(every=3): 3 checks, first failure at step 0, ")
    assert text[1].split() == [
        "step",
        "status",
        "rel.",
        "error",
        "tolerance",
        "seconds",
        "failing",
        "leaves",
    ]
    assert text[2].split()[:2] == ["0", "fail"] and text[2].endswith("['b'], ['w']")
    d = check.history[0].to_dict()
    json.dumps(d)
    assert (d["step"], d["status"], d["failing"]) == (0, "fail", ["['b']", "['w']"])
    assert "report" not in d


def test_cost_fraction():
    check = jaxcheck.PeriodicCheck(loss, every=1, num_directions=8)
    x, y = regression_data()
    check(0, {"w": jnp.float32(0.5), "b": jnp.float32(0.1)}, x, y)
    assert check.seconds == pytest.approx(check.history[0].seconds)
    assert check.cost_fraction(10.0 * check.seconds) == pytest.approx(0.1)
    # a time summed with jnp is a 0-d array
    assert check.cost_fraction(jnp.float32(10.0 * check.seconds)) == pytest.approx(0.1)
    with pytest.raises(TypeError, match="training_seconds must be a number of seconds"):
        check.cost_fraction(jnp.ones(2))
    with pytest.raises(ValueError, match="training_seconds=0 must be > 0"):
        check.cost_fraction(0)
    with pytest.raises(ValueError, match=r"^training_seconds=inf must be > 0 and finite\.$"):
        check.cost_fraction(float("inf"))  # (a fraction of 0 said nothing true)


def _with_a_dead_leaf():
    """(params, x, fn, optimizer): fn hardly reaches the leaf ['dead'], whose gradient
    gradient_health flags vanishing at step 11."""
    params = {"w": jnp.ones(3), "dead": jnp.ones(2)}

    def fn(p, x):
        return jnp.sum(jnp.sin(p["w"] * x)) + 1e-9 * jnp.sum(p["dead"])

    opt = optax.chain(jaxcheck.gradient_health(), optax.sgd(1e-3))
    return params, jnp.linspace(-1.0, 1.0, 3), fn, opt


def test_health_flags_trigger_a_check_once():
    params, x, fn, opt = _with_a_dead_leaf()
    state = opt.init(params)
    update = jax.jit(lambda s, p: opt.update(jax.grad(fn)(p, x), s, p)[1])
    check = jaxcheck.PeriodicCheck(fn, every=100, num_directions=8)
    for step in range(14):
        check(step, params, x, opt_state=state)
        state = update(state, params)
    # The vanishing flag on ['dead'] (two elements: low on 2 steps in a row) fires at step
    # 11 and is seen by the call of step 12; it is not a new flag on the steps after.
    assert [(r.step, r.reason) for r in check.history] == [
        (0, "every N steps"),
        (12, "health flags"),
    ]


def test_a_flag_fired_before_the_first_call_given_the_state_triggers_a_check():
    """Passing opt_state= every few steps, as the docstring advises where the
    synchronization costs: a NaN gradient at update 2 fires its flag before the first
    call given the state, and that call runs a check (one that took a state's flags at its
    first sight as old news missed it)."""
    params, x, fn, opt = _with_a_dead_leaf()
    state = opt.init(params)
    update = jax.jit(lambda s, p, g: opt.update(g, s, p)[1])
    check = jaxcheck.PeriodicCheck(fn, every=100, num_directions=8)
    for step in range(1, 8):
        bad = step == 2
        g = {"w": jnp.full(3, jnp.nan), "dead": jnp.ones(2)} if bad else jax.grad(fn)(params, x)
        state = update(state, params, g)
        if step % 5 == 0:
            check(step, params, x, opt_state=state)
    assert [(r.step, r.reason) for r in check.history] == [(5, "health flags")]


def test_a_flag_that_fires_again_after_a_rollback_triggers_a_check_again():
    """A NaN gradient at step 3, the state rolled back to a checkpoint of step 1 and the
    NaN at step 5 again: the highest count of flags ever seen was kept, and the second
    NaN, as new as the first in the state rolled back, started no check."""
    params, x, fn, opt = _with_a_dead_leaf()
    state = opt.init(params)
    update = jax.jit(lambda s, p, g: opt.update(g, s, p)[1])
    check = jaxcheck.PeriodicCheck(fn, every=100, num_directions=8)
    saved = None
    for step in range(1, 8):
        bad = step in (3, 5)
        g = {"w": jnp.full(3, jnp.nan), "dead": jnp.ones(2)} if bad else jax.grad(fn)(params, x)
        state = update(state, params, g)
        check(step, params, x, opt_state=state)
        saved = state if step == 1 else saved
        state = saved if step == 3 else state
    assert [(r.step, r.reason) for r in check.history] == [
        (3, "health flags"),
        (5, "health flags"),
    ]


def test_raise_on_failure_records_then_raises():
    check = jaxcheck.PeriodicCheck(
        loss, every=1, grad_fn=textbook_grad, num_directions=8, raise_on_failure=True
    )
    x, y = regression_data()
    with pytest.raises(jaxcheck.GradientCheckError, match="gradient is WRONG"):
        check(0, {"w": jnp.float32(0.5), "b": jnp.float32(0.1)}, x, y)
    assert check.first_failure == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="every=0 must be an int >= 1"):
        jaxcheck.PeriodicCheck(loss, every=0)
    with pytest.raises(TypeError, match=r"^every=2.5 must be an int >= 1 .*, got float\.$"):
        jaxcheck.PeriodicCheck(loss, every=2.5)
    assert jaxcheck.PeriodicCheck(loss, every=np.int64(10)).every == 10
    check = jaxcheck.PeriodicCheck(loss, every=1)
    with pytest.raises(TypeError, match=r"^jaxcheck\.PeriodicCheck runs on the host .* outside "):
        jax.jit(lambda step: check(step, {"w": jnp.ones(3)}) is None)(0)
    # as verify says it (before: "unknown option(s)", and `every` not among them)
    with pytest.raises(TypeError, match=r"'num_direction' \(did you mean 'num_directions'"):
        jaxcheck.PeriodicCheck(loss, every=5, num_direction=8)
    with pytest.raises(TypeError) as info:
        jaxcheck.PeriodicCheck(loss, evry=5)
    assert str(info.value).startswith(
        "jaxcheck.PeriodicCheck got unexpected keyword argument(s) 'evry' (did you mean "
        "'every'?); its options are every, grad_fn,"
    )
    assert jaxcheck.PeriodicCheck(loss, every=10.0).every == 10  # as a step of 10.0 is taken
    with pytest.raises(TypeError) as info:  # (Python said: "takes 2 positional arguments")
        jaxcheck.PeriodicCheck(loss, 25)
    assert str(info.value) == (
        "jaxcheck.PeriodicCheck takes fn alone positionally, got 2 positional arguments; "
        "every and the options are keywords: PeriodicCheck(fn, every=100, num_directions=8), "
        "say."
    )
    with pytest.raises(ValueError, match=r"^step=-100 is negative; pass the training step's"):
        jaxcheck.PeriodicCheck(loss, every=100)(-100, {"w": jnp.ones(3)})


def test_a_step_swapped_with_params_is_named_in_a_few_words():
    """The whole params tree filled the message (700 characters for a small MLP)."""
    check = jaxcheck.PeriodicCheck(loss, every=5)
    x, y = regression_data()
    with pytest.raises(TypeError) as raised:
        check({"w": jnp.ones((3, 3)), "b": jnp.zeros(3)}, 0, x, y)
    assert str(raised.value) == (
        "step=<dict of 2 leaves> must be an int, the training step's number (the check runs "
        "on multiples of every=5); call check(step, params, *args) (params=0 looks like the "
        "step: are the two swapped?)."
    )


@pytest.mark.parametrize("step", ["20", None, 2.5, True])
def test_a_step_that_is_not_an_int_is_refused_by_name(step):
    check = jaxcheck.PeriodicCheck(loss, every=5)
    x, y = regression_data()
    with pytest.raises(TypeError) as raised:
        check(step, {"w": jnp.float32(0.5), "b": jnp.float32(0.1)}, x, y)
    assert str(raised.value) == (
        f"step={step!r} must be an int, the training step's number (the check runs on "
        "multiples of every=5); call check(step, params, *args)."
    )
    assert check.history == []


def test_an_inconclusive_check_is_not_called_a_failure():
    """A model at a kink is not judged: the history says so, not "first failure"."""

    def relu_loss(w, x):
        return jnp.sum(jax.nn.relu(x * w))

    check = jaxcheck.PeriodicCheck(relu_loss, every=10, num_directions=8)
    x = jnp.asarray([1.0, -2.0, 3.0, 0.5], jnp.float32)
    report = check(np.int64(0), jnp.zeros(4, jnp.float32), x)  # every unit on its kink
    assert report.status == "inconclusive", str(report)
    assert check.first_failure == 0  # (the first check that did not pass)
    text = str(check).splitlines()
    assert text[0].startswith(
        "PeriodicCheck(every=10): 1 checks, first check not passed at step 0 (inconclusive), "
    ), text[0]
    assert text[2].split()[:3] == ["0", "inconclusive", "—"], text[2]


def test_a_non_finite_check_names_its_leaves_in_the_record():
    """A check at params with a NaN in one leaf was recorded with no failing leaf (the
    report named it in a sentence alone): the record and the report's leaves name the
    leaves whose value or gradient is NaN/Inf."""

    def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p["w1"]) ** 2) + jnp.sum(p["b"] ** 2)

    params = {"w1": jnp.ones((4, 3)).at[0, 0].set(jnp.nan), "b": jnp.ones(2)}
    check = jaxcheck.PeriodicCheck(loss, every=1)
    check(0, params, jnp.ones((2, 4)))
    (record,) = check.history
    assert record.status == "nonfinite" and record.failing == ("['w1']",)
    assert [(leaf.path, leaf.status) for leaf in record.report.leaves] == [("['w1']", "nonfinite")]


def test_an_opt_state_without_gradient_health_is_refused_in_periodic_checks_terms():
    """It was refused as "jaxcheck.health: found no gradient_health state", naming a
    function the caller never called."""
    check = jaxcheck.PeriodicCheck(loss, every=5)
    x, y = regression_data()
    params = {"w": jnp.float32(0.5), "b": jnp.float32(0.1)}
    with pytest.raises(TypeError) as raised:
        check(0, params, x, y, opt_state=optax.adam(1e-3).init(params))
    assert str(raised.value).startswith(
        "jaxcheck.PeriodicCheck: opt_state= is read for gradient_health's flags, and found no "
        "gradient_health state in the tuple passed; pass the optimizer state of a chain"
    )


@pytest.mark.parametrize(
    "keywords, said",
    [
        ({"rtol": 1e-3}, "rtol is an option of the check, fixed when it is made: pass rtol=..."),
        ({"train": True}, "fn's keyword arguments cannot be passed through it: bind them"),
    ],
)
def test_keywords_at_a_periodic_check_call_are_refused_with_a_reason(keywords, said):
    """check(step, p, x, rtol=1e-3) raised Python's bare "unexpected keyword argument"."""
    check = jaxcheck.PeriodicCheck(lambda p, x: jnp.sum(jnp.sin(p) * x), every=1)
    with pytest.raises(TypeError, match="^a PeriodicCheck is called as check") as info:
        check(0, jnp.ones(3), jnp.ones(3), **keywords)
    assert said in str(info.value)
