"""verify(transforms=True): the gradient under jit, vmap, checkpoint and forward mode
against the plain one, without finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.custom_batching import custom_vmap

import jaxcheck

PARAMS = {"w": jnp.asarray([[0.3, -0.2], [0.1, 0.5], [-0.4, 0.2]]), "b": jnp.asarray([0.1, -0.1])}
X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


def mlp(p, x):
    return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)


EVERY_ROW_PASSES = dict.fromkeys(("jit", "vmap", "checkpoint", "forward vs reverse"), "pass")


def rows(report) -> dict:
    part = report.parts[-1]
    return {p.label: p.status.value for p in part.parts}


def test_correct_model_passes_every_row():
    report = jaxcheck.verify(mlp, PARAMS, X, transforms=True)
    assert report.ok, report
    assert rows(report) == EVERY_ROW_PASSES
    assert "vmap: gradient per example by jax.vmap over the leading axis of args[0] (B = 4)" in str(
        report
    )
    # no custom rule here: the headline says what was checked, and nothing else
    assert str(report).startswith(
        "jaxcheck.verify: PASS — derivatives of fn, under JAX's transformations too, are "
        "consistent with finite differences"
    )


def test_batching_rule_that_mixes_examples_fails_the_vmap_row():
    @custom_vmap
    def passthrough(g):
        return g

    @passthrough.def_vmap
    def _(axis_size, in_batched, g):
        return g + 0.1 * jnp.mean(g, axis=0), True  # leaks the batch mean into every example

    @jax.custom_vjp
    def activation(h):
        return jnp.tanh(h)

    activation.defvjp(
        lambda h: (jnp.tanh(h), h), lambda h, g: (passthrough(g * (1 - jnp.tanh(h) ** 2)),)
    )

    def loss(p, x):
        return jnp.mean(activation(x @ p["w"] + p["b"]) ** 2)

    report = jaxcheck.verify(loss, PARAMS, X, transforms=True, rules=False)
    assert rows(report) == {"jit": "pass", "vmap": "fail", "checkpoint": "pass"}
    assert report.status == "fail"
    assert "FAIL — the gradient under jax.vmap is WRONG" in str(report)


def test_remat_path_that_differs_fails_the_checkpoint_row():
    saved = {}

    @jax.custom_vjp
    def smuggled_sin(x):
        return jnp.sin(x)

    def fwd(x):
        saved["x"] = x  # the residual kept on the side instead of returned
        return jnp.sin(x), None

    smuggled_sin.defvjp(fwd, lambda _, g: (g * jnp.cos(saved["x"]),))

    def loss(p, x):
        return jnp.sum(smuggled_sin(x @ p["w"] + p["b"]) ** 2)

    report = jaxcheck.verify(loss, PARAMS, X, transforms=True, rules=False)
    assert rows(report) == {"jit": "pass", "vmap": "pass", "checkpoint": "fail"}
    text = str(report)
    assert "checkpoint: UnexpectedTracerError" in text
    assert "forward vs reverse not checked: fn holds a custom_vjp function" in text


def test_eager_only_path_fails_the_jit_row():
    @jax.custom_vjp
    def act(h):
        return jnp.tanh(h)

    def bwd(h, g):
        slope = 1 - jnp.tanh(h) ** 2
        if not isinstance(g, jax.core.Tracer):  # an eager "fast path" that differs
            slope = slope * 1.01
        return (g * slope,)

    act.defvjp(lambda h: (jnp.tanh(h), h), bwd)

    def loss(p, x):
        return jnp.mean(act(x @ p["w"] + p["b"]) ** 2)

    report = jaxcheck.verify(loss, PARAMS, X, transforms=True, rules=False)
    assert rows(report)["jit"] == "fail"
    assert "jit: gradient under jax.jit vs eager: relative difference 9.9e-03" in str(report)


def test_the_batch_is_the_largest_argument_not_statistics_passed_before_it():
    """loss(params, stats, x, y), flax's order: the vmap row split the 16 running means and
    variances, left the 32 examples whole, and read "ok"."""

    def loss(p, stats, x, y):
        h = (x @ p["w"] - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5)
        return jnp.mean((jnp.tanh(h) @ p["v"] - y) ** 2)

    keys = jax.random.split(jax.random.key(0), 3)
    p = {"w": jax.random.normal(keys[0], (6, 16)) / 3, "v": jax.random.normal(keys[1], (16,))}
    stats = {"mean": jnp.zeros(16), "var": jnp.ones(16)}
    x = jax.random.normal(keys[2], (32, 6))
    report = jaxcheck.verify(loss, p, stats, x, jnp.cos(x[:, 0]), transforms=True)
    assert rows(report)["vmap"] == "pass", str(report)
    assert "by jax.vmap over the leading axis of args[1] (B = 32) vs a loop" in str(report)


def test_without_a_batch_axis_the_vmap_row_is_skipped_and_said():
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p) ** 2), jnp.ones(3), transforms=True)
    assert report.ok
    assert "vmap" not in rows(report)
    assert (
        "transforms: vmap not checked, no argument of fn has a leading axis of size >= 2 to "
        "batch over" in report.problems
    )


def test_a_fn_that_takes_no_batch_of_one_skips_the_vmap_row_and_says_why():
    """A loss over groups of 4 examples raises on one example: that is fn's own limit, not
    a batching rule's error, and the row was reported WRONG with a relative error of inf."""

    def loss(p, x):
        groups = jnp.tanh(x @ p).reshape(-1, 4, 3)
        return jnp.mean(jnp.var(groups, axis=1))

    x = jax.random.normal(jax.random.key(0), (8, 5))
    report = jaxcheck.verify(loss, jnp.ones((5, 3)) / 4, x, transforms=True)
    assert report.status == "pass", str(report)
    assert "vmap" not in rows(report)
    said = [q for q in report.problems if q.startswith("transforms: vmap")]
    assert said == [
        "transforms: vmap not checked, fn's gradient raised on one example of args[0] (B = 8) "
        "(its leading axis cut to size 1): TypeError: cannot reshape array of shape (1, 3) "
        "(size 3) into shape (-1, 4, 3) because the product of specified axis sizes (12) does "
        "not evenly divide 3; fn must take a batch of one for this row"
    ], said


def _with_a_mode(p, x, mode):
    assert mode == "train"
    return mlp(p, x)


def _with_a_flag(p, x, double):
    return mlp(p, x) * (2.0 if double else 1.0)  # a Python `if` on the flag


def _with_an_activation(p, x):
    return jnp.mean(p["act"](x @ p["w"] + p["b"]) ** 2)


def _with_a_tagged_batch(p, batch):
    return mlp(p, batch["x"])


@pytest.mark.parametrize(
    ("fn", "params", "args"),
    [
        (_with_a_mode, PARAMS, (X, "train")),
        (_with_a_flag, PARAMS, (X, True)),
        (_with_an_activation, {**PARAMS, "act": jnp.tanh}, (X,)),
        (mlp, {**PARAMS, "name": "dense"}, (X,)),
        (_with_a_tagged_batch, PARAMS, ({"x": X, "tag": "eval"},)),
    ],
    ids=["string arg", "bool flag", "function leaf", "string leaf", "string in an arg"],
)
def test_leaves_that_are_no_arrays_are_held_as_they_are_under_every_transformation(
    fn, params, args
):
    """A mode string, a flag fn branches on, an activation or a name in params (equinox
    modules hold them) stay as they are, as verify holds them: every row failed with inf
    (a string is no JAX type to jax.jit and jax.checkpoint; the flag became a tracer)."""
    report = jaxcheck.verify(fn, params, *args, transforms=True)
    assert report.status == "pass", str(report)
    assert rows(report) == EVERY_ROW_PASSES


def test_complex_params_get_every_row():
    """The rows compare JAX's gradients with each other, complex ones too: they were not
    checked, the note saying to check them "with jaxcheck.verify", the call that said it."""
    w = (PARAMS["w"] * (1 + 0.5j)).astype(jnp.complex64)
    report = jaxcheck.verify(
        lambda p, x: jnp.sum(jnp.abs(jnp.tanh(x @ p)) ** 2), w, X, transforms=True
    )
    assert report.status == "pass", str(report)
    assert rows(report) == EVERY_ROW_PASSES
    assert not [q for q in report.problems if q.startswith("transforms:")], report.problems


def test_rows_allow_the_rounding_the_check_of_fn_measured():
    """A batch norm over a column of one value: the float32 gradient is 5e-3 off the same
    rule in float64, which the check of fn takes for rounding and passes, and forward mode
    4.4e-4 off reverse mode was called WRONG against a tolerance of 1.2e-4."""
    p = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.asarray([0.1, -0.2, 0.3])}
    x = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)

    def normed(p, x):
        h = x @ p["w"] + p["b"]
        h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-3)
        return jnp.mean(jnp.tanh(h) ** 2)

    report = jaxcheck.verify(normed, p, x, transforms=True)
    assert report.status == "pass", str(report)
    assert set(rows(report).values()) == {"pass"}
    head = report.parts[0].checks[0]
    assert head.rounding > 1e-4  # what the rows now allow for, twice
    assert report.parts[-1].checks[-1].tolerance == pytest.approx(2 * head.rounding)


def test_a_gap_to_float64_that_is_no_rounding_widens_no_row():
    """Dropout drawn in the default dtype: fn computes something else in float64, and its
    float32 gradient's gap to float64 (0.76) is not judged; the rows took it for rounding
    (a tolerance of 1.5), and a batching rule 10 % off passed the vmap row."""

    @custom_vmap
    def cos(x):
        return jnp.cos(x)

    @cos.def_vmap
    def _(axis_size, batched, x):
        return jnp.cos(x) * 1.1, batched[0]

    @jax.custom_jvp
    def feature(x):
        return jnp.sin(x)

    feature.defjvp(lambda primals, tangents: (jnp.sin(primals[0]), cos(primals[0]) * tangents[0]))

    def dropped(p, x, key):
        h = feature(x @ p["w"])
        h = jnp.where(jax.random.bernoulli(key, 0.8, h.shape), h / 0.8, 0.0)
        return jnp.mean((h @ p["v"]) ** 2)

    p = {"w": jnp.cos(jnp.arange(12.0)).reshape(3, 4) / 2, "v": jnp.sin(jnp.arange(4.0))}
    x = jnp.cos(jnp.arange(12.0) * 0.7).reshape(4, 3)
    report = jaxcheck.verify(dropped, p, x, jax.random.key(3), transforms=True)
    assert report.status == "fail", str(report)
    [vmap] = [q for part in report.parts for q in part.parts if q.label == "vmap"]
    assert vmap.status == "fail" and vmap.tolerance < 1e-3, str(report)
    assert report.problems[0].startswith("the derivative of fn in float64 differs from that in")


def test_modes_compared_beside_a_gap_to_float64_that_is_no_rounding_widen_no_row():
    """Dropout again, both modes: the forward-vs-reverse row took the float32 rows' gaps
    to float64 (another function's) for the two modes' rounding (tolerance 1.7 at order
    2), and transforms=True widened its rows by it: a rule 20 % off only when run eagerly
    passed the jit row (at order 1 the custom_vjp has no forward mode to compare)."""

    @jax.custom_vjp
    def act(x):
        return jnp.tanh(x)

    def bwd(x, g):
        scale = 1.0 if isinstance(g, jax.core.Tracer) else 1.2  # wrong when run eagerly
        return (g * (1 - jnp.tanh(x) ** 2) * scale,)

    act.defvjp(lambda x: (jnp.tanh(x), x), bwd)
    p = {"w": jnp.linspace(-0.5, 0.5, 12).reshape(4, 3), "b": jnp.array([0.1, -0.2, 0.05])}
    x = jnp.linspace(-1, 1, 20).reshape(5, 4)

    def loss(p, x, key):
        h = act(x @ p["w"] + p["b"])
        h = jnp.where(jax.random.bernoulli(key, 0.8, h.shape), h / 0.8, 0.0)
        return jnp.mean(h**2)

    report = jaxcheck.verify(loss, p, x, jax.random.key(0), order=2, mode="both", transforms=True)
    assert report.status == "fail", str(report)
    [jit] = [c for c in report.checks if c.name.startswith("jit")]
    assert not jit.passed and jit.tolerance < 1e-3, str(report)
    modes = [c for c in report.checks if "forward vs reverse" in c.name]
    assert modes and all(c.tolerance < 1e-3 for c in modes), str(report)


def test_a_fn_no_transformation_can_trace_gets_its_rows_not_checked_and_said():
    """A boolean mask needs concrete values: verify evaluates fn eagerly, and each row,
    tracing it, was reported WRONG with a relative error of inf."""

    def masked(p, x):
        h = x @ p["w"] + p["b"]
        return jnp.sum(h[h > 0] ** 2)

    report = jaxcheck.verify(masked, PARAMS, X, transforms=True)
    assert report.status == "pass", str(report)
    assert not report.parts
    assert str(report).startswith("jaxcheck.verify: PASS — gradient is consistent with")
    [said] = [q for q in report.problems if q.startswith("transforms:")]
    assert said.startswith(
        "transforms: jit, vmap, checkpoint, forward vs reverse not checked: they trace fn, "
        "which needs concrete values (NonConcreteBooleanIndexError: Array boolean indices "
        "must be concrete"
    ), said
    assert said.endswith(
        "jnp.where for a mask, lax.cond for a branch), and pass flags as Python values in args"
    )


def test_a_numpy_grad_fn_gets_the_jit_row_not_checked_and_said():
    report = jaxcheck.verify(
        lambda p: jnp.sum(jnp.sin(p)),
        jnp.ones(3),
        grad_fn=lambda p: np.cos(np.asarray(p)),
        transforms=True,
    )
    assert report.status == "pass", str(report)
    said = [q for q in report.problems if q.startswith("transforms:")]
    assert said[0].startswith(
        "transforms: jit not checked: it traces fn or grad_fn, which needs concrete values "
        "(TracerArrayConversionError:"
    ), said
    assert said[1:] == [
        "transforms: vmap not checked, no argument of fn has a leading axis of size >= 2 to "
        "batch over",
        "transforms: with grad_fn, only jit and vmap are checked",
    ]


def test_transforms_off_is_the_default():
    report = jaxcheck.verify(mlp, PARAMS, X)
    assert report.ok and not report.parts


def test_transforms_option_is_validated():
    with pytest.raises(ValueError, match="transforms must be True or False, got 'all'"):
        jaxcheck.verify(mlp, PARAMS, X, transforms="all")
