"""`gradient_health`: an optax transformation that watches every gradient leaf during
training, and `health`, which reads what it saw."""

import collections
import dataclasses
import functools
import math
import numbers
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _directions, _keywords, _options, _tree
from ._errors import one_line

# Defaults of `gradient_health`; the reasoning is in its docstring.
DECAY = 0.99
WARMUP = 10
VANISHING_RATIO = 1e-6
COLLAPSE_FACTOR = 1e-3
EXPLODE_FACTOR = 10.0
PARAM_EVERY = 10  # steps between refreshes of the parameter norms
# consecutive low steps before a leaf is vanishing once training has converged far (the
# running average of all gradients below sqrt(collapse_factor) of its largest), where an
# optimizer circling a minimum takes each leaf's gradient near zero for a step or two
SETTLED_STREAK = 25
# steps over which `recent`, a leaf's recent level, averages its norms (decay 1 - 1/10)
RECENT_STEPS = 10
# consecutive exactly zero steps before a leaf is vanishing by its zeros: a step whose
# batch does not reach a leaf is no pathology (a hinge loss whose batch meets every
# margin, an expert no token was routed to), a layer cut off stays at zero
ZERO_STREAK = 3
# the chance below which a run of exact zeros is no longer taken for the leaf's own
# intermittent zeros (see `_step`)
ZERO_RUN_CHANCE = 1e-9
# The spread (standard deviation) of log ||g|| where g is Gaussian noise of k degrees of
# freedom (||g|| chi-distributed): sqrt(trigamma(k / 2)) / 2, for k = 1 and 2. A leaf whose
# log-norms spread more than SPREAD_MARGIN times these counts as noise of k degrees of freedom
# or fewer. Over the last ~100 norms the estimate fell more than 20 % below the true spread
# on fewer than 1 in 10**4 steps (simulated): the margin keeps such a leaf on the safe side.
NOISE_LOG_SPREAD = (1.111, 0.641)
SPREAD_MARGIN = 0.7
# A gradient norm at most ROUNDING_ULPS units of roundoff of its dtype (and at most
# ROUNDING_SHARE) times the norm of the whole gradient is rounding beside it: zero by design
# (a bias before a batch norm, whose mean the norm removes), and its swings are not a
# gradient exploding. Measured on healthy flax models in float32: such leaves at 4e-8 to
# 5e-8 of the whole gradient, 300 times below the float32 share (1.5e-5).
ROUNDING_ULPS = 128
ROUNDING_SHARE = 1e-4
NO_PARAMS = -1.0  # the parameter norm of a leaf whose update got no params
NO_SPIKE = -1.0  # the worst spike of a leaf without a running average yet
# optax's moment update: `optax.tree.update_moment` since optax 0.2.5, in `tree_utils` before
_update_moment = (
    optax.tree.update_moment if hasattr(optax, "tree") else optax.tree_utils.tree_update_moment
)

_KINDS = ("nonfinite", "exploding", "vanishing")
_NAMES = {"nonfinite": "non-finite", "exploding": "exploding", "vanishing": "vanishing"}


@dataclasses.dataclass(frozen=True)
class HealthState:
    """The state of `gradient_health`: one entry per parameter leaf, in `paths` order.

    `step` counts the updates seen. `grad_norm` and `param_norm` are the last step's norms
    (`param_norm` is -1 where `update` got no `params`, NaN where they are NaN), `average`
    the running average of the gradient norms, bias-corrected (`moment` is the moment before
    the correction, as `optax.tree.update_moment` keeps it, and `entered` how many norms
    entered it, per leaf: its finite, nonzero gradients; not an `optax.EmaState`, whose
    field `count` would make `optax.tree.get(opt_state, "count")`, the step count of the
    optimizer after it, find two); `peak` the largest running average each leaf has had,
    `recent` the running average over about the last 10 steps of its norms that entered
    `average` without being below the vanishing thresholds (0 before any).
    `vanishing`, `exploding`, `nonfinite` are the last step's flags; `first_*` the step each
    flag first fired (-1: never), `*_steps` on how many steps it fired. `low_streak` counts
    the consecutive steps a leaf has been below the vanishing thresholds; `log_moment` and
    `log_square` are the running moments (before bias correction) of the logarithm of its
    norm on the steps it was not, `log_entered` how many entered them. `zero_streak` counts
    the consecutive steps its gradient has been exactly zero, `zero_return` the longest such
    run after which it came back (a head trained on every other step's task), `zero_steps`
    on how many steps in all it was exactly zero. `worst_spike` is the largest gradient norm
    seen as a multiple of its running average (-1 before there is one), and `skipped` counts
    the updates zeroed by `skip_nonfinite`. `zero_start` marks the leaves whose parameter
    was all zeros when `init` saw it. The state holds no NaN of its own, so that
    `jax_debug_nans` reports only NaNs of the training itself."""

    paths: tuple[str, ...]
    step: jax.Array
    grad_norm: jax.Array
    param_norm: jax.Array
    average: jax.Array
    moment: jax.Array
    entered: jax.Array
    peak: jax.Array
    recent: jax.Array
    worst_spike: jax.Array
    vanishing: jax.Array
    exploding: jax.Array
    nonfinite: jax.Array
    first_vanishing: jax.Array
    first_exploding: jax.Array
    first_nonfinite: jax.Array
    vanishing_steps: jax.Array
    exploding_steps: jax.Array
    nonfinite_steps: jax.Array
    low_streak: jax.Array
    log_moment: jax.Array
    log_square: jax.Array
    log_entered: jax.Array
    zero_streak: jax.Array
    zero_return: jax.Array
    zero_steps: jax.Array
    zero_start: jax.Array
    skipped: jax.Array


jax.tree_util.register_dataclass(
    HealthState,
    data_fields=[f.name for f in dataclasses.fields(HealthState) if f.name != "paths"],
    meta_fields=["paths"],
)


@_keywords.checked("jaxcheck.gradient_health", "gradient_health(**options)")
def gradient_health(
    *,
    decay: float = DECAY,
    warmup: int = WARMUP,
    vanishing_ratio: float = VANISHING_RATIO,
    collapse_factor: float = COLLAPSE_FACTOR,
    explode_factor: float = EXPLODE_FACTOR,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformation:
    """An optax transformation that records the health of every gradient leaf.

    Put it first in a chain, where it sees the raw gradients:
    `optax.chain(jaxcheck.gradient_health(), optax.adam(1e-3))`. The updates pass through
    unchanged (unless `skip_nonfinite`). Per parameter leaf it keeps the gradient norm, its
    running average, the parameter norm and the flags below, with the
    step each flag first fired and on how many steps it fired; `jaxcheck.health(state)`
    reads them. The cost is one reduction per gradient leaf (its sum of squares) in the
    jitted step, and one per parameter leaf every 10 steps (parameter norms change slowly);
    the state is a handful of vectors with one entry per leaf, and nothing leaves the
    devices until you read it.

    A leaf is flagged at step t (counting updates from 0) when its gradient is

    - *non-finite*: any NaN or Inf in it, or a norm beyond float32's ~3e38, which the
      state's float32 norms cannot hold (from the first step on); or, where `update`
      gets `params`, the same in the parameter itself, seen when its norm is refreshed
      (every 10 steps; a parameter no gradient reaches can turn NaN with finite gradients);
    - *exploding*: its norm is above `explode_factor` times its running average, above
      the largest running average the leaf has had, not below `vanishing_ratio` times
      the parameter's norm (at a minimum the gradients fall far below their early level,
      to rounding at worst, and spike a hundredfold from there by turns), and above the
      rounding of the whole gradient (128 units of roundoff of the leaf's dtype, at most
      1e-4, times the norm of all leaves together: a bias before a batch norm has a
      gradient that is rounding by design, and rounding swings tenfold);
    - *vanishing*: its norm is zero, below `vanishing_ratio` times the parameter's norm (not
      for a parameter that was all zeros when `init` saw it: its norm is what training made
      of it, and Adam moves a parameter whose gradient is rounding by design, a key bias
      before a softmax or a bias before a batch norm, by about the learning rate each step,
      so such a gradient falls below any ratio to it), or below `collapse_factor` times its
      own running average; the last two not where the gradient of all watched leaves
      together is below sqrt(`collapse_factor`) times its running average (every leaf
      falling at once: a minimum being reached), and where that average is below
      sqrt(`collapse_factor`) times its largest (training has converged far, and an
      optimizer circling a minimum drives each leaf's gradient near zero by turns) only on
      25 steps in a row and while another leaf still learns (its gradient at least
      `vanishing_ratio / collapse_factor` times its parameter): a layer cut off late in
      training is flagged, a full-batch run reaching its minimum is not; so, too, 25 steps
      in a row where the leaf's own recent level (its norms over about the last 10 steps)
      is below sqrt(`collapse_factor`) times its running average (a leaf converging ahead
      of the others, a full-batch output bias, passes near zero for a few steps as its
      optimizer turns; a leaf that dies falls from its recent level); and not while its
      gradient has been exactly zero for no more steps in a row than a run of zeros it has
      come back from, or, once it has come back, for a run no less likely than 1e-9 at its
      share of zero steps before it (tasks taking turns or drawn at random, each with its
      own head: a head's gradient is zero on the other tasks' steps by design).

    Exploding and vanishing are judged from step `warmup` on, the rules against the leaf's
    own running average once `warmup` norms have entered it. Only finite, nonzero norms
    enter a leaf's history (a layer before a zero-initialized one gets a zero gradient at
    first; a task's head, on the other tasks' steps); each norm after the first enters the
    running average clipped to `explode_factor` times the average, so one spike cannot
    pull the average up far enough to make the next steps look vanished, while a lasting
    rise is followed within a few dozen steps. Vanishing is a state that lasts, and a leaf
    whose gradient is noise of few degrees of freedom k dips below a thousandth of its
    average by chance: on about 6e-4 of the steps for k = 1, 8e-7 for k = 2, 1e-9 for k = 3
    (a chi-distributed norm). So a leaf must be below the vanishing thresholds on 3 steps
    in a row to be flagged where k may be 1, on 2 where k may be 2, which keeps such false
    alarms below about 1e-9 a step. k is at most the leaf's element count (3 steps for a
    scalar bias or a temperature, 2 for two elements); a gradient may have fewer (a softmax
    bias's sums to zero, a rank-one gradient has one), which the spread of the leaf's log
    norms over its steps that were not low shows: above 0.7 times the 1.11 of noise of one
    degree of freedom, 3 steps; above 0.7 times its 0.64 for two, 2 steps. An exactly
    zero gradient is flagged on 3 steps in a row at least (`ZERO_STREAK`): a batch that
    does not reach a leaf (a hinge loss whose batch meets every margin, an expert no token
    was routed to) is no pathology, a layer cut off stays at zero.

    Leaves of an integer or bool dtype and empty leaves are not watched (never flagged).
    Under `optax.MultiSteps` it sees the accumulated gradient, once per optimizer step. If
    `update` is called without `params`, the parameter norms and the ratio are unknown
    (NaN) and vanishing is judged against the leaf's history only.

    Args:
        decay: decay of the running average of each leaf's gradient norm. 0.99 averages
            over about the last 100 steps: long enough to smooth minibatch noise, short
            enough to follow the slow drift of gradient norms during training.
        warmup: steps before exploding and vanishing are judged. Gradient norms often move
            by large factors over the first few steps (and a layer after a zero-initialized
            one starts with a zero gradient), and the average needs some steps to mean
            anything.
        vanishing_ratio: smallest gradient norm, relative to the parameter's norm, that is
            not vanishing. At 1e-6 an SGD step with a learning rate up to 0.1 changes the
            parameter by less than float32 resolves, and the gradient is four or more orders
            of magnitude below the 1e-4..1e-1 of a layer that learns.
        collapse_factor: a norm this far below the leaf's own running average is vanishing.
            Minibatch noise moves a norm by tens of percent, convergence lowers it slowly;
            a thousandfold drop against the last ~100 steps is a layer that stopped
            receiving gradient (dead units, a cut path).
        explode_factor: a norm this many times its running average is exploding: tenfold is
            far outside minibatch noise and is what a loss spike looks like.
        skip_nonfinite: when True, an update with a NaN or Inf in any leaf (or a leaf's
            norm beyond float32's range) is replaced by
            zeros (as `optax.apply_if_finite` does) and counted in `state.skipped`. The
            transformations after it in the chain still take a step of zeros (Adam's
            moments decay by one step). To leave their state untouched too, keep the
            default and wrap the optimizer after this transformation:
            `optax.chain(jaxcheck.gradient_health(), optax.apply_if_finite(optax.adam(1e-3),
            10))`. Wrapping the whole chain would discard this state on such a step too,
            and the NaN would go unrecorded.

    Returns:
        An `optax.GradientTransformation` whose state is a `HealthState`.

    Raises:
        TypeError: for an option of the wrong type (a threshold that is not a number,
            `skip_nonfinite` not a bool).
        ValueError: for a threshold out of range, or updates whose structure is not that of
            the parameters the state was made from.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxcheck
        >>> params = {"b": jnp.zeros(2), "w": jnp.ones(2)}
        >>> opt = optax.chain(jaxcheck.gradient_health(), optax.sgd(0.1))
        >>> state = opt.init(params)
        >>> grads = {"b": jnp.array([0.1, 0.2]), "w": jnp.array([jnp.nan, 1.0])}
        >>> updates, state = jax.jit(opt.update)(grads, state, params)
        >>> print(jaxcheck.health(state))  # doctest: +NORMALIZE_WHITESPACE
        jaxcheck.health: 1 of 2 leaves flagged after 1 step
          leaf   flag        since  steps  now  grad norm  average  grad/param  worst spike
          ['w']  non-finite  0      1      yes  nan        —        —           —
    """
    _check_options(decay, warmup, vanishing_ratio, collapse_factor, explode_factor, skip_nonfinite)
    warmup = _options.whole(warmup)  # (10.0 steps, as PeriodicCheck takes `every`)
    skip_nonfinite = bool(skip_nonfinite)

    def init(params) -> HealthState:
        _register_with_flax()
        _refuse_no_arrays(params)
        _refuse_mixed_devices({"params": params})
        paths = _paths(params)
        n = len(paths)

        # a new array for every field: a state passed to a jitted step with
        # `donate_argnums` may not hold one buffer twice
        def never():
            return jnp.full((n,), -1, jnp.int32)

        def zero():
            return jnp.zeros((n,), jnp.int32)

        def no():
            return jnp.zeros((n,), bool)

        return HealthState(
            paths=paths,
            step=jnp.zeros((), jnp.int32),
            grad_norm=jnp.zeros((n,), jnp.float32),
            param_norm=jnp.full((n,), NO_PARAMS, jnp.float32),
            average=jnp.zeros((n,), jnp.float32),
            moment=jnp.zeros((n,), jnp.float32),
            entered=zero(),
            peak=jnp.zeros((n,), jnp.float32),
            recent=jnp.zeros((n,), jnp.float32),
            worst_spike=jnp.full((n,), NO_SPIKE, jnp.float32),
            vanishing=no(),
            exploding=no(),
            nonfinite=no(),
            first_vanishing=never(),
            first_exploding=never(),
            first_nonfinite=never(),
            vanishing_steps=zero(),
            exploding_steps=zero(),
            nonfinite_steps=zero(),
            low_streak=zero(),
            log_moment=jnp.zeros((n,), jnp.float32),
            log_square=jnp.zeros((n,), jnp.float32),
            log_entered=zero(),
            zero_streak=zero(),
            zero_return=zero(),
            zero_steps=zero(),
            zero_start=_norms([x for _, x in _leaves_with_paths(params)]) == 0,
            skipped=jnp.zeros((), jnp.int32),
        )

    def update(updates, state: HealthState, params=None):
        _register_with_flax()  # flax may have been imported after init
        if not hasattr(state, "paths"):
            raise TypeError(
                "gradient_health: update(updates, state, params=None) got a state of type "
                f"{type(state).__name__}, not the state its init returned"
                + (
                    " (its updates are that state: the arguments are swapped; optax's "
                    "order is update(updates, state, params))"
                    if hasattr(updates, "paths")
                    else ""
                )
                + "."
            )
        with_paths = _leaves_with_paths(updates)
        leaves = [x for _, x in with_paths]
        _check_paths(_paths(updates), state.paths)
        _refuse_mixed_devices(
            {"updates": updates, "params": params} if params is not None else {"updates": updates}
        )
        if np.ndim(state.step):
            raise ValueError(
                "gradient_health: update got a state with leading axes of shape "
                f"{np.shape(state.step)} (the states of several training runs, from jax.vmap, or "
                "of one run's copies on several devices, from jax.pmap); "
                "update it under the same jax.vmap, or pass one run's state, e.g. "
                "jax.tree.map(lambda a: a[0], state)."
            )
        own = None
        if params is not None:
            flat = _params_like(updates, params)
            # one parameter per watched update; a None parameter beside an update (a frozen
            # or absent leaf) has no known norm
            with_none = jax.tree_util.tree_leaves(updates, is_leaf=_is_none)
            own = [p for u, p in zip(with_none, flat, strict=True) if u is not None]
            _refuse_integer_updates(with_paths, own)
        options = (decay, vanishing_ratio, collapse_factor, explode_factor, warmup)
        # numbers are compiled in; arrays (`optax.inject_hyperparams` hands them in so, and
        # they may change between steps) are passed
        fixed = tuple(v if _is_number(v) else None for v in options)
        passed = tuple(None if _is_number(v) else v for v in options)
        new_leaves, new_state = _step(leaves, state, own, passed, fixed=fixed, skip=skip_nonfinite)
        if skip_nonfinite:
            with_none, structure = jax.tree_util.tree_flatten(updates, is_leaf=_is_none)
            it = iter(new_leaves)
            updates = structure.unflatten([u if u is None else next(it) for u in with_none])
        return updates, new_state

    return optax.GradientTransformation(init, update)


def _is_number(x) -> bool:
    return isinstance(x, int | float | np.generic) and not isinstance(x, complex)


@functools.partial(jax.jit, static_argnames=("fixed", "skip"))
def _step(leaves, state, own, passed, *, fixed, skip):
    """gradient_health's update after its arguments are checked: (the updates' leaves,
    zeroed where `skip` and any is NaN/Inf, else None; the new state). Jitted, so that an
    update run eagerly (a loop without `jax.jit`, a notebook) costs one compiled call per
    step instead of a hundred small ones (a first eager update took 7.7 s, later ones
    0.18 s, for three leaves); inside a user's `jax.jit` it is traced into the step as
    before. `own` holds the parameters beside the non-None updates (None without params);
    `passed` and `fixed` the options as arrays or numbers (one of the two per option)."""
    # the state is float32 throughout: `optax.inject_hyperparams` hands the options in
    # as arrays of the params' dtype (float64 under x64), which would promote it and
    # change its type between steps (a `lax.scan` carry refuses that)
    decay, vanishing, collapse, explode, warmup = (
        v if a is None else a for v, a in zip(fixed, passed, strict=True)
    )
    decay32, vanishing32, collapse32, explode32 = (
        jnp.asarray(v, jnp.float32) for v in (decay, vanishing, collapse, explode)
    )
    t = state.step
    grad_norm = _norms(leaves)
    # One reduction per leaf: a NaN or Inf makes the norm NaN or Inf; a finite gradient
    # whose float32 sum of squares overflows is summed again scaled (`_norms`).
    finite = jnp.isfinite(grad_norm)
    if own is None:
        param_norm = jnp.full_like(grad_norm, NO_PARAMS)
    else:
        absent = np.array([p is None for p in own])

        def refreshed():
            norms = _norms([jnp.zeros(()) if p is None else p for p in own])
            return jnp.where(absent, NO_PARAMS, norms) if absent.any() else norms

        # Parameters move by about the learning rate per step: their norms are refreshed
        # every PARAM_EVERY steps, which keeps their reductions off most steps.
        param_norm = jax.lax.cond(
            (t % PARAM_EVERY == 0) | ~jnp.all(jnp.isfinite(state.param_norm)),
            refreshed,
            lambda: state.param_norm,
        )

    # Each leaf's history: how many norms entered its running average (`count`), and
    # the average before this step (a spike must not be judged against itself).
    count = state.entered
    seen = count > 0
    average = state.average
    # (a running average needs one norm at least, even with warmup=0)
    with_history = (t >= warmup) & (count >= jnp.maximum(warmup, 1)) & finite
    # integer, bool and empty leaves (step counters, masks, keys; gradients of dtype
    # float0 under `allow_int`) have no gradient to watch: never flagged
    # (nor is a leaf whose parameter is of such a dtype, its update cast to float: zeros
    # where a float0 gradient was replaced, as `jax.tree.map(jnp.zeros_like, ...)` does)
    owned = [None] * len(leaves) if own is None else own
    watched = [_watched(x) and (p is None or _watched(p)) for x, p in zip(leaves, owned)]
    watched = jnp.asarray(watched, bool).reshape(-1)
    # (no division by zero, no NaN made here: under `jax_debug_nans` only the
    # training's own NaNs may show)
    # (a parameter gone Inf has no ratio either: grad / inf = 0 is not a vanished
    # gradient; it is flagged non-finite below)
    has_ratio = (param_norm > 0) & jnp.isfinite(param_norm)
    ratio = grad_norm / jnp.where(has_ratio, param_norm, 1.0)
    # an exactly zero gradient is vanishing whatever the parameter's norm (a leaf
    # initialized at zero and cut off from the loss has no ratio), unless the leaf has
    # come back from as long a run of zeros before: the loss of some steps does not
    # reach it (alternating tasks, each with its own head), and its zeros are by design
    exact_zero = grad_norm == 0
    zero_streak = jnp.where(exact_zero, state.zero_streak + 1, 0)
    came_back = ~exact_zero & (state.zero_streak > 0)
    zero_return = jnp.where(
        came_back, jnp.maximum(state.zero_return, state.zero_streak), state.zero_return
    )
    zero_steps = state.zero_steps + exact_zero.astype(state.zero_steps.dtype)
    # a leaf that came back is zero on a share q of the steps before this run (a task
    # drawn at random each step, not by turns): a run longer than any before is by design
    # too while q ** run is above ZERO_RUN_CHANCE (record runs keep coming as training
    # goes on); a head whose task stopped passes it after about 30 steps at q = 1/2, 50 at
    # q = 2/3
    before = (zero_steps - zero_streak).astype(jnp.float32)
    share = before / jnp.maximum(t + 1 - zero_streak, 1).astype(jnp.float32)
    chance = share ** zero_streak.astype(jnp.float32)
    likely = (state.zero_return > 0) & (chance >= ZERO_RUN_CHANCE)
    by_design = exact_zero & ((zero_streak <= state.zero_return) | likely)
    # (a parameter that started at zero has no scale of its own: see the docstring)
    tiny = has_ratio & ~state.zero_start & (ratio < vanishing32)
    below = (tiny | exact_zero) & ~by_design
    # a gradient vanishingly small beside its parameter is not exploding, however far
    # above its average: at a minimum the norms fall to rounding, and rounding
    # scatters by tenfold from step to step
    # ... nor is a gradient no larger than the leaf's running average has ever been: at
    # a minimum the norms fall far below their early level, and minibatch noise or an
    # optimizer circling the minimum throws them up by a hundredfold from there
    # (the average is 1 where it is zero, before any history: explode_factor=inf, no
    # exploding at all, must not make inf * 0 = NaN)
    ceiling = explode32 * jnp.where(average > 0, average, 1.0)
    exploding = with_history & (grad_norm > ceiling) & ~below
    exploding = exploding & (grad_norm > state.peak)
    # ... nor one at the rounding of the whole gradient (`ROUNDING_ULPS`)
    whole = jnp.sqrt(jnp.sum(jnp.where(finite & watched, grad_norm, 0.0) ** 2))
    exploding = exploding & (grad_norm > _rounding_share(leaves) * whole)
    # A collapse against the leaf's own history is vanishing only while the model as a
    # whole is learning: where its gradient has collapsed too (every leaf falling at
    # once), or its running average has fallen far below the largest it had, a minimum
    # is being reached, where the gradients of an optimizer circling it pass near zero
    # and spike by turns (a layer dying while the others learn is the pathology)
    judged = with_history & watched

    def total(x):
        return jnp.sqrt(jnp.sum(jnp.where(judged, x, 0.0) ** 2))

    root = jnp.sqrt(collapse32)
    # every leaf's gradient falling at once: a minimum reached now
    falling = total(grad_norm) < root * total(average)
    # the running average far below the largest it had: training has converged far,
    # and an optimizer circling a minimum passes each leaf's gradient near zero by
    # turns, for a step or two; a leaf that stays down for `SETTLED_STREAK` steps in a
    # row there has died (its gradient cut 1e4-fold while the others learn on)
    converged = total(average) < root * total(state.peak)
    collapsed = with_history & (grad_norm < collapse32 * average) & ~falling & ~by_design
    # (and so is a gradient below `vanishing_ratio` of its parameter there, unless it is
    # exactly zero)
    small = below & (~falling | exact_zero)
    low = ((t >= warmup) & finite & small) | collapsed
    # ... and only while another leaf still learns, its gradient at least
    # vanishing_ratio / collapse_factor of its parameter (a full-batch run reaching its
    # minimum takes every gradient to rounding together)
    learning = jnp.where(collapse32 > 0, vanishing32 / jnp.maximum(collapse32, 1e-30), 0.0)
    alive = (watched & has_ratio & (ratio >= learning)).astype(jnp.int32)
    others_alive = (jnp.sum(alive, dtype=jnp.int32) - alive) > 0
    settled = converged & (grad_norm > 0)
    dipped = low
    low = low & (~settled | others_alive)
    low_streak = jnp.where(low, state.low_streak + 1, 0)
    # the spread of the leaf's log-norms on the steps before this one
    log_weight = 1.0 - decay32 ** state.log_entered.astype(jnp.float32)
    log_weight = jnp.where(state.log_entered > 0, log_weight, 1.0)
    log_mean = state.log_moment / log_weight
    spread = jnp.sqrt(jnp.maximum(state.log_square / log_weight - log_mean**2, 0.0))
    # A leaf converging ahead of the others (its recent level far below its running
    # average: a full-batch output bias whose gradient fell 150-fold while the weights
    # learn on) passes near zero as its optimizer turns, for a few steps in a row: only
    # `SETTLED_STREAK` low steps make it vanishing. A leaf that dies falls from where it
    # just was, which its recent level keeps (low steps do not enter it).
    converging = (state.recent > 0) & (state.recent < root * average)
    needed = jnp.where(settled | converging, SETTLED_STREAK, _streak_needed(leaves, spread))
    needed = jnp.where(exact_zero, jnp.maximum(needed, ZERO_STREAK), needed)
    vanishing = low & (low_streak >= needed) & watched
    exploding = exploding & watched
    # a parameter gone NaN/Inf where its gradient is finite (a leaf the loss does not
    # reach, or one the optimizer broke: adam with eps=0 at a zero gradient) is flagged
    # too, once its norm is refreshed; unknown norms are NO_PARAMS, not NaN
    nonfinite = (~finite | ~jnp.isfinite(param_norm)) & watched
    has_spike = seen & finite & (average > 0)
    spike = jnp.where(has_spike, grad_norm / jnp.where(has_spike, average, 1.0), NO_SPIKE)

    # Only finite, nonzero norms enter the history: NaN/Inf never do, and an exact zero is
    # a step whose loss did not reach the leaf (another task's, where tasks take turns),
    # which would pull its average down by that task's share of the steps and make its
    # own steps' norms look like spikes (a head trained on every third step was flagged
    # exploding at 39 times its diluted average); a leaf cut off for good is flagged
    # vanishing by its zeros themselves.
    enters = finite & (grad_norm > 0)
    clipped = jnp.where(seen, jnp.minimum(grad_norm, ceiling), grad_norm)
    # optax.ema's bias correction raises `decay ** count` (float ** int32), which strict
    # dtype promotion refuses, and counts steps for all leaves at once: the moment is
    # optax's, the per-leaf count and correction are spelt out here.
    mu = _update_moment(clipped, state.moment, decay32, order=1)
    mu = jnp.where(enters, mu, state.moment)
    kept = 1.0 - 1.0 / RECENT_STEPS
    recent = jnp.where(state.recent > 0, kept * state.recent + (1.0 - kept) * clipped, clipped)
    recent = jnp.where(enters & ~dipped, recent, state.recent)
    count = jnp.where(enters, count + 1, count)
    correction = 1.0 - decay32 ** count.astype(jnp.float32)
    new_average = jnp.where(count > 0, mu / jnp.where(count > 0, correction, 1.0), 0.0)
    # The spread is of the norms of a leaf that is not vanishing: a step below the
    # thresholds does not enter it (a leaf dying must not look noisy and wait longer).
    spreads = enters & (grad_norm > 0) & ~dipped
    log_norm = jnp.log(jnp.where(spreads, clipped, 1.0))
    log_moment = _update_moment(log_norm, state.log_moment, decay32, order=1)
    log_square = _update_moment(log_norm**2, state.log_square, decay32, order=1)

    new_leaves = None
    skipped = state.skipped
    if skip:
        bad = ~jnp.all(finite)
        new_leaves = [jnp.where(bad, jnp.zeros_like(u), u) for u in leaves]
        skipped = skipped + bad.astype(jnp.int32)

    def first(old, now):
        return jnp.where((old < 0) & now, t, old)

    def tally(old, now):
        return old + now.astype(jnp.int32)

    return new_leaves, HealthState(
        paths=state.paths,
        step=t + jnp.int32(1),
        grad_norm=grad_norm,
        param_norm=param_norm,
        average=new_average,
        moment=mu,
        entered=count,
        worst_spike=jnp.fmax(state.worst_spike, spike),
        peak=jnp.fmax(state.peak, new_average),
        recent=recent,
        vanishing=vanishing,
        exploding=exploding,
        nonfinite=nonfinite,
        first_vanishing=first(state.first_vanishing, vanishing),
        first_exploding=first(state.first_exploding, exploding),
        first_nonfinite=first(state.first_nonfinite, nonfinite),
        vanishing_steps=tally(state.vanishing_steps, vanishing),
        exploding_steps=tally(state.exploding_steps, exploding),
        nonfinite_steps=tally(state.nonfinite_steps, nonfinite),
        low_streak=low_streak,
        log_moment=jnp.where(spreads, log_moment, state.log_moment),
        log_square=jnp.where(spreads, log_square, state.log_square),
        log_entered=jnp.where(spreads, state.log_entered + 1, state.log_entered),
        zero_streak=zero_streak,
        zero_return=zero_return,
        zero_steps=zero_steps,
        zero_start=state.zero_start,
        skipped=skipped,
    )


_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(HealthState) if f.name != "paths")
# fields a checkpoint of an earlier release lacks: restored as init made them
_LATER_FIELDS = ("recent",)


def _register_with_flax() -> None:
    """Let `flax.serialization` (checkpoints of a flax `TrainState`) save and restore the
    state, as it does optax's NamedTuple states; only where flax is already imported
    (jaxcheck does not depend on it): called by `init` and, once per trace, `update`."""
    serialization = sys.modules.get("flax.serialization")
    if serialization is None:
        return

    def to_state_dict(state):
        return {f: serialization.to_state_dict(getattr(state, f)) for f in _DATA_FIELDS}

    def from_state_dict(target, state):
        saved = np.shape(state.get("grad_norm", ())) if isinstance(state, dict) else None
        if saved is not None and saved != np.shape(target.grad_norm):
            n = len(target.paths)
            raise ValueError(
                f"gradient_health: the checkpoint holds the state of {saved[0] if saved else 0} "
                f"parameter leaves, and the state it is restored into has {n} "
                f"({', '.join(target.paths[:4])}{', ...' if n > 4 else ''}): it was saved for "
                "another model. Restore it into the state of that model, or start this one "
                "from gradient_health's init."
            )
        return dataclasses.replace(
            target,
            **{
                f: serialization.from_state_dict(getattr(target, f), state[f])
                for f in _DATA_FIELDS
                if f in state or f not in _LATER_FIELDS
            },
        )

    try:
        serialization.register_serialization_state(HealthState, to_state_dict, from_state_dict)
    except ValueError:  # registered by an earlier init
        pass


def _check_options(decay, warmup, vanishing_ratio, collapse_factor, explode_factor, skip):
    """Refuse thresholds of the wrong type or out of range, naming the option. Values
    injected by `optax.inject_hyperparams` arrive as 0-d arrays: checked by value where
    they are concrete (in `init`), not where traced (in a jitted `update`)."""
    wrong_type, out_of_range = [], []

    def check(name, value, ok, want, integer=False):
        if isinstance(value, jax.core.Tracer):
            return
        number = _options.whole(value) if integer else _options.scalar(value)
        kind, word = (numbers.Integral, "an int") if integer else (numbers.Real, "a number")
        if isinstance(number, bool) or not isinstance(number, kind):
            wrong_type.append(f"{name}={value!r} must be {word} {want}")
        elif not ok(number):
            out_of_range.append(f"{name}={value!r} must be {'an int ' * integer}{want}")

    # (in float32, the precision of the state: a decay of 0.99999999 rounds to 1 there)
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    check(
        "decay",
        decay,
        lambda v: 0.0 <= f32(v) < 1.0,
        "in [0, 1), e.g. 0.99, and below 1 in float32 (the state's precision)",
    )
    check("warmup", warmup, lambda v: v >= 0, ">= 0, e.g. 10", integer=True)
    check(
        "vanishing_ratio",
        vanishing_ratio,
        lambda v: 0.0 <= f32(v) < 1.0,
        "in [0, 1), e.g. 1e-6 (0 turns it off), and below 1 in float32",
    )
    check(
        "collapse_factor",
        collapse_factor,
        lambda v: 0.0 <= f32(v) < 1.0,
        "in [0, 1), e.g. 1e-3, and below 1 in float32",
    )
    check(
        "explode_factor",
        explode_factor,
        lambda v: f32(v) > 1.0,
        "> 1, e.g. 10, and above 1 in float32",
    )
    # (a concrete 0-d bool array is taken as its value, as the thresholds' 0-d arrays are)
    concrete = not isinstance(skip, jax.core.Tracer) and np.ndim(skip) == 0
    if not (concrete and _dtype(skip) == np.bool_):
        wrong_type.append(f"skip_nonfinite={skip!r} must be True or False")
    if wrong_type or out_of_range:
        error = TypeError if wrong_type else ValueError
        raise error("gradient_health: " + "; ".join(wrong_type + out_of_range) + ".")


def _is_none(x) -> bool:
    return x is None


def _paths(tree) -> tuple[str, ...]:
    """The leaves' key paths, without a last `.value`: flax's `nnx.Optimizer` passes `init`
    the parameters as `nnx.Variable`s (whose array is the attribute `value`) and `update`
    the gradients as plain arrays; both name the same leaves."""
    return tuple(jax.tree_util.keystr(_named(p)) for p, _ in _leaves_with_paths(tree))


def _named(path: tuple) -> tuple:
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value":
        return path[:-1]
    return path


def _refuse_no_arrays(params) -> None:
    """init's params must hold arrays (a model's name or None would make a state that
    fails, or watches nothing, at the first update)."""
    with_paths = _leaves_with_paths(params)
    numbers = (int, float, complex)
    arrays = [hasattr(x, "dtype") or isinstance(x, numbers) for _, x in with_paths]
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731 - an empty tuple
    nodes = jax.tree_util.tree_leaves(params, is_leaf=masked)
    if nodes and all(masked(x) for x in nodes):
        raise TypeError(
            "gradient_health: every leaf of params is masked out (optax.masked's mask is "
            "False for all of them), so there is nothing to watch. Set the mask True for "
            "the leaves to watch, or leave gradient_health out of optax.masked."
        )
    if not any(arrays):
        raise TypeError(
            f"gradient_health: init takes the parameters being trained (a pytree of arrays), "
            f"got {type(params).__name__} {_short(params)} with no array leaf. Pass the "
            "params the optimizer updates: opt.init(params)."
        )
    for (path, x), array in zip(with_paths, arrays):
        if not array:
            # (a function, a string, an equinox Module's callable fields)
            raise TypeError(
                f"gradient_health: params leaf {jax.tree_util.keystr(path) or '(root)'} is "
                f"{type(x).__name__} {_short(x)}, not an array: it has no gradient to "
                "watch. Pass the optimizer the arrays it trains, e.g. "
                "opt.init(eqx.filter(model, eqx.is_inexact_array)) for an equinox model "
                "(and the gradients and params filtered alike at update)."
            )


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_paths(paths, expected) -> None:
    if paths == expected:
        return
    missing = [p for p in expected if p not in paths]
    extra = [p for p in paths if p not in expected]

    def few(ps):
        ps = [p or "(root)" for p in ps]
        return ", ".join(ps[:4]) + (", ..." if len(ps) > 4 else "")

    if missing or extra:
        diff = (f"; missing {few(missing)}" if missing else "") + (
            f"; not in the state {few(extra)}" if extra else ""
        )
    else:
        diff = "; the same leaves in another order"
    raise ValueError(
        f"gradient_health: the updates have the leaves {few(list(paths)) or 'none'}, but the state "
        f"was made from parameters with {few(list(expected)) or 'none'}{diff}. Call init with "
        "the parameters that are being trained."
    )


def _params_like(updates, params) -> list:
    """The leaves of `params` in the order of those of `updates` (None where an update is
    None), refusing params of another structure or leaf shape with a named error."""
    structure = jax.tree_util.tree_structure(updates, is_leaf=_is_none)
    try:
        flat = structure.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "gradient_health: params do not have the structure of the updates "
            f"({one_line(err)}). Pass the parameters being trained, the pytree the updates "
            "are the gradient of, as update's third argument."
        ) from err
    with_paths = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_none)[0]
    for (path, u), p in zip(with_paths, flat, strict=True):
        if p is None or u is None or np.shape(p) == np.shape(u):
            continue
        raise ValueError(
            f"gradient_health: the update {jax.tree_util.keystr(_named(path))} has shape "
            f"{tuple(np.shape(u))}, but its parameter has shape {tuple(np.shape(p))}. Pass "
            "the parameters being trained, the pytree the updates are the gradient of."
        )
    return flat


def _streak_needed(leaves, spread: jax.Array) -> jax.Array:
    """Consecutive low steps before a leaf is vanishing: 3 for a leaf of one degree of
    freedom, 2 for two, else 1. A leaf of n elements has at most n; its gradient may have
    fewer (a softmax bias's sums to zero, a rank-one gradient has one), which the spread of
    its log-norms shows (`NOISE_LOG_SPREAD`)."""
    size = np.asarray([max(np.size(x), 1) for x in leaves], np.int32).reshape(-1)
    two = jnp.asarray(size <= 2) | (spread > SPREAD_MARGIN * NOISE_LOG_SPREAD[1])
    one = jnp.asarray(size == 1) | (spread > SPREAD_MARGIN * NOISE_LOG_SPREAD[0])
    return 1 + two.astype(jnp.int32) + one.astype(jnp.int32)


def _rounding_share(leaves) -> np.ndarray:
    """Per leaf, the share of the whole gradient's norm that is rounding in its dtype
    (`ROUNDING_ULPS`)."""
    eps = [
        float(jnp.finfo(x.dtype).eps) if _watched(x) and hasattr(x, "dtype") else 0.0
        for x in leaves
    ]
    return np.minimum(ROUNDING_ULPS * np.asarray(eps, np.float32), ROUNDING_SHARE).reshape(-1)


def _leaves_with_paths(tree):
    return [
        (p, x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)[0]
        if x is not None
    ]


def _refuse_integer_updates(with_paths, params) -> None:
    """Raise a TypeError naming the first update of an integer or bool dtype whose parameter
    is floating: its norm would not be watched (a gradient cast to an integer by mistake)."""

    for (path, u), p in zip(with_paths, params):
        integer = jnp.issubdtype(_dtype(u), jnp.integer) or jnp.issubdtype(_dtype(u), jnp.bool_)
        if integer and np.size(u) and p is not None and _watched(p):
            raise TypeError(
                f"gradient_health: the update of {jax.tree_util.keystr(path) or '(root)'} "
                f"has dtype {_dtype(u).name} while its parameter is {_dtype(p).name}: an "
                "integer update of a floating parameter has no gradient norm to watch (was "
                "the gradient cast to an integer?). Pass the update in a floating dtype."
            )


def _refuse_mixed_devices(trees: dict) -> None:
    """Raise where the arrays of `trees` are committed to different devices, naming them:
    jax.jit, which runs the watch, would refuse them without saying which."""
    where = _tree.mixed_devices(trees)
    if where:
        held = " and ".join(trees)
        raise ValueError(
            f"gradient_health: {held} hold arrays committed to different devices ({where}). "
            "Its watch runs as one jitted program, which needs every array on the same "
            "devices: move them with jax.device_put(x, device), or shard them all over one "
            "mesh."
        )


def _watched(x) -> bool:
    """Whether a gradient leaf is watched: of a floating or complex dtype, not empty."""
    return bool(jnp.issubdtype(_dtype(x), jnp.inexact) and np.size(x) > 0)


def _dtype(x):
    """An array's dtype (a PRNG key's included), or a Python number's as NumPy takes it."""
    return getattr(x, "dtype", None) or np.result_type(type(x))


def _norms(leaves) -> jax.Array:
    """The norm of each leaf as one float32 vector (0 for a leaf of no floating dtype)."""
    arrays = [jnp.asarray(x) for x in leaves]
    inexact = [i for i, x in enumerate(arrays) if jnp.issubdtype(x.dtype, jnp.inexact)]
    # Behind an optimization barrier (one for all leaves): XLA would otherwise merge these
    # squares with Adam's g ** 2, which it then writes out in full instead of fusing it
    # into Adam's update (on CPU that made a 1e6-parameter MLP's step 1.2x slower instead
    # of a few percent).
    barred = jax.lax.optimization_barrier([arrays[i] for i in inexact]) if inexact else []
    values = [jnp.zeros((), jnp.float32)] * len(arrays)  # squared norms, norms for float64
    wide = np.zeros(len(arrays), bool)
    # On a single CPU device, reduce each leaf as a flat vector. A dense layer's weight
    # gradient comes out of its dot transposed, and XLA:CPU then splits the reduction of
    # the 2-D array into strided 32x32 tiles; the flat view (a free bitcast once layouts
    # are assigned) is summed in one contiguous pass instead: in the step of
    # benchmarks/health.py that reduction of the 784x1024 gradient went from about 400 to
    # 180 us, and the overhead from about 1.08x to 1.06x on 2 cores shared with other work.
    # The shape is kept with several devices (flattening a leaf sharded along a minor axis
    # would make XLA gather it first) and on other backends, where this was not measured.
    flat = jax.default_backend() == "cpu" and jax.device_count() == 1
    for i, x in zip(inexact, barred):
        if flat and x.ndim > 1:
            x = x.reshape(-1)
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            x = jnp.abs(x)
        # accumulate in at least float32: a bfloat16 sum of squares loses the small leaves
        if x.dtype == jnp.float64:  # its square root before float32 (which 1e20 overflows)
            wide[i] = True
            values[i] = jnp.sqrt(jnp.sum(x * x)).astype(jnp.float32)
        else:
            x = x.astype(jnp.float32)
            values[i] = jnp.sum(x * x)
    values = _stack(values)
    # one square root for all leaves: per leaf, it was a sixth of this function's operations
    norms = jnp.where(wide, values, jnp.sqrt(values)) if wide.any() else jnp.sqrt(values)
    narrow = [(i, x) for i, x in zip(inexact, barred) if not wide[i]]
    if not narrow:
        return norms
    # A float32 sum of squares underflows to 0 (or below float32's normal range) where
    # every entry is below ~1e-19, and overflows to Inf where one is above ~2e19 with a
    # norm float32 holds: then, and only then, those leaves are summed again scaled by
    # their largest entry.
    at = np.asarray([i for i, _ in narrow])
    squares = values[at]
    off = (squares < np.finfo(np.float32).tiny) | jnp.isinf(squares)

    def scaled():
        # (leaves sharded over devices are not joined: jax 0.9 then gave the step's outputs
        # shardings it could not name)
        rescale = _rescaled_one_by_one if jax.device_count() > 1 else _rescaled_by_segments
        return norms.at[at].set(jnp.where(off, rescale([x for _, x in narrow]), norms[at]))

    return jax.lax.cond(jnp.any(off), scaled, lambda: norms)


def _rescaled_by_segments(leaves) -> jax.Array:
    """The norm of each of `leaves`, summed scaled by its largest entry (`_norms`): all as
    one vector, reduced by segments, a few operations in all, where a loop over the leaves
    compiled a dozen per leaf (600 leaves: seconds of XLA compile for a branch that seldom
    runs)."""
    flat = jnp.concatenate([jnp.abs(x).astype(jnp.float32).reshape(-1) for x in leaves])
    sizes = np.asarray([np.size(x) for x in leaves])
    segment = jnp.repeat(jnp.arange(len(leaves)), sizes, total_repeat_length=flat.size)
    reduce = {"num_segments": len(leaves), "indices_are_sorted": True}
    unit = _directions.unit(jnp.maximum(jax.ops.segment_max(flat, segment, **reduce), 0.0))
    return unit * jnp.sqrt(jax.ops.segment_sum(jnp.square(flat / unit[segment]), segment, **reduce))


def _rescaled_one_by_one(leaves) -> jax.Array:
    """`_rescaled_by_segments`, leaf by leaf."""
    again = []
    for x in leaves:
        unit, squares = _directions.scaled_squares(x, jnp.float32)
        again.append(unit * jnp.sqrt(squares))
    return jnp.stack(again)


def _stack(values, dtype=jnp.float32) -> jax.Array:
    return jnp.stack(values) if values else jnp.zeros((0,), dtype)


# ---------------------------------------------------------------------------------------------
# Reading the state on the host.


@dataclasses.dataclass(frozen=True)
class LeafHealth:
    """One parameter leaf as `gradient_health` last saw it (norms of the last step)."""

    path: str
    grad_norm: float
    average: float
    param_norm: float
    ratio: float
    worst_spike: float
    vanishing: bool
    exploding: bool
    nonfinite: bool
    first_vanishing: int | None
    first_exploding: int | None
    first_nonfinite: int | None
    vanishing_steps: int
    exploding_steps: int
    nonfinite_steps: int

    @property
    def flags(self) -> tuple[str, ...]:
        """The flags that ever fired on this leaf, worst first."""
        return tuple(k for k in _KINDS if getattr(self, f"first_{k}") is not None)


@dataclasses.dataclass(frozen=True)
class HealthSummary:
    """What `jaxcheck.health` read from a `HealthState`; `str()` is a terminal table."""

    steps: int
    leaves: tuple[LeafHealth, ...]
    skipped: int
    params_seen: bool
    # the states of gradient-rescaling transformations before gradient_health in its chain
    # (optax's ScaleBy...: Adam's), whose updates it then watched instead of the gradients;
    # where none, ("EmptyState",) for one that keeps no state (a clipping?) before it
    after: tuple[str, ...] = ()
    # updates with NaN/Inf that an optax.apply_if_finite around gradient_health dropped,
    # with the state gradient_health had made of them
    dropped: int = 0

    @property
    def ok(self) -> bool:
        """True when no leaf was ever flagged, and no update with NaN/Inf was dropped
        unseen (by an `optax.apply_if_finite` around gradient_health)."""
        return not self.flagged and not self.dropped

    def __bool__(self):
        # (as a Report's: `assert jaxcheck.health(state)` would pass a flagged one too)
        raise TypeError(
            "a jaxcheck HealthSummary has no truth value: use summary.ok (True only when no "
            "leaf was ever flagged), or summary.flagged for the leaves that were."
        )

    @property
    def flagged(self) -> tuple[LeafHealth, ...]:
        """The leaves on which some flag ever fired."""
        return tuple(leaf for leaf in self.leaves if leaf.flags)

    def first(self, kind: str) -> int | None:
        """The first step at which `kind` ("vanishing", "exploding", "nonfinite") fired on
        any leaf, or None."""
        if kind not in _KINDS:
            raise ValueError(f"kind={kind!r}; pass one of {', '.join(map(repr, _KINDS))}.")
        steps = [getattr(leaf, f"first_{kind}") for leaf in self.leaves]
        steps = [s for s in steps if s is not None]
        return min(steps) if steps else None

    def to_dict(self) -> dict:
        """JSON-serializable contents (NaN becomes None)."""
        return {
            "ok": self.ok,
            "steps": self.steps,
            "skipped": self.skipped,
            "params_seen": self.params_seen,
            "after": list(self.after),
            "dropped": self.dropped,
            "leaves": [
                {f.name: _plain(getattr(leaf, f.name)) for f in dataclasses.fields(leaf)}
                for leaf in self.leaves
            ],
        }

    def __str__(self) -> str:
        n = len(self.leaves)
        after = f"after {self.steps} step{'s' * (self.steps != 1)}"
        notes = []
        if not self.params_seen and self.steps:
            notes.append(
                "  update got no params: grad/param ratios are unknown and vanishing is judged "
                "against each leaf's own history only"
            )
        if self.skipped:
            notes.append(f"  {self.skipped} update(s) with NaN/Inf were replaced by zeros")
        if self.after == (STATELESS,):
            notes.append(
                "  gradient_health comes after a transformation that keeps no state in its "
                "chain (optax.clip_by_global_norm, clip, scale, add_decayed_weights?): it "
                "watched the updates returned there, and where that clips them, spikes "
                "beyond its bound went unseen (and where it scales all leaves together, as "
                "clip_by_global_norm does, the other leaves shrank with a spike and may be "
                "flagged vanishing); put it first, "
                "optax.chain(jaxcheck.gradient_health(), ...)"
            )
        elif self.after:
            why = [text for names, text in _AFTER_WHY if set(self.after) & names]
            if any(n.startswith("ScaleBy") for n in self.after):
                why.insert(0, _AFTER_WHY_SCALED)
            notes.append(
                f"  gradient_health comes after {', '.join(self.after)} in its chain: it "
                f"watched the updates {'rescaled' if why == [_AFTER_WHY_SCALED] else 'made'} "
                f"there, not the gradients ({'; '.join(why)}); put "
                "it first, optax.chain(jaxcheck.gradient_health(), ...)"
            )
        if self.dropped:
            notes.append(
                f"  gradient_health runs inside optax.apply_if_finite, which dropped "
                f"{self.dropped} update(s) with NaN/Inf and the state gradient_health had "
                "made of them: their non-finite gradients are not counted here; put it "
                "outside, optax.chain(jaxcheck.gradient_health(), "
                "optax.apply_if_finite(...)), or use gradient_health(skip_nonfinite=True)"
            )
        counted = f"{n} lea{'f' if n == 1 else 'ves'} {after}"
        if not self.flagged and self.dropped:
            head = (
                f"jaxcheck.health: {self.dropped} update(s) with NaN/Inf dropped unseen by "
                f"optax.apply_if_finite — {counted}, nothing flagged"
            )
            return "\n".join([head, *notes])
        if self.ok:
            head = (
                f"jaxcheck.health: healthy — {counted}, nothing vanishing, exploding or non-finite"
            )
            return "\n".join([head, *notes])
        flagged = self.flagged
        lines = [f"jaxcheck.health: {len(flagged)} of {n} leaves flagged {after}"]
        header = ["leaf", "flag", "since", "steps", "now", "grad norm", "average"]
        header += ["grad/param", "worst spike"]
        rows = []
        for leaf in flagged:
            for kind in leaf.flags:
                rows.append(
                    [
                        leaf.path or "(root)",
                        _NAMES[kind],
                        str(getattr(leaf, f"first_{kind}")),
                        str(getattr(leaf, f"{kind}_steps")),
                        "yes" if getattr(leaf, kind) else "no",
                        f"{leaf.grad_norm:.1e}",
                        _e(leaf.average),
                        _e(leaf.ratio),
                        "—" if math.isnan(leaf.worst_spike) else f"x{leaf.worst_spike:.3g}",
                    ]
                )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines += ["  " + fmt.format(*r).rstrip() for r in [header, *rows]]
        return "\n".join(lines + notes)


def health(state: Any) -> HealthSummary:
    """Read the state of `gradient_health` into a summary on the host.

    Accepts the `HealthState` itself or any optimizer state containing exactly one (an
    `optax.chain` tuple, `optax.MultiSteps`, `optax.inject_hyperparams`, ...). This reads the
    state's arrays from the devices: call it when you want to look, not on every step.

    Args:
        state: a `HealthState`, or an optax state holding one.

    Returns:
        A `HealthSummary`: `str()` is a table of the flagged leaves (a healthy run is one
        line), `to_dict()` its contents, `ok` whether nothing was flagged.

    Raises:
        TypeError: when `state` holds no `HealthState`, or holds traced values (inside
            `jax.jit`).
        ValueError: when it holds more than one.

    Example:
        >>> import jax.numpy as jnp, optax, jaxcheck
        >>> opt = optax.chain(jaxcheck.gradient_health(), optax.adam(1e-3))
        >>> state = opt.init({"w": jnp.ones(3)})
        >>> _, state = opt.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)})
        >>> print(jaxcheck.health(state))
        jaxcheck.health: healthy — 1 leaf after 1 step, nothing vanishing, exploding or non-finite
    """
    s, path = _found(state)
    after, dropped = _rescaling_before(state, path), _dropped_unseen(state, path)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(s)):
        raise TypeError(
            "jaxcheck.health reads the state on the host and cannot run inside jax.jit or "
            "another transformation: return the optimizer state from the jitted step and "
            "call it outside."
        )
    v = jax.device_get({f.name: _array(getattr(s, f.name)) for f in dataclasses.fields(s)[1:]})
    if np.ndim(v["step"]):
        raise ValueError(
            "jaxcheck.health: the gradient_health state has leading axes of shape "
            f"{np.shape(v['step'])} (the states of several training runs, from jax.vmap, or of "
            "one run's copies on several devices, from jax.pmap); read one run or copy at a "
            "time, e.g. jaxcheck.health(jax.tree.map(lambda a: a[0], state))."
        )
    leaves = []
    for i, path in enumerate(s.paths):

        def first(kind, i=i):
            step = int(v[f"first_{kind}"][i])
            return None if step < 0 else step

        grad_norm = float(v["grad_norm"][i])
        param_norm = float(v["param_norm"][i])
        param_norm = math.nan if param_norm < 0 else param_norm  # NO_PARAMS
        leaves.append(
            LeafHealth(
                path=path,
                grad_norm=grad_norm,
                average=float(v["average"][i]) if _seen(v, i) else math.nan,
                param_norm=param_norm,
                # (a parameter gone Inf has no ratio: grad / inf = 0 is no vanished gradient)
                ratio=grad_norm / param_norm if 0 < param_norm < math.inf else math.nan,
                worst_spike=_spike(float(v["worst_spike"][i])),
                vanishing=bool(v["vanishing"][i]),
                exploding=bool(v["exploding"][i]),
                nonfinite=bool(v["nonfinite"][i]),
                first_vanishing=first("vanishing"),
                first_exploding=first("exploding"),
                first_nonfinite=first("nonfinite"),
                vanishing_steps=int(v["vanishing_steps"][i]),
                exploding_steps=int(v["exploding_steps"][i]),
                nonfinite_steps=int(v["nonfinite_steps"][i]),
            )
        )
    return HealthSummary(
        steps=int(v["step"]),
        leaves=tuple(leaves),
        skipped=int(v["skipped"]),
        # NaN parameters were passed all the same
        params_seen=bool(np.any(~(v["param_norm"] < 0))),
        after=after,
        dropped=dropped,
    )


def _rescaling_before(state: Any, path) -> tuple[str, ...]:
    """The names of the optax rescaling states (ScaleBy..., as Adam's) that come before
    the `HealthState` (at key `path` in `state`) in the tuples (chains) and ordered dicts
    (named chains) holding it; where none, (`STATELESS`,) if a transformation that keeps
    no state comes before it (clip_by_global_norm's state is optax's EmptyState, as
    scale's is: which one it was is not known)."""
    empty = lambda x: type(x).__name__ == STATELESS  # noqa: E731
    names, stateless, node = [], False, state
    try:
        for entry in path:
            index, key = getattr(entry, "idx", None), getattr(entry, "key", None)
            earlier = ()
            if isinstance(node, tuple) and index is not None:
                earlier = node[:index]
            elif isinstance(node, collections.OrderedDict) and key in node:
                # optax.named_chain's stages, in order (optax.multi_transform's plain
                # dict holds parallel partitions, none before another)
                keys = list(node)
                earlier = [node[k] for k in keys[: keys.index(key)]]
            for before in earlier:
                found = jax.tree_util.tree_leaves(before, is_leaf=_rescaling)
                names += [type(x).__name__ for x in found if _rescaling(x)]
                stateless |= any(map(empty, jax.tree_util.tree_leaves(before, is_leaf=empty)))
            node = _child(node, entry)
    except Exception:  # noqa: BLE001 - a container walked otherwise (nnx's): only a note
        return ()
    return tuple(dict.fromkeys(names)) or ((STATELESS,) if stateless else ())


STATELESS = "EmptyState"  # optax's state of a transformation that keeps none


def _dropped_unseen(state: Any, path) -> int:
    """How many updates an `optax.apply_if_finite` holding the `HealthState` (at key
    `path` in `state`) in its inner state dropped for NaN/Inf (its `total_notfinite`): it
    keeps the inner state of the step before, so gradient_health's record of them is
    dropped too."""
    dropped, node = 0, state
    try:
        for entry in path:
            if type(node).__name__ == "ApplyIfFiniteState" and hasattr(node, "total_notfinite"):
                dropped += int(jax.device_get(node.total_notfinite))
            node = _child(node, entry)
    except Exception:  # noqa: BLE001 - a container walked otherwise (nnx's): only a note
        return 0
    return dropped


# What gradient_health missed, after optax transformations with states of these names
_AFTER_WHY_SCALED = (
    "Adam's are about 1 whatever the gradient's size, so vanishing and exploding go unseen"
)
_AFTER_WHY = (
    (
        {"TraceState", "EmaState"},
        "a momentum or average sums the steps, so a spike or a collapse shows late, smoothed",
    ),
    ({"ZeroNansState"}, "NaN/Inf zeroed there went unseen"),
)
_TRANSFORMING = set().union(*(names for names, _ in _AFTER_WHY))


def _rescaling(x) -> bool:
    """Whether `x` is the state of an optax transformation that changes the updates it
    passes on from step to step (a NamedTuple named ScaleBy..., as Adam's, or a momentum's
    or zero_nans' state)."""
    name = type(x).__name__
    return hasattr(x, "_fields") and (name.startswith("ScaleBy") or name in _TRANSFORMING)


def _child(node, entry):
    for attr in ("idx", "key"):
        if hasattr(entry, attr):
            return node[getattr(entry, attr)]
    return getattr(node, entry.name)


def find(state: Any) -> HealthState:
    """The one `HealthState` inside an optimizer state (see `health` for the errors)."""
    return _found(state)[0]


def _found(state: Any) -> tuple:
    """(the one `HealthState` inside an optimizer state, its key path there)."""
    found = [
        (path, s)
        for path, s in jax.tree_util.tree_flatten_with_path(
            state, is_leaf=lambda x: isinstance(x, HealthState)
        )[0]
        if isinstance(s, HealthState)
    ]
    if not found:
        fields = [
            jax.tree_util.keystr(path[:i])
            for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]
            for i, entry in enumerate(path)
            if getattr(entry, "key", getattr(entry, "name", None)) == "first_vanishing"
        ]
        if fields:  # its fields, without the state itself (flax's nnx.state converts it)
            where = fields[0]
            raise TypeError(
                f"jaxcheck.health: the {type(state).__name__} passed holds the fields of a "
                f"gradient_health state (at state{where}) but not the state itself, which "
                "knows the leaves' paths: nnx.state(optimizer) converts it so, and so does "
                "a checkpoint restored without a target. Pass the optimizer state as the "
                "optimizer holds it (optimizer.opt_state), or the nnx.Optimizer itself; "
                "restore a checkpoint onto the structure opt.init(params) gives (orbax: "
                "restore(path, opt.init(params)))."
            )
        raise TypeError(
            f"jaxcheck.health: found no gradient_health state in the {type(state).__name__} "
            "passed; pass the optimizer state of a chain that includes "
            "jaxcheck.gradient_health() (e.g. optax.chain(jaxcheck.gradient_health(), "
            "optax.adam(1e-3)))."
        )
    if len(found) > 1:
        where = ", ".join(f"state{jax.tree_util.keystr(path)}" for path, _ in found[:4])
        raise ValueError(
            f"jaxcheck.health: the state holds {len(found)} gradient_health states, at "
            f"{where}{', ...' if len(found) > 4 else ''}; pass the one you want, e.g. "
            f"jaxcheck.health({where.split(', ')[0]})."
        )
    path, s = found[0]
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(s)[0]:
        deleted = getattr(leaf, "is_deleted", None)
        concrete = isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
        if concrete and callable(deleted) and deleted():
            raise ValueError(
                f"jaxcheck.health: the gradient_health state (at state"
                f"{jax.tree_util.keystr(path)}) holds an array that has been deleted (at "
                f"{jax.tree_util.keystr(key_path)}): the optimizer state was donated to a "
                "jax.jit function (donate_argnums), whose buffers are gone. Read the state "
                "that function returned instead."
            )
    return s, path


def fired(state: HealthState) -> int:
    """How many (leaf, flag) pairs have fired so far: grows only when a flag fires on a
    leaf for the first time. Reads three small vectors from the devices."""
    firsts = jax.device_get(
        [_array(x) for x in (state.first_vanishing, state.first_exploding, state.first_nonfinite)]
    )
    return int(sum(np.sum(np.asarray(f) >= 0) for f in firsts))


def _array(field):
    """A field of the state as its array: a flax `nnx.Optimizer` keeps the state's arrays
    wrapped in its variables, each a pytree of the one array it holds."""
    leaves = jax.tree_util.tree_leaves(field)
    return leaves[0] if len(leaves) == 1 else field


def _spike(x: float) -> float:
    """The worst spike as `LeafHealth` gives it: NaN where there is none (NO_SPIKE; NaN in
    states saved before that sentinel)."""
    return math.nan if x < 0 else x


def _seen(v: dict, i: int) -> bool:
    """Whether leaf i has a history (a state from before per-leaf counts has one count)."""
    count = np.asarray(v["entered"])
    return bool(count[i] > 0 if count.ndim else count > 0)


def _e(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.1e}"


def _plain(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    return x
