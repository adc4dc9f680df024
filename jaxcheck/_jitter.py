"""The derivative under test's own rounding, where no higher-precision rule measures it.

A float32 derivative is compared with the same rule in float64, and their distance is its
rounding. A derivative tested in the reference's own precision (float64 models, or the
"native" policy) has nothing finer to be compared with, and where the derivative is
itself rounding (a residual that cancels to 1e-17 at an exact fit, which the gradient's
program and the finite differences' compute in different orders), a finite difference
that resolves its own rounding finely calls it wrong. Before a failure stands there, the
gradient is evaluated once more at params moved by a few ulps (relative, random signs, so
that zeros stay zeros and no kink at 0 is crossed): how far it moves is its rounding. A
wrong rule moves with the point no more than a right one, so a bug stays a failure.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _autodiff, _error_model, _plan, _precision
from ._error_model import SAFETY
from ._state import Run

JITTER_ULPS = 4  # relative move of every parameter entry, in eps of the tested dtype
WITHIN_ROUNDING = (
    "the derivative under test is off the finite differences by no more than it moves "
    f"itself when params move by {JITTER_ULPS} ulps (its own rounding: at a stationary "
    "point the derivative is rounding, computed differently by each program); not judged"
)


def explains(run: Run, p, weights) -> bool:
    """Whether the distance of the derivative under test from the finite differences of
    pass `p` (along directions whose per-leaf scales are `weights`) is within what the
    finite differences' noise and the derivative's rounding allow together."""
    if _precision.eps(run.reference) < _precision.eps(run.tested):
        return False  # a higher-precision rule measured the rounding already
    moved = _gradient_change(run)
    if moved is None:
        return False
    use = p.fd.smooth
    if not use.any():
        return False
    weights = np.asarray(weights, np.float64)
    rounding = math.sqrt(float(np.sum(np.square(weights) * moved)))
    noise = _error_model.rms(p.fd.bar[use])
    return apart(p, run.modes) <= SAFETY * math.hypot(noise, rounding)


def apart(p, modes) -> float:
    """RMS distance of the derivative under test from the finite differences, over the
    smooth directions, in the worse mode (absolute, per direction)."""
    use, worst = p.fd.smooth, 0.0
    for mode, a in (("reverse", p.rev), ("forward", p.fwd)):
        if mode in modes and a is not None and use.any():
            a = np.asarray(a, np.float64)[use]
            worst = max(worst, _error_model.rms(a - p.fd.value[use]))
    return worst


def _gradient_change(run: Run):
    """Per parameter leaf, the squared norm of the change of the gradient under test when
    every entry of params moves by JITTER_ULPS ulps (computed once per check); None
    where the gradient is not at hand (forward mode alone)."""
    if "jitter" in run.probe:
        return run.probe["jitter"]
    grad = run.probe.get("grad")
    moved = None
    if grad is not None:
        try:
            moved = _moved(run, grad)
        except Exception:  # noqa: BLE001 - only a reason not to fail: without it, none
            moved = None
    run.probe["jitter"] = moved
    return moved


def _moved(run: Run, grad):
    key = jax.random.key(0)
    diff = []
    for i, x in enumerate(run.inputs.diff):
        real = jnp.real(x).dtype
        sign = jax.random.rademacher(jax.random.fold_in(key, i), np.shape(x), real)
        diff.append(x + x * (JITTER_ULPS * _precision.eps(real)) * sign)
    program = functools.partial(_autodiff.probe, run.problem, True)
    values = run.timer.run(program, run.seeds[1], diff, run.inputs.traced(), None)
    moved = np.asarray(
        [float(np.sum(np.abs(_wide(g) - _wide(h)) ** 2)) for g, h in zip(grad, values["grad"])]
    )
    return moved if np.all(np.isfinite(moved)) else None


def _wide(x) -> np.ndarray:
    x = _plan.host_array(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)
