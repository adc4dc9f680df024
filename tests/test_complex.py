"""Complex parameters and outputs, checked through their real (re, im) view."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcheck
from jaxcheck import _complex

Z = jnp.array([0.3 + 0.4j, -0.5 + 0.2j, 1.1 - 0.7j], jnp.complex64)
W = (
    (jnp.linspace(0.5, 1.5, 6) + 1j * jnp.linspace(-0.3, 0.4, 6))
    .reshape(3, 2)
    .astype(jnp.complex64)
)
X = jnp.array([1.0 + 0.5j, -2.0, 0.5j], jnp.complex64)


def failing(report):
    return [leaf.path for leaf in report.leaves if leaf.status == "fail"]


def test_real_view_round_trip_keeps_paths():
    params = {"z": Z, "r": jnp.ones(2)}
    paths = _complex.complex_paths(params)
    assert paths == frozenset({"['z']"})
    real = _complex.to_real(params, paths)
    assert real["z"].shape == (3, 2) and real["z"].dtype == jnp.float32
    np.testing.assert_array_equal(real["z"][:, 1], jnp.imag(Z))
    back = _complex.to_complex(real, paths)
    assert back["z"].dtype == jnp.complex64
    np.testing.assert_array_equal(back["z"], Z)


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, x: p["z"] ** 3,
        lambda p, x: jnp.exp(p["z"]),
        lambda p, x: x @ p["w"],
    ],
    ids=["cube", "exp", "matmul"],
)
@pytest.mark.parametrize("mode", ["reverse", "both"])
def test_holomorphic_functions_pass(fn, mode):
    report = jaxcheck.verify(fn, {"z": Z, "w": W}, X, mode=mode, num_directions=8)
    assert report.status == "pass", str(report)


@pytest.mark.parametrize(
    "fn",
    [
        lambda z: jnp.abs(z) ** 2,
        lambda z: jnp.conj(z) * z,
        jnp.real,
        lambda z: jnp.sum(jnp.abs(jnp.sin(z)) ** 2),  # a real loss of complex params
    ],
    ids=["abs2", "conj_z_z", "real", "real_loss"],
)
def test_non_holomorphic_functions_pass(fn):
    report = jaxcheck.verify(fn, Z, mode="both", num_directions=8)
    assert report.status == "pass", str(report)
    assert report.relative_error < 1e-6


def test_leaf_rows_show_the_complex_leaf():
    def fn(p):
        return jnp.sum(jnp.abs(p["z"] * p["s"]) ** 2)

    report = jaxcheck.verify(fn, {"z": Z, "s": jnp.float32(0.5)}, localize=True)
    assert report.ok, str(report)
    rows = {leaf.path: (leaf.shape, leaf.dtype) for leaf in report.leaves}
    assert rows == {"['s']": ((), "float32"), "['z']": ((3,), "complex64")}
    assert "['z']  (3,)   complex64" in str(report)


def test_float64_reference_is_complex128():
    seen = set()

    def fn(z):
        seen.add(str(z.dtype))  # at trace time: the dtypes fn is compiled for
        return jnp.sum(jnp.abs(z) ** 2)

    report = jaxcheck.verify(fn, Z)
    assert seen == {"complex64", "complex128"}
    assert report.reference_dtype == "float64" and report.tested_dtype == "float32"
    # |z|^2 has exact float64 differences, while float32 ones would be ~1e-4 off at
    # float32's step; what remains is the complex64 derivative's own rounding (0 on CPU,
    # 2e-8 measured on a GPU)
    assert report.relative_error < 1e-7


# -- planted conjugation bugs --------------------------------------------------------------


def abs2_with(bwd):
    @jax.custom_vjp
    def abs2(z):
        return jnp.real(z * jnp.conj(z))

    abs2.defvjp(lambda z: (abs2(z), z), bwd)
    return lambda p: jnp.sum(abs2(p["z"]) * jnp.arange(1.0, 4.0))


def square_with(bwd):
    @jax.custom_vjp
    def square(z):
        return z * z

    square.defvjp(lambda z: (z * z, z), bwd)
    return lambda p: square(p["z"])


@pytest.mark.parametrize(
    ("fn", "ok"),
    [
        (abs2_with(lambda z, g: (2.0 * jnp.conj(z) * g,)), True),
        (abs2_with(lambda z, g: (2.0 * z * g,)), False),  # the conjugate is missing
        (square_with(lambda z, g: (2.0 * z * g,)), True),  # holomorphic: no conjugate
        (square_with(lambda z, g: (2.0 * jnp.conj(z) * g,)), False),  # a spurious one
    ],
    ids=["abs2-right", "abs2-missing-conj", "square-right", "square-extra-conj"],
)
def test_custom_vjp_conjugation(fn, ok):
    report = jaxcheck.verify(fn, {"z": Z, "r": jnp.ones(2)}, num_directions=8)
    assert report.ok is ok, str(report)
    if not ok:
        assert report.relative_error > 0.3
        assert failing(report) == ["['z']"]
        assert "! wrong: ['z']" in str(report)


def sin_with(derivative):
    @jax.custom_jvp
    def sin(z):
        return jnp.sin(z)

    sin.defjvp(lambda p, t: (jnp.sin(p[0]), derivative(p[0]) * t[0]))
    return lambda p: sin(p["z"])


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_custom_jvp_real_only_rule_fails(mode):
    right = jaxcheck.verify(sin_with(jnp.cos), {"z": Z}, mode=mode, num_directions=8)
    assert right.ok, str(right)
    # a rule written for real inputs: cos of the real part only
    wrong = jaxcheck.verify(
        sin_with(lambda z: jnp.cos(jnp.real(z))), {"z": Z}, mode=mode, num_directions=8
    )
    assert wrong.status == "fail"
    assert failing(wrong) == ["['z']"]


# -- grad_fn, args, orders -----------------------------------------------------------------


def loss(p):
    return jnp.sum(jnp.abs(p["z"]) ** 2 + jnp.imag(p["z"] ** 2))


def test_grad_fn_uses_jax_convention():
    assert jax.grad(lambda z: jnp.abs(z) ** 2)(3.0 + 4.0j) == 6.0 - 8.0j
    right = jaxcheck.verify(loss, {"z": Z}, grad_fn=jax.grad(loss), num_directions=8)
    assert right.ok, str(right)

    def conjugated(p):
        return jax.tree.map(jnp.conj, jax.grad(loss)(p))

    wrong = jaxcheck.verify(loss, {"z": Z}, grad_fn=conjugated, num_directions=8)
    assert wrong.status == "fail" and failing(wrong) == ["['z']"]


def test_a_complex_grad_fn_for_a_real_leaf_is_told_to_be_real():
    """It was told "gradients must be floating point", which a complex gradient is."""

    def fn(p):
        return jnp.sum(jnp.abs(jnp.exp(1j * p["w"]) + p["w"]) ** 2)

    def grad_fn(p):  # the right values, typed complex
        return jax.tree.map(lambda g: g.astype(jnp.complex64), jax.grad(fn)(p))

    with pytest.raises(TypeError) as caught:
        jaxcheck.verify(fn, {"w": jnp.linspace(0.1, 1.0, 3)}, grad_fn=grad_fn)
    assert str(caught.value) == (
        "grad_fn returned dtype complex64 for the parameter leaf ['w'], whose dtype is "
        "float32: the gradient of a real fn in a real parameter is real, as jax.grad "
        "returns it. Return a real gradient (jnp.real of this one where its imaginary part "
        "is zero by construction; where it is not, that part is the bug)."
    )


@pytest.mark.parametrize("params", [Z, jnp.real(Z)], ids=["complex", "real"])
def test_grad_fn_of_a_complex_scalar_fn_is_refused_as_complex_not_as_non_scalar(params):
    def fn(z):  # a complex scalar (of complex or real parameters)
        return jnp.sum(jnp.sin(z) ** 2 * (1.0 + 0.5j))

    assert fn(params).shape == ()
    with pytest.raises(ValueError) as caught:
        jaxcheck.verify(fn, params, grad_fn=jax.grad(fn, holomorphic=True))
    message = str(caught.value)
    assert message.startswith("grad_fn was given, but fn returns a complex value: a hand-")
    assert "Leave grad_fn out to check JAX's derivatives of the complex fn" in message
    assert "does not return a scalar" not in message


def test_complex_args_are_held_fixed_and_python_complex_params_checked():
    report = jaxcheck.verify(lambda p, x: jnp.abs(p * x) ** 2, 1.0 + 2.0j, X)
    assert report.ok, str(report)


def test_complex_output_of_real_params():
    report = jaxcheck.verify(lambda w: jnp.exp(1j * w), jnp.linspace(0.0, 1.0, 3), mode="both")
    assert report.ok, str(report)


@pytest.mark.parametrize("mode", ["reverse", "both"])
def test_order_2_on_complex(mode):
    report = jaxcheck.verify(loss, {"z": Z}, order=2, mode=mode, num_directions=8)
    assert report.status == "pass", str(report)
    bad = jaxcheck.verify(
        abs2_with(lambda z, g: (2.0 * jax.lax.stop_gradient(jnp.conj(z)) * g,)),
        {"z": Z},
        order=2,
        num_directions=8,
    )
    # (the bwd is right in its cotangent: that part, on the real view, passes)
    assert [p.status.value for p in bad.parts] == ["pass", "fail", "pass"]
    assert bad.parts[2].label == "order 2: vjp map in its cotangent"
    assert failing(bad) == ["['z']"]
    assert bad.leaves[0].dtype == "complex64"


def test_raise_on_failure_with_complex():
    with pytest.raises(jaxcheck.GradientCheckError, match="wrong: \\['z'\\]"):
        jaxcheck.verify(abs2_with(lambda z, g: (2.0 * z * g,)), {"z": Z}, raise_on_failure=True)


def test_repeated_complex_check_compiles_nothing():
    def fn(p):  # a function no other test has compiled
        return jnp.sum(jnp.abs(jnp.tanh(p["z"])) ** 2), {"aux": p["z"]}

    checker = jaxcheck.Checker(fn, has_aux=True, num_directions=8)
    first = checker({"z": Z})
    later = checker({"z": Z * 0.5})
    assert first.ok and later.ok, str(later)
    assert first.num_compiled > 0 and later.num_compiled == 0


def _cexp(primal_conj=False):
    """exp(c z) as a custom_vjp with a correct backward pass (the transpose of the jvp,
    no conjugate); with `primal_conj`, its forward pass returns the conjugate instead."""
    c = 0.7 + 0.3j

    @jax.custom_vjp
    def cexp(z):
        return jnp.exp(c * z)

    def fwd(z):
        y = jnp.exp(c * z)
        return (jnp.conj(y) if primal_conj else y), z

    cexp.defvjp(fwd, lambda z, g: (g * c * jnp.exp(c * z),))
    return cexp


@pytest.mark.parametrize("primal_conj", [False, True])
def test_rule_rows_compare_imaginary_parts(primal_conj):
    """The rule's rows (primal, vmap, jit, checkpoint) compare real and imaginary parts:
    a forward pass whose primal has its imaginary part negated fails the primal row.
    Was: the imaginary parts were dropped (a ComplexWarning, an error under strict
    warnings), and that row passed with 0."""
    report = jaxcheck.verify_rule(_cexp(primal_conj), Z)
    rows = {c.name.split(":")[0]: c for c in report.checks}
    assert rows["primal"].passed is not primal_conj, str(report)
    if primal_conj:
        assert rows["primal"].relative_error > 0.1
    else:
        assert report.status == "pass", str(report)
        assert rows["primal"].relative_error < 1e-6


def test_complex_custom_jvp_rule_rows_pass():
    """A correct holomorphic custom_jvp: its transpose row (<u, J v> by jvp vs <J^T u, v> by
    vjp, bilinear as JAX's vjp) and linearity row take complex tangents, with real and
    imaginary parts."""

    @jax.custom_jvp
    def csin(z):
        return jnp.sin(z)

    csin.defjvp(lambda p, t: (csin(p[0]), jnp.cos(p[0]) * t[0]))
    report = jaxcheck.verify_rule(csin, Z)
    assert report.status == "pass", str(report)
    rows = {c.name.split(":")[0]: c for c in report.checks}
    assert rows["transpose"].relative_error < 1e-5, str(report)
    assert rows["jvp linear in the tangents"].relative_error < 1e-5, str(report)


def test_a_rule_that_conjugates_its_tangent_fails_against_finite_differences():
    """A custom_jvp whose jvp conjugates its tangent (a rule derived for real inputs,
    applied to complex ones). Its jvp is real-linear, and JAX's vjp is its transpose in the
    real part of the bilinear pairing, so the transpose row passes it (the complex values
    differ, as they do for every correct rule of a map that is not holomorphic); the
    finite differences, with complex directions, see that it is not the derivative of sin."""

    @jax.custom_jvp
    def csin(z):
        return jnp.sin(z)

    csin.defjvp(lambda p, t: (csin(p[0]), jnp.cos(p[0]) * jnp.conj(t[0])))
    report = jaxcheck.verify_rule(csin, Z)
    assert report.status == "fail", str(report)
    rows = {c.name.split(":")[0]: c for c in report.checks}
    assert rows["transpose"].passed
    assert not rows["vjp vs finite differences"].passed
    assert rows["vjp vs finite differences"].relative_error > 0.5


@pytest.mark.parametrize("scale", [1.0, 1.01, 1.0003])
def test_a_cast_of_float32_params_to_complex64_is_held_in_complex128(scale):
    """In the float64 reference the cast rounded to float32 quanta: at the float64 step
    only 2 of 16 directions were smooth, and the check went leaf by leaf; then it judged at
    float32 resolution, where a 3e-4 bug passed. In the model the cast rounds nothing, and
    the reference holds its values in complex128, as for a cast to float32."""
    a = jnp.linspace(-1.0, 1.0, 3)
    b = jnp.linspace(0.5, 2.0, 3)

    def fn(p):
        return jnp.sum(jnp.abs(p["a"].astype(jnp.complex64) * p["b"].astype(jnp.complex64)) ** 2)

    def grad_fn(p):
        g = jax.grad(fn)(p)
        return {"a": scale * g["a"], "b": g["b"]}

    report = jaxcheck.verify(fn, {"a": a, "b": b}, grad_fn=grad_fn)
    assert report.status == ("pass" if scale == 1.0 else "fail"), str(report)
    assert report.problems[0].startswith(
        "fn casts values computed from params to float32, which rounds nothing in the model "
        "(first at tests/test_complex.py:"
    )
    assert report.num_nonsmooth == 0 and report.tolerance < 2e-6, str(report)


@jax.custom_jvp
def _abs2(z):
    return jnp.real(z * jnp.conj(z))


@_abs2.defjvp
def _abs2_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    return _abs2(z), 2 * jnp.real(jnp.conj(z) * dz)


@jax.custom_jvp
def _cis(x):
    return jnp.exp(1j * x)


@_cis.defjvp
def _cis_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _cis(x)
    return y, 1j * y * dx


@pytest.mark.parametrize(
    "rule, inputs",
    [(_abs2, Z), (_cis, jnp.array([0.3, -0.5, 1.1]))],
    ids=["abs2-complex-to-real", "cis-real-to-complex"],
)
def test_rules_of_maps_that_are_not_holomorphic_are_their_own_transpose(rule, inputs):
    """A real-linear jvp and JAX's vjp are transposes in the real part of the bilinear
    pairing only (<u, J v> = 0.396 + 0j against <J^T u, v> = 0.396 - 0.174j for |z|^2):
    the transpose row compared the complex values and failed both correct rules."""
    report = jaxcheck.verify_rule(rule, inputs)
    assert report.status == "pass", str(report)
    [row] = [part for part in report.parts if part.label == "transpose"]
    assert row.status == "pass" and row.relative_error < 1e-6


@jax.custom_vjp
def _sin_complex_cotangent(x):
    return jnp.sin(x)


_sin_complex_cotangent.defvjp(
    lambda x: (jnp.sin(x), x),
    lambda x, g: (g * jnp.cos(x) + 0.5j * g,),  # complex for real x
)


@jax.custom_vjp
def _sin_real_cotangent(z):
    return jnp.sin(z)


_sin_real_cotangent.defvjp(
    lambda z: (jnp.sin(z), z), lambda z, g: (jnp.real(g * jnp.conj(jnp.cos(z))),)
)

_REAL = jnp.array([0.4, -1.2, 0.8], jnp.float32)
_KIND_CASES = {
    "complex cotangent of a real leaf": (
        lambda p: jnp.sum(_sin_complex_cotangent(p["x"]) * jnp.cos(p["y"])),
        {"x": _REAL, "y": jnp.array([0.3, 0.1, -0.2])},
        "the gradient (autodiff) of the real parameter leaf ['x'] (float32) is complex64: a "
        "custom_vjp's bwd returns a complex cotangent for a real input",
    ),
    "real cotangent of a complex leaf": (
        lambda p: jnp.sum(jnp.abs(_sin_real_cotangent(p["x"]) * p["y"]) ** 2),
        {"x": Z, "y": jnp.array([0.3, 0.1, 0.2])},
        "the reverse pass gives the complex parameter leaf ['x'] a real cotangent (float32): a "
        "custom_vjp's bwd returns a real cotangent for a complex input",
    ),
}


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("case", sorted(_KIND_CASES))
def test_a_cotangent_of_the_wrong_kind_fails_on_its_leaf(case, order):
    """A custom_vjp's bwd returning a complex cotangent for a real input (jax.grad passes it
    on) was passed, its imaginary part cast away with a ComplexWarning; one returning a real
    cotangent for a complex input raised a TypeError from jaxcheck's real view. Both fail,
    naming the leaf, without a warning."""
    fn, params, said = _KIND_CASES[case]
    report = jaxcheck.verify(fn, params, order=order)
    assert report.status == "fail"
    assert failing(report) == ["['x']"]
    assert any(said in q for q in report.problems), report.problems
    assert any("jaxcheck.verify_rule(rule, *args) names the rule" in q for q in report.problems)
    if order == 2:
        assert any("the orders above 1 were not checked" in q for q in report.problems)
    with pytest.raises(jaxcheck.GradientCheckError, match="names the rule"):
        jaxcheck.check_grads(lambda x, y: fn({"x": x, "y": y}), (params["x"], params["y"]), order)


@pytest.mark.rules_auto
@pytest.mark.parametrize("case", sorted(_KIND_CASES))
def test_a_cotangent_of_the_wrong_kind_with_its_rule_named_shows_no_numbers(case):
    """With the rule named, the report still advised how to name it, gave the rule
    "relative error nan (tolerance nan)", counted "16 directions per check, 0
    evaluations", and ended on advice about finite differences that were never taken."""
    fn, params, _ = _KIND_CASES[case]
    report = jaxcheck.verify(fn, params)
    text = str(report)
    assert report.status == "fail"
    (line,) = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert line.endswith(": vjp vs finite differences, cotangent types"), line
    assert not any("names the rule" in q for q in report.problems), report.problems
    assert "nan" not in text
    assert "  derivatives in float32; no finite differences were taken; compile " in text
    assert text.endswith(_UNMEASURED)


# the advice where what failed was no comparison with finite differences
_UNMEASURED = (
    "What failed was not compared with finite differences: the notes above say what is "
    "wrong (a derivative of another dtype than its parameter: a custom_vjp's bwd returning "
    "a complex cotangent for a real input, or a real one for a complex input) and which "
    "rule gives it."
)


@pytest.mark.parametrize("case", sorted(_KIND_CASES))
def test_verify_rule_of_a_rule_giving_a_cotangent_of_the_wrong_kind_names_that(case):
    """verify_rule of a rule whose bwd gives a cotangent of the wrong kind said "vjp vs
    finite differences is WRONG", advised itself ("verify_rule(rule, *args) names the
    rule") and ended on advice about finite differences, none of which were taken."""
    fn, params, _ = _KIND_CASES[case]
    rule = {"complex cotangent of a real leaf": _sin_complex_cotangent}.get(
        case, _sin_real_cotangent
    )
    report = jaxcheck.verify_rule(rule, params["x"])
    text = str(report)
    assert report.status == "fail"
    assert text.startswith("jaxcheck.verify_rule: FAIL — cotangent types are WRONG\n"), text
    assert not any("names the rule" in q for q in report.problems), report.problems
    assert "finite-difference noise floor" not in text
    assert text.endswith(_UNMEASURED)


@jax.custom_vjp
def _norm2_without_conjugate(z):
    return jnp.sum(jnp.abs(z) ** 2)


_norm2_without_conjugate.defvjp(
    lambda z: (_norm2_without_conjugate(z), z), lambda z, g: (2 * z * g,)
)


@jax.custom_jvp
def _sin_for_real_inputs(z):
    return jnp.sin(z)


_sin_for_real_inputs.defjvp(
    lambda p, t: (jnp.sin(p[0]), jnp.cos(jnp.real(p[0])).astype(p[0].dtype) * t[0])
)


@jax.custom_jvp
def _sin_right(z):
    return jnp.sin(z)


_sin_right.defjvp(lambda p, t: (jnp.sin(p[0]), jnp.cos(p[0]) * t[0]))

# complex, with real numbers only, and one of them 0
_ON_AXIS = jnp.array([0.3, -0.5, 0.0, 0.8], jnp.complex64)
_OFF_AXIS_NAME = "order 1: fn with imaginary parts added"


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize(
    "fn, z",
    [
        (_norm2_without_conjugate, _ON_AXIS),
        # (without the 0: |sin(z)|**2 there meets JAX's derivative 0 of abs at a complex 0)
        (lambda z: jnp.sum(jnp.abs(_sin_for_real_inputs(z)) ** 2), _ON_AXIS.at[2].set(0.6)),
    ],
    ids=["missing conjugate", "rule for real inputs"],
)
def test_a_rule_right_only_on_the_real_axis_fails_at_complex_params_holding_real_numbers(
    fn, z, order, mode
):
    """At a real z, z equals conj(z): a custom_vjp without the conjugate, and a custom_jvp
    written for real inputs, give the right derivative there, and their maps of order 2
    are wrong only off the real axis, where their finite differences run the same rule.
    Both passed at every order (so does JAX's check_grads). The check is repeated with
    imaginary parts added, and fails there, saying why."""
    if mode == "forward" and fn is _norm2_without_conjugate:
        pytest.skip("a custom_vjp has no forward mode")
    report = jaxcheck.verify(fn, z, order=order, mode=mode)
    assert report.status == "fail"
    with_aux = jaxcheck.verify(lambda z: (fn(z), "aux"), z, order=order, mode=mode, has_aux=True)
    assert with_aux.status == "fail" and with_aux.parts[1].label == _OFF_AXIS_NAME
    labels = [p.label for p in report.parts]
    assert labels[:2] == ["order 1: fn", _OFF_AXIS_NAME], labels
    assert [p.status.value for p in report.parts[:2]] == ["pass", "fail"]
    assert str(report).startswith(f"jaxcheck.verify: FAIL — {_OFF_AXIS_NAME} is WRONG\n")
    assert (
        f"{_OFF_AXIS_NAME}: the derivative agrees at params, where complex leaf (root) holds "
        "only real numbers, but not with imaginary parts of 0.5 times each entry's size "
        "added: at a real z, z equals conj(z), so a rule that leaves out a conjugate (z for "
        "jnp.conj(z)) or is written for real inputs (jnp.cos(jnp.real(z))) is right there "
        "and wrong off the real axis"
    ) in report.problems
    with pytest.raises(jaxcheck.GradientCheckError, match="f with imaginary parts added is WRONG"):
        jaxcheck.check_grads(fn, (z,), order, modes=("rev",))


@pytest.mark.parametrize(
    "fn, extra",
    [
        (lambda z: jnp.sum(jnp.abs(_sin_right(z)) ** 2), True),
        (lambda z: jnp.sum(jnp.abs(jnp.sin(z)) ** 2), False),  # JAX's own rules alone
    ],
    ids=["custom rule", "no rule"],
)
def test_complex_params_holding_real_numbers_are_checked_off_the_axis_where_fn_has_rules(fn, extra):
    z = _ON_AXIS.at[2].set(0.6)
    with jax.numpy_dtype_promotion("strict"):
        report = jaxcheck.verify(fn, z, order=2)
    assert report.status == "pass"
    assert (_OFF_AXIS_NAME in [p.label for p in report.parts]) is extra
    off_axis = jaxcheck.verify(fn, z + 0.1j, order=2)
    assert _OFF_AXIS_NAME not in [p.label for p in off_axis.parts]


def test_transforms_of_a_complex_output_pass_without_a_float64_request():
    """The transformation rows of a complex fn summed complex64 terms in float64, which
    counted as 64-bit (8 bytes): with 64-bit types off JAX warned that float64 is not
    available, and under -W error every row failed with an infinite error."""
    z = jnp.asarray([0.3 + 0.4j, -0.5 + 0.2j], jnp.complex64)
    report = jaxcheck.verify(jnp.exp, z, transforms=True)
    assert report.status == "pass", str(report)
    rows = {c.name.split(":")[0]: c for c in report.checks}
    assert {"jit", "checkpoint", "forward vs reverse"} <= set(rows), str(report)
    assert all(rows[k].relative_error < 1e-5 for k in ("jit", "checkpoint")), str(report)


def test_a_rule_taking_a_python_complex_parameter_is_checked():
    """A Python complex as params is differentiated as an array, but the search for rules
    traced only Python floats: a custom_vjp 10 % off, fed by it, was "not checked, no
    floating-point input that depends on params" while the check failed."""

    @jax.custom_vjp
    def cube(z):
        return z**3

    cube.defvjp(lambda z: (z**3, z), lambda z, g: (g * 3 * z**2 * 1.1,))
    report = jaxcheck.verify(lambda z: jnp.real(cube(z) * (1 + 2j)), complex(0.7, 0.3), rules=True)
    assert report.status == "fail", str(report)
    [wrong] = [q for q in report.problems if q.startswith("wrong rule: custom_vjp cube")]
    assert "relative error 1.0e-01" in wrong, wrong


def test_an_error_inside_fn_shows_its_complex_params_as_given():
    """The note added to fn's own error showed the real view jaxcheck checks a complex
    leaf through (float32[4, 4, 2]), not the complex64[4, 4] fn was given."""

    def fn(z):
        raise ValueError("its own error")

    with pytest.raises(ValueError, match="its own error") as info:
        jaxcheck.verify(fn, jnp.ones((4, 4), jnp.complex64))
    assert [n for n in getattr(info.value, "__notes__", []) if "jaxcheck" in n] == [
        "(raised inside fn, called by jaxcheck as fn(params, *args) with params = "
        "complex64[4, 4]; params, the argument differentiated, comes first)"
    ]
    # (check_grads calls f with its arguments as given: nothing to add)
    with pytest.raises(ValueError, match="its own error") as info:
        jaxcheck.check_grads(fn, (jnp.ones((4, 4), jnp.complex64),), 1)
    for err in (info.value, info.value.__cause__):
        assert not [n for n in getattr(err, "__notes__", []) if "jaxcheck" in n], err.__notes__


def test_kinks_of_complex_params_are_counted_by_part():
    """abs at one complex entry 0 is a kink in its real and its imaginary part: the note
    said "at 2 entries of params", of which there is one."""
    z = jnp.asarray([0j, 0.5 + 0.5j, -0.2 + 0.1j], jnp.complex64)
    report = jaxcheck.verify(lambda z: jnp.sum(jnp.abs(z)), z)
    assert report.status == "inconclusive", str(report)
    [said] = [q for q in report.problems if q.startswith("fn has kinks")]
    assert said.startswith(
        "fn has kinks (one-sided slopes that differ) at 2 real or imaginary parts of params' "
        "entries, found by moving each part alone; checked again with them held fixed, the "
        "others pass"
    ), said


@pytest.mark.parametrize("given", ["real", "complex"])
def test_a_real_grad_fn_for_complex_params_is_named(given):
    """A grad_fn returning a real array for a complex leaf failed with only "wrong:
    (root)", where a custom_vjp doing the same is told what it drops."""
    z = jnp.asarray([0.3 + 0.4j, -0.5 + 0.2j], jnp.complex64)
    grad_fn = {"real": lambda z: 2 * jnp.real(z), "complex": lambda z: 2.2 * jnp.conj(z)}[given]
    report = jaxcheck.verify(lambda z: jnp.sum(jnp.abs(z) ** 2), z, grad_fn=grad_fn)
    assert report.status == "fail", str(report)
    named = report.problems[0] == (
        "grad_fn returns a real array for the complex leaf (root): JAX's gradient of a real "
        "loss in a complex parameter is complex (dL/dx - i dL/dy for z = x + iy), and a real "
        "one leaves out the derivative along the imaginary parts"
    )
    assert named == (given == "real"), report.problems
