"""Correct gradients are never called wrong, and a pass always carries information."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import jaxcheck
from cases import scaled_sin


def _through(dtype):
    """The identity, rounded through `dtype` (a mixed-precision model's cast and back)."""
    return lambda x: lax.convert_element_type(lax.convert_element_type(x, dtype), x.dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "p",
    [jnp.float32(1.0), jnp.ones(3), jnp.linspace(-1.0, 1.0, 5), jnp.float32(0.3)],
    ids=["one", "ones", "linspace", "point3"],
)
def test_rounding_through_a_low_precision_is_never_wrong(dtype, p):
    """The float64 reference of a float16 staircase at a step far below its quantum is
    exactly 0: the step must cover several quanta, or the check must say it cannot judge."""
    report = jaxcheck.verify(lambda p: jnp.sum(_through(jnp.dtype(dtype))(p) ** 2), p)
    assert report.status in ("pass", "inconclusive"), str(report)
    assert any(f"rounds values computed from params to {dtype}" in q for q in report.problems)
    assert report.step > 0.05  # several quanta: eps^(1/3) of that dtype


@pytest.mark.parametrize("lo, hi", [(0.5, 1.5), (0.1, 1.0)])
def test_hard_cast_of_low_precision_params_is_not_a_vacuous_pass(lo, hi):
    """bfloat16 params cast to bfloat16 inside fn (a no-op there, invisible to the trace):
    in float64 the cast rounds, fn is a staircase, and finite differences are noise as
    large as the derivative: neither "wrong" nor a pass "in absolute terms"."""
    p = jnp.linspace(lo, hi, 4).astype(jnp.bfloat16)
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p.astype(jnp.bfloat16))), p)
    assert report.status == "inconclusive", str(report)


@pytest.mark.parametrize(
    "fn, p",
    [
        (lambda p: jnp.sum(scaled_sin(3.0)(p)), jnp.linspace(0.1, 1.0, 4).astype(jnp.bfloat16)),
        (lambda p: scaled_sin(3.0)(p), jnp.linspace(0.1, 1.0, 4).astype(jnp.bfloat16)),
        (lambda p: jnp.sum(scaled_sin(3.0)(p.astype(jnp.bfloat16))), jnp.linspace(0.1, 1.0, 4)),
        (lambda p: scaled_sin(3.0)(p.astype(jnp.bfloat16)), jnp.ones(3)),
        (
            lambda p: jnp.sum(scaled_sin(3.0)(p.astype(jnp.bfloat16))),
            jnp.linspace(0.5, 1.5, 4).astype(jnp.bfloat16),
        ),
    ],
    ids=["bf16-scalar", "bf16-vector", "f32-through-bf16", "f32-vector", "bf16-hard-cast"],
)
def test_three_times_too_large_on_bfloat16_does_not_pass(fn, p):
    report = jaxcheck.verify(fn, p)
    assert report.status in ("fail", "inconclusive"), str(report)
    assert not report.ok


def test_correct_rule_through_bfloat16_is_not_wrong():
    p = jnp.linspace(0.1, 1.0, 4)
    report = jaxcheck.verify(lambda p: jnp.sum(scaled_sin(1.0)(p.astype(jnp.bfloat16))), p)
    assert report.status in ("pass", "inconclusive"), str(report)
    # the rounding note is about float32 code paths, not about fn's own bfloat16
    assert not any("far above float32 rounding" in q for q in report.problems)


def test_both_modes_at_an_exactly_zero_gradient():
    """det of a rank-1 3x3 matrix: its gradient (the adjugate) is exactly zero, so the
    forward-vs-reverse comparison needs an absolute floor, as the others have."""
    m = jnp.asarray([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 6.0, 9.0]])
    report = jaxcheck.verify(jnp.linalg.det, m, mode="both")
    row = report.checks[-1]
    assert row.name.startswith("forward vs reverse")
    assert row.relative_error < 10, str(report)  # was 1e297
    assert row.passed, str(report)
    assert report.status == "pass", str(report)


def test_small_float16_outputs_do_not_overflow_the_cotangent():
    """1 / RMS of a float16 output of size 1e-5 is above float16's largest value: the
    cotangent must not become Inf (a NaN made by the check itself)."""
    p = jnp.linspace(0.1, 1.0, 4).astype(jnp.float16)
    report = jaxcheck.verify(lambda p: jnp.sin(p) * jnp.float16(1e-5), p, mode="both")
    assert report.status == "pass", str(report)
    assert report.relative_error < 1e-2


@pytest.mark.parametrize(
    "fn",
    [lambda p: jnp.sum(jnp.round(p * 3)), lambda p: jnp.argmax(p).astype(jnp.float32)],
    ids=["round", "argmax"],
)
def test_piecewise_constant_fn_is_said_to_be_flat(fn):
    report = jaxcheck.verify(fn, jnp.asarray([0.1, 0.2, 0.4, 0.7]))
    assert report.status == "pass", str(report)
    assert any("fn is flat here" in q and "zero everywhere nearby" in q for q in report.problems)


def test_piecewise_constant_fn_with_a_nonzero_rule_fails():
    """A straight-through estimator (round forward, identity backward) is not the
    derivative: fn stays flat even at the largest step, and the check says it is wrong."""

    @jax.custom_jvp
    def ste(x):
        return jnp.round(x)

    ste.defjvp(lambda primals, tangents: (ste(primals[0]), tangents[0]))
    report = jaxcheck.verify(lambda p: jnp.sum(ste(p * 3)), jnp.asarray([0.1, 0.2, 0.4, 0.7]))
    assert report.status == "fail", str(report)
    assert 0.05 in report.steps_tried


def test_float32_fallback_of_a_scan_takes_a_float32_step():
    """A scan whose float32 carry meets float64 parameters cannot run in float64: the
    fallback must not keep float64's step (6e-6) in float32."""
    c = jnp.arange(3.0, dtype=jnp.float32)

    def fn(p):
        body = lambda s, x: (jnp.sin(s * p + x), None)  # noqa: E731
        return lax.scan(body, jnp.zeros((), jnp.float32), c)[0]

    report = jaxcheck.verify(fn, jnp.float32(0.7))
    assert report.status == "pass", str(report)
    assert report.reference_dtype == "float32"
    assert any("could not run in float64" in q for q in report.problems)
    assert min(report.steps_tried) > 1e-3


@pytest.mark.parametrize("step", [0.2, 0.5])
def test_a_large_step_is_honoured(step):
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p)), jnp.linspace(0.1, 1.0, 4), step=step)
    assert report.status == "pass", str(report)
    assert report.steps_tried[0] == step
    assert max(report.steps_tried) == step  # never clamped to 0.05


@pytest.mark.parametrize("scale, status", [(1.0, "pass"), (1.03, "pass"), (1.5, "fail")])
def test_float16_closure_is_judged_at_a_large_step_where_fn_is_straight(scale, status):
    """lax.pad with a float16 padding value it closes over cannot be widened: finite
    differences stay in float16, where only a step of the parameters' own scale brings
    roundoff down; pad is linear, so that step is exact, and a 50 % wrong rule fails."""
    value = jnp.zeros((), jnp.float16)

    @jax.custom_jvp
    def pad(x):
        return lax.pad(x, value, [(1, 1, 0)])

    @pad.defjvp
    def _(primals, tangents):
        return pad(primals[0]), scale * lax.pad(tangents[0], value, [(1, 1, 0)])

    report = jaxcheck.verify(pad, jnp.linspace(0.5, 1.5, 3).astype(jnp.float16))
    assert report.status == status, str(report)
    assert report.step == pytest.approx(1.0)
    assert any("leave every input in its own dtype" in q for q in report.problems)
    if status == "pass":
        assert report.relative_error < 0.05
