"""The public API: pytrees, held-fixed leaves, outputs, options, the report."""

import collections
import copy
import dataclasses
import functools
import json
import pickle
import types

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcheck
from cases import bug


def quartic(p):
    return sum(jnp.sum(jnp.sin(x) * x**2) for x in jax.tree_util.tree_leaves(p))


Pair = collections.namedtuple("Pair", ["a", "b"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    w: jax.Array
    b: jax.Array


@pytest.mark.parametrize(
    "params",
    [
        {"w": jnp.arange(1.0, 4.0), "b": jnp.asarray(0.5)},
        [jnp.ones((2, 2)), (jnp.arange(3.0), jnp.asarray([2.0]))],
        Pair(jnp.ones(3), jnp.full((2,), -1.5)),
        Params(jnp.ones((2, 3)), jnp.arange(2.0)),
        jnp.asarray(1.3),
        {"scalar": 2.0, "nested": {"x": np.linspace(0.1, 1.0, 4, dtype=np.float32)}},
    ],
    ids=["dict", "list-tuple", "namedtuple", "dataclass", "bare-array", "python-float-numpy"],
)
def test_pytree_kinds_pass(params, strict_ranks):
    report = jaxcheck.verify(quartic, params)
    assert report.status == "pass", str(report)
    assert report.ok


def test_held_fixed_leaves_are_listed_and_passed_through():
    seen = {}

    def loss(p):
        seen["step"], seen["name"], seen["act"] = p["step"], p["name"], p["act"]
        return jnp.sum(p["act"](p["w"]) ** 2) * (p["flag"] + 1)

    params = {
        "w": jnp.arange(1.0, 4.0),
        "step": jnp.asarray(3, jnp.int32),
        "flag": True,
        "name": "layer",
        "rng": jax.random.key(1),
        "act": jnp.tanh,
        "nothing": None,
        "tangent": np.zeros((2,), jax.dtypes.float0),
    }
    report = jaxcheck.verify(loss, params)
    assert report.status == "pass", str(report)
    fixed = dict(report.held_fixed)
    assert set(fixed) == {"['step']", "['flag']", "['name']", "['rng']", "['act']", "['tangent']"}
    assert fixed["['step']"] == "int32[]"
    assert fixed["['tangent']"] == "float0[2]"  # (not NumPy's [('float0', 'V')][2])
    assert "key<fry>" in fixed["['rng']"]
    assert seen["name"] == "layer" and seen["act"] is jnp.tanh
    assert "held fixed: ['act']" in str(report)


def test_python_floats_of_an_equinox_module_are_held_fixed_as_equinox_holds_them():
    """eqx.nn.Dropout keeps its rate, a Python float, behind a stop_gradient: differentiated
    as a parameter, it failed a correct model ("gradient is WRONG" on .layers[1].p), where
    eqx.filter_grad differentiates arrays only. A float field given as an array, and a
    Python float outside any Module, are still differentiated."""

    class Scaled(eqx.Module):
        scale: jax.Array
        eps: float = 1e-3

        def __call__(self, x):
            return self.scale * x / (1.0 + self.eps)

    model = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=jax.random.key(0)), eqx.nn.Dropout(0.3)])
    model = (model, Scaled(jnp.asarray(0.5)))
    x = jnp.linspace(-1.0, 1.0, 3)

    def loss(params, x):
        (net, scaled), temperature = params
        return jnp.sum(jnp.tanh(scaled(net(x, key=jax.random.key(2))) / temperature))

    report = jaxcheck.verify(loss, (model, 1.5), x)
    assert report.status == "pass", str(report)
    fixed = dict(report.held_fixed)
    assert fixed["[0][0].layers[1].p"] == "0.3" and fixed["[0][1].eps"] == "0.001", fixed
    assert not {"[0][1].scale", "[1]"} & set(fixed), fixed
    # the others are checked: a wrong derivative in the temperature fails there

    @jax.custom_jvp
    def off(t):
        return t

    off.defjvp(lambda primals, tangents: (primals[0], 1.01 * tangents[0]))
    wrong = jaxcheck.verify(lambda p, x: loss((p[0], off(p[1])), x), (model, 1.5), x)
    assert [leaf.path for leaf in wrong.leaves if leaf.status == "fail"] == ["[1]"], str(wrong)


@pytest.mark.parametrize("bugged", [False, True])
def test_a_python_float_in_args_reaches_a_rules_nondiff_argnums(bugged):
    """It was traced, and JAX refuses a tracer there (UnexpectedTracerError), where
    jax.grad(loss)(w, 2.0) runs."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def softplus(x, beta):
        return jnp.logaddexp(beta * x, 0.0) / beta

    def bwd(beta, x, g):  # the bug forgets beta
        return (g * jax.nn.sigmoid((1.0 if bugged else beta) * x),)

    softplus.defvjp(lambda x, beta: (softplus(x, beta), x), bwd)
    w = jnp.linspace(-2.0, 2.0, 6)
    report = jaxcheck.verify(lambda w, beta: jnp.sum(softplus(w, beta) ** 2), w, 2.0)
    assert report.status == ("fail" if bugged else "pass"), str(report)


def test_inputs_are_not_modified():
    w = jnp.arange(1.0, 5.0)
    x = np.linspace(-1, 1, 4).astype(np.float32)
    before_w, before_x = np.asarray(w).copy(), x.copy()
    jaxcheck.verify(lambda p, x: jnp.sum(jnp.tanh(p * x)), w, x)
    np.testing.assert_array_equal(np.asarray(w), before_w)
    np.testing.assert_array_equal(x, before_x)
    assert not w.is_deleted()


def test_x64_is_scoped_to_the_check():
    assert not jaxcheck._precision.x64_enabled()
    report = jaxcheck.verify(quartic, {"w": jnp.ones(3)})
    assert report.reference_dtype == "float64"
    assert not jaxcheck._precision.x64_enabled()
    assert jnp.zeros(2).dtype == jnp.float32


def test_pytree_output_and_aux():
    def fn(p, x):
        y = {"big": 1e3 * jnp.tanh(x @ p["w"]), "small": 1e-5 * jnp.sin(p["w"]).sum(0)}
        return y, {"count": jnp.asarray(1), "note": "not an array"}

    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)}
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    assert jaxcheck.verify(fn, params, x, has_aux=True).status == "pass"

    def buggy(p, x):  # 1 % error in the gradient reaching the tiny output only
        y, aux = fn(p, x)
        y["small"] = 1e-5 * jnp.sin(bug("scale", 0.01)(p["w"])).sum(0)
        return y, aux

    report = jaxcheck.verify(buggy, params, x, has_aux=True)
    assert report.status == "fail", str(report)
    assert report.relative_error > 1e-3


@pytest.mark.parametrize("mode", ["reverse", "forward", "both"])
def test_modes_on_custom_jvp(mode):
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return jnp.sin(x), jnp.cos(x) * t

    @jax.custom_jvp
    def g(x):
        return jnp.sin(x)

    @g.defjvp
    def g_jvp(primals, tangents):  # tangent off by 0.5 %
        (x,), (t,) = primals, tangents
        return jnp.sin(x), 1.005 * jnp.cos(x) * t

    p = jnp.linspace(0.1, 2.0, 5)
    good = jaxcheck.verify(lambda p: jnp.sum(f(p) ** 2), p, mode=mode)
    bad = jaxcheck.verify(lambda p: jnp.sum(g(p) ** 2), p, mode=mode)
    assert good.status == "pass", str(good)
    assert bad.status == "fail", str(bad)
    assert bad.relative_error == pytest.approx(0.005, rel=0.05)
    names = [c.name for c in good.checks]
    assert any(n.startswith(mode if mode != "both" else "forward vs reverse") for n in names)


def test_forward_vs_reverse_consistency_check():
    report = jaxcheck.verify(
        lambda p: {"y": jnp.tanh(p) * 2.0}, jnp.linspace(-1, 1, 6), mode="both"
    )
    consistency = [c for c in report.checks if c.name.startswith("forward vs reverse")]
    assert len(consistency) == 1 and consistency[0].passed
    assert consistency[0].relative_error < 1e-6


def test_custom_vjp_with_forward_mode():
    fn = lambda p: jnp.sum(bug("scale", 0.0)(p) ** 2)  # noqa: E731
    with pytest.raises(TypeError, match="custom_vjp function, which has no jvp. Use mode='rev"):
        jaxcheck.verify(fn, jnp.ones(3), mode="forward")
    report = jaxcheck.verify(fn, jnp.ones(3), mode="both")  # checks what it can, and says so
    assert report.status == "pass" and report.mode == "reverse"
    assert "only the reverse mode was checked" in str(report)
    bad = jaxcheck.verify(lambda p: jnp.sum(bug("scale", 0.01)(p) ** 2), jnp.ones(3), mode="both")
    assert bad.status == "fail"


def test_grad_fn_hand_written():
    def loss(p, x):
        return jnp.sum((x @ p["w"]) ** 2) + jnp.sum(p["b"] ** 2)

    def good(p, x):
        return {"w": 2 * x.T @ (x @ p["w"]), "b": 2 * p["b"]}

    def bad(p, x):
        return {"w": 2 * x.T @ (x @ p["w"]), "b": 2.02 * p["b"]}

    params = {"w": jnp.ones((3, 2)), "b": jnp.arange(1.0, 3.0)}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    assert jaxcheck.verify(loss, params, x, grad_fn=good).status == "pass"
    report = jaxcheck.verify(loss, params, x, grad_fn=bad)
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['b']"]
    assert "grad_fn" in report.checks[0].name


def test_raise_on_failure_raises_assertion_with_report():
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.verify(
            lambda p: jnp.sum(bug("scale", 0.1)(p) ** 3), jnp.ones(3), raise_on_failure=True
        )
    assert isinstance(info.value, AssertionError)
    assert info.value.report.status == "fail"
    text = str(info.value)
    assert text.startswith("jaxcheck.verify: FAIL")
    assert "autodiff" in text and "finite differences" in text
    assert type(info.value).__module__ == "jaxcheck"
    # and a passing check returns normally
    assert jaxcheck.verify(quartic, jnp.ones(3), raise_on_failure=True).ok


def test_report_contents_and_serialization():
    report = jaxcheck.verify(quartic, {"w": jnp.ones(3), "n": 3}, num_directions=16)
    # settled after the first 8 of the 16 directions (sequential directions)
    assert (report.num_directions, report.max_directions) == (8, 16)
    assert report.numeric.shape == (8,) and report.analytic.shape == (8,)
    np.testing.assert_allclose(report.numeric, report.analytic, rtol=1e-5)
    assert report.num_evaluations == 8 * 2 + 1 and report.stencil_points == 2  # settled at +-h
    assert report.interval[0] <= report.relative_error <= report.interval[1]
    assert report.compile_seconds > 0 and report.run_seconds > 0
    data = report.to_dict()
    assert json.loads(json.dumps(data))["status"] == "pass"
    assert data["ok"] is True and data["held_fixed"] == [["['n']", "3"]]
    leaves, treedef = jax.tree_util.tree_flatten(report)
    assert len(leaves) == 2
    assert jax.tree_util.tree_unflatten(treedef, leaves).status == "pass"
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.status = "fail"
    for copied in (report, pickle.loads(pickle.dumps(report)), copy.deepcopy(report)):
        with pytest.raises(ValueError, match="read-only"):
            copied.numeric[0] = 0.0
    text = str(report)
    first = "jaxcheck.verify: PASS — gradient is consistent with finite differences"
    assert text.splitlines()[0] == first
    assert "relative error" in text and "tolerance" in text


def test_same_key_same_result_and_leaf_directions_independent():
    p = {"a": jnp.linspace(0.1, 1.0, 5), "b": jnp.ones(2)}
    r1 = jaxcheck.verify(quartic, p, key=3)
    r2 = jaxcheck.verify(quartic, p, key=jax.random.key(3))
    np.testing.assert_array_equal(r1.numeric, r2.numeric)
    assert r1.relative_error == r2.relative_error
    r3 = jaxcheck.verify(quartic, p, key=4)
    assert not np.array_equal(r1.numeric, r3.numeric)


def test_equinox_module():
    model = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)

    def loss(m, x):
        return jnp.mean(jax.vmap(m)(x) ** 2)

    report = jaxcheck.verify(loss, model, x)
    assert report.status == "pass", str(report)
    fixed = [p for p, _ in report.held_fixed]
    assert any("activation" in p for p in fixed)


def test_flax_linen_params_with_planted_bug():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(8)(x))
            return nn.Dense(1)(x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    variables = Net().init(jax.random.key(0), x)

    def loss(v, x):
        return jnp.mean(Net().apply(v, x) ** 2)

    assert jaxcheck.verify(loss, variables, x).status == "pass"

    def buggy(v, x):
        kernel = v["params"]["Dense_0"]["kernel"]
        v = jax.tree_util.tree_map(lambda a: a, v)
        v["params"]["Dense_0"]["kernel"] = bug("scale", 0.02)(kernel)
        return loss(v, x)

    report = jaxcheck.verify(buggy, variables, x)
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == [
        "['params']['Dense_0']['kernel']"
    ]


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 16])
def test_chunking_does_not_change_the_directions(chunk_size):
    p = {"w": jnp.linspace(-1.0, 1.0, 7)}
    full = jaxcheck.verify(quartic, p, chunk_size=16)
    chunked = jaxcheck.verify(quartic, p, chunk_size=chunk_size)
    # the same directions; the step sizes may differ in their last bits, as the planned-small
    # problem (chunk_size=None) sums its parameters' squares on the host, in float64
    scale = np.max(np.abs(full.numeric))
    np.testing.assert_allclose(full.numeric, chunked.numeric, rtol=1e-7, atol=1e-9 * scale)
    assert chunked.status == "pass"


@pytest.mark.parametrize("fn", ["correct", "bug"])
def test_accelerator_plan_gives_the_cpu_verdict(monkeypatch, fn):
    """The GPU/TPU rule (all directions and stencil points vmapped) run on CPU: same
    directions, same numbers up to rounding, same verdict and localization."""
    from cases import mlp_data, mlp_loss, mlp_params
    from jaxcheck import _plan

    sizes = (4, 8, 3)
    params, (x, y) = mlp_params(sizes, jnp.float32), mlp_data(sizes, jnp.float32)
    loss = mlp_loss() if fn == "correct" else mlp_loss(bug("scale", 0.01), (0, "b"))
    cpu = jaxcheck.verify(loss, params, x, y)
    monkeypatch.setattr(_plan, "platform_of", lambda device: "gpu")
    plan = _plan.make_plan(
        jax.tree_util.tree_leaves(params),
        16,
        2,
        8,
        chunk_size=None,
        budget=None,
        direction_sharding=None,
    )
    assert plan.chunk is None and plan.vmap_points
    accelerator = jaxcheck.verify(loss, params, x, y)
    assert accelerator.status == cpu.status == ("pass" if fn == "correct" else "fail")
    np.testing.assert_allclose(accelerator.numeric, cpu.numeric, rtol=1e-7)
    failing = [leaf.path for leaf in accelerator.leaves if leaf.status == "fail"]
    assert failing == ([] if fn == "correct" else ["['layers'][0]['b']"])


@jax.custom_jvp
def _square_off(z):
    return z**2


@_square_off.defjvp
def _square_off_jvp(primals, tangents):  # the derivative 5 % off
    (z,), (t,) = primals, tangents
    return z**2, 2.1 * z * t


def _masked_data(square):
    def fn(p, x):
        return jnp.mean(square(p[0] * x[x > 0] - 1.0))

    return fn


def _masked_params(square):
    def fn(p, x):
        del x
        return jnp.sum(square(p[p > 0.3]) * p[p > 0.3])

    return fn


@pytest.mark.parametrize(
    ("masked", "bug", "order"),
    [(_masked_data, False, 1), (_masked_params, True, 1), (_masked_params, False, 2)],
)
def test_boolean_mask_indexing_runs_eagerly(masked, bug, order):
    """x[x > 0] has a shape that depends on values: jax.jit refuses it, jax.grad run op by
    op takes it (and check_grads), so the check runs eagerly instead of raising JAX's
    NonConcreteBooleanIndexError; a mask on params as on data."""
    fn = masked(_square_off if bug else jnp.square)
    p, x = jnp.array([0.2, 0.5, 0.9]), jnp.array([1.0, -1.0, 2.0, 0.5])
    report = jaxcheck.verify(fn, p, x, order=order, num_directions=8)
    assert report.status == ("fail" if bug else "pass"), str(report)
    assert any("(NonConcreteBooleanIndexError)" in q for q in report.problems), report.problems


def test_rademacher_directions():
    report = jaxcheck.verify(quartic, jnp.linspace(0.5, 1.5, 6), directions="rademacher")
    assert report.status == "pass"
    bad = jaxcheck.verify(
        lambda p: quartic(bug("scale", 0.01)(p)), jnp.linspace(0.5, 1.5, 6), directions="rademacher"
    )
    assert bad.status == "fail"


def test_numpy_loss_and_gradient_run_eagerly():
    """A textbook NumPy loss and hand-written gradient cannot be traced; they still check."""
    r = np.random.default_rng(0)
    x = r.random((50, 1)).astype(np.float32)
    y = (3 * x + 2 + r.random((50, 1))).astype(np.float32)

    def loss(p, x, y):
        return float(np.mean((x @ np.asarray(p["w"]) + np.asarray(p["b"]) - y) ** 2))

    def grad(p, x, y, bias_factor=1.0):
        residual = x @ np.asarray(p["w"]) + np.asarray(p["b"]) - y
        n = x.shape[0]
        return {"w": 2 / n * x.T @ residual, "b": bias_factor * 2 / n * residual.sum(0)}

    params = {"w": np.array([[0.5]], np.float32), "b": np.array([0.1], np.float32)}
    good = jaxcheck.verify(loss, params, x, y, grad_fn=grad)
    assert good.status == "pass", str(good)
    assert any("evaluated eagerly" in p for p in good.problems)
    bad = jaxcheck.verify(loss, params, x, y, grad_fn=lambda p, x, y: grad(p, x, y, 1.01))
    assert bad.status == "fail"
    assert [leaf.path for leaf in bad.leaves if leaf.status == "fail"] == ["['b']"]


def test_an_eager_check_compiles_nothing_new_for_new_values(caplog):
    """Run eagerly, every operation of the check dispatches a program compiled for its
    shapes; its reductions were built around a fresh function each time, compiled anew
    at every direction (352 programs, a minute, for 8 leaves of 3 entries)."""

    def fn(t):
        return float(sum(np.sum(np.sin(np.asarray(v))) for v in t.values()))

    def grad_fn(t):
        return {k: np.cos(np.asarray(v)) * (1.01 if k == "l2" else 1.0) for k, v in t.items()}

    for start in (0.1, 0.2):  # the first check compiles what the second reuses
        caplog.clear()
        params = {f"l{i}": np.full((3,), start + i * 1e-2) for i in range(8)}
        with caplog.at_level("WARNING", logger="jax"), jax.log_compiles():
            report = jaxcheck.verify(fn, params, grad_fn=grad_fn)
        assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['l2']"]
    messages = [r.getMessage() for r in caplog.records]
    compiled = [m.split()[4] for m in messages if m.startswith("Finished XLA compilation")]
    assert len(compiled) < 5, compiled


def _host_sin(scale):
    """sin by NumPy through jax.pure_callback (no vmap_method: jax.vmap refuses it), with a
    custom_jvp whose derivative is `scale` times the right one."""

    def host(fn, x):
        return jax.pure_callback(fn, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    @jax.custom_jvp
    def host_sin(x):
        return host(np.sin, x)

    @host_sin.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return host_sin(x), scale * host(np.cos, x) * t

    return host_sin


@pytest.mark.parametrize(
    "mode, size",
    [
        ("reverse", 5),
        ("forward", 5),
        ("both", 5),
        # above `_plan.SMALL_PROBLEM` with 16 directions of 2 points: not batched on CPU
        ("reverse", 20000),
        ("forward", 20000),
        ("both", 20000),
    ],
)
def test_fn_that_jax_vmap_refuses_is_checked_direction_by_direction(mode, size):
    x = jnp.linspace(0.1, 1.0, size)
    loss = lambda f: lambda p: jnp.sum(f(p) ** 2)  # noqa: E731
    with pytest.raises(NotImplementedError, match="vmap"):
        jax.vmap(_host_sin(1.0))(jnp.ones((2, 3)))
    good = jaxcheck.verify(loss(_host_sin(1.0)), x, mode=mode)
    assert good.status == "pass", str(good)
    assert good.relative_error < 1e-6
    # in float64 even where XLA calls back from a thread of its own (there JAX reads the
    # global 64-bit setting, off here)
    assert str(good.reference_dtype) == "float64", good.problems
    # a small problem is planned all-vmapped, then falls back; a larger one runs one
    # direction at a time on CPU anyway, with nothing batched (accelerators batch it)
    if size == 5 or jax.default_backend() != "cpu":
        assert good.problems[0].startswith(
            "fn cannot be batched by jax.vmap (NotImplementedError: vmap is only supported "
            "for the pure_callback primitive when vmap_method is one of "
        )
        assert "Got vmap_method=None.); its directions" in good.problems[0]
        assert good.problems[0].endswith(
            "its directions and stencil points were evaluated one at a time, which is slower"
        )
    else:
        assert not any("vmap" in p for p in good.problems), good.problems
    bad = jaxcheck.verify(loss(_host_sin(1.01)), x, mode=mode)
    assert bad.status == "fail"
    assert bad.relative_error == pytest.approx(0.01, rel=0.05)


def test_fn_that_jax_vmap_refuses_cannot_have_its_directions_sharded():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    with pytest.raises(ValueError, match="Leave direction_sharding=None") as info:
        jaxcheck.verify(_host_sin(1.0), jnp.ones(3), direction_sharding=sharding)
    assert str(info.value).startswith(
        "fn cannot be batched by jax.vmap (NotImplementedError: vmap is only"
    )
    assert "Got vmap_method=None.), and direction_sharding" in str(info.value)


def test_second_check_of_the_same_function_compiles_nothing():
    from jaxcheck import _plan

    def loss(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"]) ** 2)

    p = {"w": jnp.ones((3, 2))}
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    first = jaxcheck.verify(loss, p, x)
    before = _plan.compilations
    second = jaxcheck.verify(loss, {"w": jnp.full((3, 2), 0.5)}, 2 * x)
    assert _plan.compilations == before
    assert second.compile_seconds < 0.05 < first.compile_seconds
    assert second.status == "pass"
    jaxcheck.verify(loss, {"w": jnp.ones((3, 3))}, jnp.ones((4, 3)))  # new shapes: compiles
    assert _plan.compilations > before


@pytest.mark.parametrize("changed", ["rule setting", "grad_fn setting", "global model"])
def test_the_same_function_checked_after_what_it_reads_changed_is_checked_anew(changed):
    """verify reused the programs compiled for the same fn object: a custom_vjp whose bwd
    read a setting, 50 % wrong after the setting changed, passed with the first check's
    numbers (a new lambda around it failed)."""
    setting = {"scale": 1.0}
    model = {"act": jnp.sin}

    @jax.custom_vjp
    def act(x):
        return jnp.sin(x)

    act.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (setting["scale"] * g * jnp.cos(x),))

    def loss(w):
        return jnp.sum((act(w) if changed == "rule setting" else model["act"](w)) ** 2)

    def grad_fn(w):
        return setting["scale"] * 2 * jnp.sin(w) * jnp.cos(w)

    kw = {"grad_fn": grad_fn} if changed == "grad_fn setting" else {}
    w = jnp.linspace(0.1, 1.0, 5)
    assert jaxcheck.verify(loss, w, **kw).status == "pass"
    if changed == "global model":
        model["act"] = jnp.tanh  # loss is now another function; its jax.grad is right
        assert jaxcheck.verify(loss, w).status == "pass"
        setting["scale"] = 1.5
        model["act"] = act
    else:
        setting["scale"] = 1.5
    report = jaxcheck.verify(loss, w, **kw)
    assert report.status == "fail", str(report)
    assert report.relative_error == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize(
    "case", ["python if on a float arg", "forward-only custom_jvp", "new Checker", "signed zero"]
)
def test_a_changed_function_is_not_checked_with_stale_programs(case):
    """Where the fingerprint could not see the change, the programs of the first check ran
    again: a float arg fn branches on made it untraceable (the check holds Python numbers
    fixed, the fingerprint traced them); a forward-only fn showed its custom_jvp rule only
    by name; a new Checker took the programs of an older one of the same fn; 0.0 and -0.0
    were the same static argument."""
    setting = {"scale": 1.0}

    @jax.custom_jvp
    def act(x):
        return jnp.sin(x)

    act.defjvp(lambda p, t: (jnp.sin(p[0]), setting["scale"] * jnp.cos(p[0]) * t[0]))
    p = jnp.linspace(0.1, 1.0, 5)
    if case == "python if on a float arg":

        def fn(p, temp):
            return jnp.sum(jnp.sin(p) ** 2) * (1.0 if temp > 0 else 2.0)

        def grad_fn(p, temp):
            return (setting["scale"] if temp > 0 else 2.0) * 2 * jnp.sin(p) * jnp.cos(p)

        check = functools.partial(jaxcheck.verify, fn, p, 0.5, grad_fn=grad_fn)
    elif case == "forward-only custom_jvp":

        def fn(p):  # a while_loop: forward mode only
            _, v = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, act(c[1])), (0, p))
            return jnp.sum(v)

        check = functools.partial(jaxcheck.verify, fn, p, mode="forward")
    elif case == "new Checker":

        def fn(p):
            return jnp.sum(act(p) ** 2)

        def check():
            return jaxcheck.Checker(fn, mode="forward")(p)
    else:  # arctan2(0.0, -1) = pi, arctan2(-0.0, -1) = -pi

        def fn(p, s):
            return jnp.sum(p * jnp.arctan2(s, -1.0))

        def grad_fn(p, s):
            return jnp.full_like(p, np.pi)

        assert jaxcheck.verify(fn, p, 0.0, grad_fn=grad_fn).status == "pass"
        assert jaxcheck.verify(fn, p, -0.0, grad_fn=grad_fn).status == "fail"
        return

    assert check().status == "pass"
    setting["scale"] = 1.3
    assert check().status == "fail"


def test_a_large_numpy_constant_unchanged_compiles_nothing_and_changed_is_seen():
    """A closed-over NumPy array beyond 65536 elements was keyed by the identity of the
    wrapper JAX makes anew each trace: every check compiled again, and a reused address
    could return another array's programs. Then by a sample of its values: one entry
    changed in place between two sampled ones reused the programs of the array before."""
    table = np.ones(70_000, np.float32)

    def fn(p):
        return jnp.sum(jnp.sin(p) ** 2)

    def grad_fn(p):
        return 2 * jnp.sin(p) * jnp.cos(p) * jnp.asarray(table)[:3]

    p = jnp.linspace(0.1, 1.0, 3)
    assert jaxcheck.verify(fn, p, grad_fn=grad_fn).status == "pass"
    again = jaxcheck.verify(fn, p, grad_fn=grad_fn)
    assert (again.status, again.num_compiled) == ("pass", 0)
    table[1] = 1.5  # in place, one entry: the same object, one other value
    assert jaxcheck.verify(fn, p, grad_fn=grad_fn).status == "fail"
    table[1] = 1.0
    assert jaxcheck.verify(fn, p, grad_fn=grad_fn).status == "pass"


@pytest.mark.parametrize("bugged", [False, True])
def test_checker_compiles_once_across_a_loop(bugged):
    """A training-loop style use: new parameter values and data every step, same shapes.
    A failing check (full stencil and localization) also compiles only on its first call."""

    def loss(p, x):
        w = bug("scale", 0.01)(p["w"]) if bugged else p["w"]
        return jnp.mean(jnp.tanh(x @ w + p["b"]) ** 2)

    checker = jaxcheck.Checker(loss, num_directions=8)
    reports = []
    for step in range(4):
        p = {"w": jnp.full((3, 2), 0.3 + 0.1 * step), "b": jnp.zeros(2)}
        x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3) * (1 + step)
        reports.append(checker(p, x))
        if step == 0:
            first = checker.compilations
    assert first > 0 and checker.compilations == first
    assert [r.num_compiled for r in reports[1:]] == [0, 0, 0]
    assert {r.status.value for r in reports} == {"fail" if bugged else "pass"}
    checker({"w": jnp.ones((3, 3)), "b": jnp.zeros(3)}, jnp.ones((4, 3)))  # new shapes
    assert checker.compilations > first
    assert repr(checker) == "Checker(loss, num_directions=8)"


def test_a_checker_keeps_a_leaf_it_found_packed_so_drifting_biases_compile_once_each():
    """Which small leaves hold entries spanning more than 1e3 (moved by their own sizes) is
    part of the programs' key; in training, bias entries drift through zero, and a
    periodic check compiled at nearly every call. A checker keeps a leaf it once found so
    packed: three biases each crossing zero in turn compile three times, not six."""

    def loss(p, x):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"] + p["b2"])
        return jnp.mean((h @ p["w3"] + p["b3"]) ** 2)

    keys = jax.random.split(jax.random.key(0), 3)
    p = {
        "w1": jax.random.normal(keys[0], (4, 8)) / 2,
        "b1": jnp.linspace(0.1, 0.3, 8),
        "w2": jax.random.normal(keys[1], (8, 8)) / 3,
        "b2": jnp.linspace(-0.3, -0.1, 8),
        "w3": jax.random.normal(keys[2], (8, 2)) / 3,
        "b3": jnp.asarray([0.2, -0.1]),
    }
    x = jnp.linspace(-1.0, 1.0, 24).reshape(6, 4)
    checker = jaxcheck.Checker(loss, num_directions=8)
    compiled = []
    for near_zero in (["b1"], ["b2"], ["b3"], ["b1", "b2"], ["b2", "b3"], ["b1", "b3"]):
        q = {**p, **{k: p[k].at[0].set(1e-5) for k in near_zero}}
        report = checker(q, x)
        assert report.status == "pass", str(report)
        compiled.append(report.num_compiled > 0)
    assert compiled == [True, True, True, False, False, False]


def test_a_checkers_programs_serve_no_other_check_of_a_changed_fn():
    """A checker compiles a program for new shapes from fn as it is then, while its key is
    what fn computed at its first call: that program must not serve a new checker (or
    verify) of fn as it was then. A new checker of a buggy fn passed on a program
    compiled by an older checker after the bug was fixed in between."""
    scale = {"bwd": 1.01}

    @jax.custom_vjp
    def ident(w):
        return w

    ident.defvjp(lambda w: (w, None), lambda _, g: (g * scale["bwd"],))

    def loss(p):
        return jnp.sum(jnp.sin(ident(p)))

    old = jaxcheck.Checker(loss)
    assert old(jnp.linspace(0.1, 1.0, 3)).status == "fail"
    scale["bwd"] = 1.0  # fixed, then checked at new shapes: fn as it is now
    assert old(jnp.linspace(0.1, 1.0, 4)).status == "pass"
    scale["bwd"] = 1.01  # the bug back, as at the old checker's first call
    assert jaxcheck.verify(loss, jnp.linspace(0.1, 1.0, 4)).status == "fail"
    new = jaxcheck.Checker(loss)
    assert new(jnp.linspace(0.1, 1.0, 3)).status == "fail"
    assert new(jnp.linspace(0.1, 1.0, 4)).status == "fail"
    assert old(jnp.linspace(0.1, 1.0, 4)).num_compiled == 0  # its own programs stay its own


def test_a_checker_whose_fn_changed_says_so_where_its_programs_disagree():
    """A checker reuses the programs of its first call; a leaf check compiled later traces
    fn as it is then, and the two disagree like a fn that jumps: the report says that a
    changed fn is a cause, and how to check it."""
    scale = {"sin": 1.0}

    @jax.custom_vjp
    def act(z):
        return jnp.tanh(z)

    def bwd(z, g):  # 5 % off where |z| > 2: the second call's params reach it
        d = 1 - jnp.tanh(z) ** 2
        return (g * jnp.where(jnp.abs(z) > 2.0, 1.05 * d, d),)

    act.defvjp(lambda z: (jnp.tanh(z), z), bwd)

    def loss(p, x):
        return jnp.sum(act(p["c"] * x)) + scale["sin"] * jnp.sum(jnp.sin(p["w"] * x))

    x = jnp.linspace(0.5, 1.0, 3)
    checker = jaxcheck.Checker(loss)
    params = {"c": jnp.full(3, 0.5), "w": jnp.ones(3)}
    assert checker(params, x).ok
    scale["sin"] = 3.0
    report = checker({"c": jnp.full(3, 4.0), "w": jnp.ones(3)}, x)
    assert report.status == "inconclusive", str(report)
    (note,) = [p for p in report.problems if "scatter" in p]
    assert note.endswith(
        "this check ran through a Checker, which reuses the programs it traced first: if "
        "fn, or a global or setting it reads, changed since, its programs traced now "
        "disagree with those, so make a new Checker for the new fn"
    )
    # at a checker's first call nothing it reuses was traced before: no such note
    jumping = jaxcheck.Checker(lambda p: jnp.sum(jnp.round(p)))(jnp.asarray([0.5, 1.5, 2.5]))
    assert jumping.status == "inconclusive"
    assert not any("ran through a Checker" in q for q in jumping.problems), jumping.problems
    fresh = jaxcheck.Checker(loss)({"c": jnp.full(3, 4.0), "w": jnp.ones(3)}, x)
    assert [(leaf.path, leaf.status.value) for leaf in fresh.leaves] == [
        ("['c']", "fail"),
        ("['w']", "pass"),
    ]
    assert not any("scatter" in p for p in fresh.problems)


def test_complex_data_in_args_is_held_fixed():
    signal = jnp.exp(1j * jnp.linspace(0.0, 3.0, 8)).astype(jnp.complex64)

    def loss(p, s):
        return jnp.sum(jnp.abs(jnp.fft.fft(s * p["w"])) ** 2)

    report = jaxcheck.verify(loss, {"w": jnp.linspace(0.5, 1.5, 8)}, signal)
    assert report.status == "pass", str(report)


def test_a_row_not_judged_shows_no_tolerance_of_one_or_more():
    """A straight-through estimator's leaf (fn is flat along it, its rule is the identity
    on purpose) was shown "tolerance 2.0e+00 ... not judged": a relative error that large
    bounds nothing. Such a row shows no tolerance, failed for another reason (fn piecewise
    constant about params) too; the report's number is kept."""

    @jax.custom_vjp
    def rounded(x):
        return jnp.round(x)

    rounded.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x, y = jax.random.normal(k[0], (8, 5)), jax.random.normal(k[3], (8,))
    params = {"w": jax.random.normal(k[1], (5, 4)) / 2, "v": jax.random.normal(k[2], (4,)) / 2}
    report = jaxcheck.verify(
        lambda p: jnp.mean((rounded(x @ p["w"] * 2) @ p["v"] - y) ** 2), params, rules=True
    )
    text = str(report)
    [leaf] = [line.split() for line in text.splitlines() if line.strip().startswith("['w']")]
    assert leaf[-2:] == ["—", "FAIL"], text
    [rule] = [line.split() for line in text.splitlines() if line.strip().startswith("rule ")]
    # (the rule alone, at the inputs fn gives it, fails under jax 0.10 and is not judged
    # under jax 0.9: either way its tolerance of 2 is not shown)
    assert rule[-2:] == ["—", "FAIL"] or rule[-3:] == ["—", "not", "judged"], text
    [part] = [p for p in report.parts if p.leaves]
    assert [leaf.tolerance for leaf in part.leaves if leaf.path == "['w']"] == [
        pytest.approx(2.0, rel=1e-12)
    ]


@pytest.mark.parametrize(
    "wrong, factor",
    [
        (lambda g: g / 2, "0.5"),
        (lambda g: -g, "-1"),
        (lambda g: 1.01 * g, "1.01"),
        (lambda g: 1.0002 * g, "1.0002"),  # (printed as "1" once)
        (lambda g: g.at[0].mul(2.0), None),  # one entry off: no constant factor
    ],
)
def test_a_derivative_off_by_a_constant_factor_is_said_so(wrong, factor):
    """The commonest slip in a hand-derived gradient, a constant factor (a sign, a 2, a
    mean taken for a sum), read as any other failure."""

    def fn(p):
        return jnp.sum(jnp.sin(p) ** 2)

    report = jaxcheck.verify(
        fn, jnp.linspace(0.1, 0.9, 5), grad_fn=lambda p: wrong(jax.grad(fn)(p))
    )
    assert report.status == "fail"
    said = [q for q in report.problems if q.startswith("the derivative under test is ")]
    if factor is None:
        assert said == [], said
        return
    assert len(said) == 1 and said[0].startswith(
        f"the derivative under test is {factor} times fn's along every direction (to within "
    ), said
    assert said[0].endswith(
        "a constant factor wrong (a sign, a factor of 2, a mean taken for a sum, a scale left "
        "out), or a rule that scales or reverses its gradient on purpose (a gradient-reversal "
        "layer)"
    )


def test_a_wrong_derivative_of_one_entry_is_not_called_a_constant_factor():
    """With params of one entry every derivative is a multiple of fn's: nothing to say."""
    report = jaxcheck.verify(
        lambda p: jnp.sin(p) ** 2, jnp.float32(0.3), grad_fn=lambda p: 3 * jnp.sin(p) * jnp.cos(p)
    )
    assert report.status == "fail"
    assert not [q for q in report.problems if q.startswith("the derivative under test is ")]


@jax.custom_vjp
def _one(x):  # 1 everywhere: its derivative is 0
    return jnp.sin(x) ** 2 + jnp.cos(x) ** 2


_one.defvjp(lambda x: (_one(x), x), lambda x, g: (g * jnp.cos(x),))


@pytest.mark.rules_auto
def test_a_wrong_derivative_of_a_flat_fn_is_not_called_a_constant_factor():
    """Where fn's derivative is zero to within noise, its tolerance counts in units of
    noise (2), and a least-squares factor fitted to that noise, 97 % off, read "the
    derivative under test is -7.28e+09 times fn's"."""
    x = jnp.array([0.3, -0.7, 1.1])
    for report in (
        jaxcheck.verify(lambda p: jnp.sum(_one(p["w"])), {"w": x}),
        jaxcheck.verify_rule(_one, x),
    ):
        assert report.status == "fail", str(report)
        assert not [q for q in report.problems if "times fn's" in q or "times its" in q], str(
            report
        )


def test_a_constant_factor_on_one_leaf_is_named_on_that_leaf():
    """A factor on one leaf only leaves the all-leaf comparison no multiple of fn's; the
    leaf's own check is, and its note names the leaf."""

    def fn(p):
        return jnp.sum(jnp.sin(p["w"]) ** 2) + jnp.sum(jnp.cos(p["b"]) * p["w"][:2])

    params = {"w": jnp.linspace(0.1, 0.9, 5), "b": jnp.array([0.3, 0.4])}

    def halved_w(p):
        g = jax.grad(fn)(p)
        return {"w": g["w"] * 0.5, "b": g["b"]}

    report = jaxcheck.verify(fn, params, grad_fn=halved_w)
    assert report.status == "fail"
    said = [q for q in report.problems if "times fn's along every direction" in q]
    assert len(said) == 1 and said[0].startswith(
        "['w']: the derivative under test is 0.5 times fn's along every direction of it"
    ), report.problems
    # the leaf is named wrong before its note says how
    assert report.problems.index("wrong: ['w']") < report.problems.index(said[0])


def test_all_names_the_public_api_and_nothing_else():
    public = {
        name
        for name in dir(jaxcheck)
        if not name.startswith("_") and not isinstance(getattr(jaxcheck, name), types.ModuleType)
    }
    assert set(jaxcheck.__all__) == public
    assert "importlib" not in jaxcheck.__all__
    for name in jaxcheck.__all__:
        assert getattr(jaxcheck, name).__module__.startswith("jaxcheck"), name


def test_a_headline_at_a_stationary_point_says_its_error_is_absolute():
    """At a stationary point the errors are in units of the finite differences' noise or
    the derivative's rounding; the headline called them "relative error" beside a
    tolerance of 2 and a noise floor of 1."""
    report = jaxcheck.verify(lambda p: jnp.sum(p**2), jnp.zeros(3))
    assert report.ok
    headline = str(report).splitlines()[1]
    assert headline.startswith("  error 0.0e+00 (95% 0.0e+00..1.0e+00), tolerance 2.0e+00")
    assert headline.endswith(
        "; absolute: in units of the finite differences' noise or the derivative's rounding, "
        "as the derivative is zero to within them"
    )
    away = jaxcheck.verify(lambda p: jnp.sum(p**2), jnp.ones(3))
    assert str(away).splitlines()[1].startswith("  relative error ")
