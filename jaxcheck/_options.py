"""`Options`: every setting of a check, validated once, shared by `verify`, `Checker` and
`check_grads`."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np

from . import _directions, _precision

MODES = ("reverse", "forward", "both")


@dataclasses.dataclass(frozen=True)
class Options:
    """The keyword options of `jaxcheck.verify` (see its docstring for each), validated
    when made: a bad value raises `TypeError`/`ValueError` saying what to pass instead."""

    grad_fn: Callable | None = None
    has_aux: bool = False
    order: int = 1
    num_directions: int = 16
    sequential: bool = True
    key: Any = 0
    mode: Literal["reverse", "forward", "both"] = "reverse"
    precision: Literal["auto", "float64", "native"] = "auto"
    step: float | None = None
    rtol: float | None = None
    localize: bool | Literal["auto"] = "auto"
    leaf_directions: int = 8
    directions: Literal["uniform", "rademacher", "gaussian"] = "uniform"
    chunk_size: int | None = None
    memory_budget: int | None = None
    direction_sharding: jax.sharding.NamedSharding | None = None
    raise_on_failure: bool = False
    rules: bool | Literal["auto"] = "auto"
    transforms: bool = False

    def __post_init__(self):
        # NumPy and JAX scalars (np.int64(2), jnp.float32(1e-3)) as the Python numbers they hold
        for name in _INTS + _FLOATS:
            number = _number(getattr(self, name), integer=name in _INTS)
            if number is not None:
                object.__setattr__(self, name, number)
        if _directions.is_int_seed(self.key):  # np.int64(3), jnp.int32(3): the int held
            object.__setattr__(self, "key", _directions.seed_of(self.key))
        _validate(self)

    def changed(self) -> dict:
        """The options that differ from their defaults."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not f.default
        }


NAMES = tuple(f.name for f in dataclasses.fields(Options))


def scalar(value):
    """A NumPy or JAX scalar (0-d array) of a number dtype as the Python number it holds;
    anything else as it is (JAX's check_grads takes both)."""
    if isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) == 0:
        if np.issubdtype(np.dtype(value.dtype), np.number):
            # (an explicit transfer, which a caller's transfer guard allows)
            return np.asarray(jax.device_get(value)).item()
    return value


def whole(value):
    """`scalar(value)`, a float of integral value as the int it is (a count of steps given
    as 10.0; JAX's check_grads counts a float order down too); a traced value as it is."""
    if isinstance(value, jax.core.Tracer):
        return value
    value = scalar(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _number(value, integer: bool):
    """`scalar(value)` where `value` is a NumPy or JAX scalar of an integer kind (for
    `integer`; of any real kind, as a float, otherwise); None for anything else (validated
    as it is)."""
    if not isinstance(value, np.generic | np.ndarray | jax.Array) or isinstance(
        value, jax.core.Tracer
    ):
        return None
    number = scalar(value)
    if integer:
        return number if isinstance(number, int) else None
    return float(number) if isinstance(number, int | float) else None


MIN_STEP = 1e-12  # a relative step below it is float64 rounding (eps 2.2e-16) at best
# check_grads' names of the modes, which users carry over
_JAX_MODES = {"fwd": "forward", "rev": "reverse", "lin": "forward"}
_INTS = ("order", "num_directions", "leaf_directions", "chunk_size", "memory_budget")
_FLOATS = ("step", "rtol")
# the loosest rtol: at a relative error above it, a derivative is hardly related to fn's
MAX_RTOL = 0.5


def make(**options) -> Options:
    """`Options(**options)`, with a message listing the valid names for an unknown one."""
    unknown = sorted(set(options) - set(NAMES))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}; the options of jaxcheck.verify are: "
            f"{', '.join(NAMES)}."
        )
    return Options(**options)


# The largest order: each order nests one more derivative map in the programs, and their
# size grows about twofold per order (a check of order 6 took 14 s, measured; one of order
# 30 does not finish)
MAX_ORDER = 8
# The most directions a check draws (per leaf too): far beyond what any verdict needs (the
# sequential rule settles most checks at 4), and each costs two evaluations of fn
MAX_DIRECTIONS = 1 << 16


def _positive_int(name, value, least, most=None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}.")
    if most is not None and value > most:
        raise ValueError(f"{name}={value!r} is above the largest supported, {most}.")


def _validate(o: Options) -> None:
    if o.grad_fn is not None and not callable(o.grad_fn):
        raise TypeError(f"grad_fn must be callable or None, got {type(o.grad_fn).__name__}.")
    transforms = ("grad", "value_and_grad", "jacrev", "jacfwd", "vjp", "jvp", "hessian")
    named = [t for t in transforms if o.grad_fn is getattr(jax, t, None)]
    if named:
        raise TypeError(
            f"grad_fn=jax.{named[0]} is the transformation itself, not a gradient function: "
            f"pass grad_fn=jax.grad(fn) (or your own function of (params, *args) returning "
            "the gradient), or leave grad_fn out to check JAX's gradient of fn."
        )
    _positive_int("order", o.order, 1, MAX_ORDER)
    _positive_int("num_directions", o.num_directions, 4, MAX_DIRECTIONS)
    _positive_int("leaf_directions", o.leaf_directions, 2, MAX_DIRECTIONS)
    _flag("sequential", o.sequential)
    if o.mode not in MODES:
        meant = _JAX_MODES.get(o.mode) if isinstance(o.mode, str) else None
        hint = f" (jax.test_util.check_grads' {o.mode!r} is mode={meant!r} here)" if meant else ""
        raise ValueError(f"mode must be 'reverse', 'forward' or 'both', got {o.mode!r}{hint}.")
    if o.grad_fn is not None and o.mode != "reverse":
        raise ValueError(
            f"grad_fn checks a reverse-mode gradient; mode={o.mode!r} is not possible with "
            "it. Use mode='reverse'."
        )
    if o.precision not in _precision.POLICIES:
        raise ValueError(
            f"precision must be one of {_precision.POLICIES}, got {o.precision!r}. It is "
            "the precision of the finite differences (the reference), not of fn: 'auto' "
            "takes them in float64, or in fn's own precision where fn cannot run in "
            "float64; 'float64' requires float64; 'native' takes them in fn's own dtype "
            "(at least float32)."
        )
    for name, top in (("step", "1)"), ("rtol", f"{MAX_RTOL}]")):
        value = getattr(o, name)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1
        ):
            raise ValueError(f"{name} must be a float in (0, {top} or None, got {value!r}.")
    if o.rtol is not None and o.rtol > MAX_RTOL:
        raise ValueError(
            f"rtol={o.rtol!r} is above {MAX_RTOL}: a derivative that is zero, or a tenth of "
            "fn's, has a relative error of 1 or 0.9, so a tolerance that loose would pass it. "
            f"Pass rtol of at most {MAX_RTOL} (a derivative approximate by design, as a "
            "solver's to its tolerance, needs about that tolerance)."
        )
    if o.step is not None and o.step < MIN_STEP:
        raise ValueError(
            f"step={o.step!r} is below {MIN_STEP}: params moved by so small a relative step "
            "round back to themselves, even in float64, and finite differences would be "
            f"noise. Leave step=None (the default), or give at least {MIN_STEP}."
        )
    _flag("localize", o.localize, auto=True)
    if o.directions not in _directions.KINDS:
        raise ValueError(f"directions must be one of {_directions.KINDS}, got {o.directions!r}.")
    _directions.as_key(o.key)
    for name in ("chunk_size", "memory_budget"):
        value = getattr(o, name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
    _validate_direction_sharding(o.direction_sharding, o.num_directions)
    _flag("rules", o.rules, auto=True)
    _flag("transforms", o.transforms)
    _flag("has_aux", o.has_aux)
    _flag("raise_on_failure", o.raise_on_failure)


def _flag(name, value, auto=False) -> None:
    # `is True` decides downstream: 1, 1.0 or numpy.True_ (equal to True) must not pass
    if isinstance(value, bool) or (auto and isinstance(value, str) and value == "auto"):
        return
    allowed = "True, False or 'auto'" if auto else "True or False"
    raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def _validate_direction_sharding(sharding, k) -> None:
    if sharding is None:
        return
    if not isinstance(sharding, jax.sharding.NamedSharding) or len(sharding.spec) != 1:
        raise TypeError(
            "direction_sharding must be a jax.sharding.NamedSharding whose PartitionSpec names "
            f"one mesh axis for the directions, got {sharding!r}. Try "
            "NamedSharding(mesh, PartitionSpec('data'))."
        )
    axes = sharding.spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if not axes:
        raise TypeError(
            "direction_sharding names no mesh axis for the directions (its PartitionSpec is "
            f"{sharding.spec!r}), so nothing would be spread. Name one, say "
            f"NamedSharding(mesh, PartitionSpec({sharding.mesh.axis_names[0]!r})), or leave "
            "direction_sharding=None."
        )
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if k % shards:
        raise ValueError(
            f"num_directions={k} is not a multiple of the {shards} shards of direction_sharding "
            f"(mesh axes {axes}). Use num_directions={-(-k // shards) * shards}."
        )
