"""`PeriodicCheck`: the gradient check run every N steps of a training loop, with its
history."""

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import _health, _keywords, _options, _tree
from ._checker import Checker
from ._errors import GradientCheckError
from ._report import Report, Status


@dataclasses.dataclass(frozen=True)
class CheckRecord:
    """One check made during training: at which step, why, what it found, what it cost."""

    step: int
    reason: str  # "every N steps", or "health flags" when gradient_health flagged a leaf
    status: Status
    relative_error: float
    tolerance: float
    failing: tuple[str, ...]  # key paths of the leaves found wrong, or NaN/Inf
    seconds: float  # wall time of the check, compilation included
    report: Report = dataclasses.field(repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status is Status.PASS

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["status"] = self.status.value
        out["failing"] = list(self.failing)
        del out["report"]
        for k in ("relative_error", "tolerance"):
            if not math.isfinite(out[k]):
                out[k] = None
        return out


class PeriodicCheck:
    """Check the gradient of `fn` every `every` steps of training, and keep the history.

    Call it on every step with the step number and the current parameters and batch:
    `check(step, params, batch)`. On steps that are multiples of `every` (and, when you pass
    `opt_state=`, on a step where `gradient_health` flagged a leaf for the first time) it
    runs `Checker(fn, **options)(params, *args)` (compiled once, on the first check) and
    appends a `CheckRecord` to `history`; on the other steps it returns None at once without
    touching the devices. `first_failure` is the first step whose check did not pass, and
    `cost_fraction(training_seconds)` the time spent checking relative to training.

    Unless you pass `localize=`, a check runs the all-leaf comparison only
    (`localize=False`, 2K + 1 evaluations of `fn` when it passes), and a check that does not
    pass is run again with `localize=True`, so that its record names the wrong leaves. With
    `localize="auto"` (as `verify`) every check also checks on its own each leaf too small
    for the all-leaf check to resolve, which on a trained model can cost 20 times more.
    A gradient bug rarely needs the whole batch to show: checking on a few examples of it
    costs proportionally less.

    Passing `opt_state=` reads three small vectors from the devices on every call (a
    synchronization point of the training loop); pass it every few steps if that matters.
    Every flag fired before the first call given `opt_state=` counts as new there (one
    that fired between two calls of a run that passes it every few steps is; so is one a
    state restored from a checkpoint brings, which triggers one check at the first call).
    The flags read are those of the state passed: the state after the update of the batch passed
    with it makes the triggered check run on the batch that raised the flag, the state
    before it (the loop of the README) on the next one.

    Args:
        fn: the loss, `fn(params, *args)`, as given to `verify`.
        every: check on steps that are multiples of this (step 0 included).
        **options: options of `jaxcheck.verify` (validated now). With
            `raise_on_failure=True` a failing check is recorded, then raised.

    Example:
        >>> import jax.numpy as jnp, jaxcheck
        >>> loss = lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2)
        >>> check = jaxcheck.PeriodicCheck(loss, every=10, num_directions=8)
        >>> x, w = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), jnp.ones(3)
        >>> for step in range(25):
        ...     report = check(step, w, x)
        ...     w = w * 0.9
        >>> [(r.step, r.status.value) for r in check.history], check.first_failure
        ([(0, 'pass'), (10, 'pass'), (20, 'pass')], None)
    """

    def __init__(self, fn: Callable, *more: Any, every: int = 100, **options: Any):
        if more:
            raise TypeError(
                f"jaxcheck.PeriodicCheck takes fn alone positionally, got {len(more) + 1} "
                "positional arguments; every and the options are keywords: "
                "PeriodicCheck(fn, every=100, num_directions=8), say."
            )
        _keywords.refuse_unknown(
            "jaxcheck.PeriodicCheck",
            "PeriodicCheck(fn, every=..., **options)(step, params, *args)",
            options,
            ("every", *_options.NAMES),
            fn,
        )
        every = _options.whole(every)  # as `step` is taken
        if not isinstance(every, int) or isinstance(every, bool):
            raise TypeError(
                f"every={_described(every)} must be an int >= 1 (check every that many steps), "
                f"got {type(every).__name__}."
            )
        if every < 1:
            raise ValueError(f"every={every!r} must be an int >= 1 (check every that many steps).")
        if "localize" in options:
            self.checker, self._localizer = Checker(fn, **options), None
        else:
            self.checker = Checker(fn, **{**options, "localize": False})
            self._localizer = Checker(fn, **{**options, "localize": True})
        self.every = every
        self.history: list[CheckRecord] = []
        self._fired = 0

    def __call__(
        self, step: int, params: Any, *args: Any, opt_state: Any = None, **keywords: Any
    ) -> Report | None:
        """Check at this step if it is due; return the report, or None when no check ran."""
        if keywords:  # (as a Checker says it)
            options = sorted(set(keywords) & set(_options.NAMES))
            hint = (
                f" {', '.join(options)} {'is an option' if len(options) == 1 else 'are options'}"
                " of the check, fixed when it is made: pass "
                f"{', '.join(f'{k}=...' for k in options)} to PeriodicCheck(fn, ...)."
                if options
                else " fn's keyword arguments cannot be passed through it: bind them first "
                "(functools.partial) or pass them positionally."
            )
            raise TypeError(
                "a PeriodicCheck is called as check(step, params, *args, opt_state=None); it "
                f"got keyword arguments {', '.join(sorted(keywords))}.{hint}"
            )
        if any(
            isinstance(x, jax.core.Tracer)
            for x in jax.tree_util.tree_leaves((step, params, args, opt_state))
        ):
            raise TypeError(
                "jaxcheck.PeriodicCheck runs on the host (it decides whether to check, then "
                "checks and reads the numbers back), so it cannot be called inside jax.jit or "
                "another transformation: call it in the Python training loop, outside the "
                "jitted step."
            )
        number = _options.whole(step)
        if not isinstance(number, int) or isinstance(number, bool):
            swapped = ""
            if isinstance(_options.whole(params), int) and not isinstance(params, bool):
                swapped = f" (params={params!r} looks like the step: are the two swapped?)"
            raise TypeError(
                f"step={_described(step)} must be an int, the training step's number (the check "
                f"runs on multiples of every={self.every}); call check(step, params, *args)"
                f"{swapped}."
            )
        if number < 0:
            raise ValueError(
                f"step={step!r} is negative; pass the training step's number, counted from 0."
            )
        reason = "every N steps" if number % self.every == 0 else None
        if opt_state is not None:
            try:
                found = _health.find(opt_state)
            except (TypeError, ValueError) as err:
                said = str(err).removeprefix("jaxcheck.health: ")
                raise type(err)(
                    f"jaxcheck.PeriodicCheck: opt_state= is read for gradient_health's flags, "
                    f"and {said}"
                ) from None
            fired = _health.fired(found)
            if fired > self._fired and reason is None:
                reason = "health flags"
            # (fewer than before: the state was rolled back to a checkpoint, where a flag
            # that fires again is new again)
            self._fired = fired
        if reason is None:
            return None
        start = time.perf_counter()
        try:
            report = self.checker(params, *args)
            if self._localizer is not None and not report.ok:
                report = self._localizer(params, *args)
            raised = None
        except GradientCheckError as error:
            report, raised = error.report, error
            if self._localizer is not None:
                try:
                    self._localizer(params, *args)
                except GradientCheckError as localized:
                    report, raised = localized.report, localized
        self.history.append(
            CheckRecord(
                step=number,
                reason=reason,
                status=report.status,
                relative_error=float(report.relative_error),
                tolerance=float(report.tolerance),
                failing=tuple(
                    leaf.path or "(root)"
                    for leaf in report.leaves
                    if leaf.status in (Status.FAIL, Status.NONFINITE)
                ),
                seconds=time.perf_counter() - start,
                report=report,
            )
        )
        if raised is not None:
            raise raised
        return report

    @property
    def first_failure(self) -> int | None:
        """The step of the first check that did not pass (the smallest such step, should
        the steps have come out of order, as after a restart), or None."""
        return min((r.step for r in self.history if not r.ok), default=None)

    @property
    def seconds(self) -> float:
        """Wall time spent in checks so far, compilation included."""
        return sum(r.seconds for r in self.history)

    def cost_fraction(self, training_seconds: float) -> float:
        """Time spent checking as a fraction of `training_seconds`, the time the training
        itself took (measured without the checks)."""
        if np.ndim(training_seconds) == 0 and hasattr(training_seconds, "dtype"):
            # a NumPy or JAX scalar array (a time summed with jnp)
            if np.issubdtype(training_seconds.dtype, np.floating) or np.issubdtype(
                training_seconds.dtype, np.integer
            ):
                training_seconds = training_seconds.item()
        if not isinstance(training_seconds, int | float | np.integer | np.floating) or isinstance(
            training_seconds, bool
        ):
            raise TypeError(
                f"training_seconds must be a number of seconds, got "
                f"{type(training_seconds).__name__} {training_seconds!r}."
            )
        if not 0 < training_seconds < math.inf:
            raise ValueError(f"training_seconds={training_seconds!r} must be > 0 and finite.")
        return self.seconds / training_seconds

    def __str__(self) -> str:
        if not self.history:
            return f"PeriodicCheck(every={self.every}): no checks yet"
        first = min((r for r in self.history if not r.ok), key=lambda r: r.step, default=None)
        if first is None:
            outcome = "all passed"
        elif first.status is Status.FAIL:
            outcome = f"first failure at step {first.step}"
        else:  # not a verdict on the gradient: say which
            outcome = f"first check not passed at step {first.step} ({first.status.value})"
        head = (
            f"PeriodicCheck(every={self.every}): {len(self.history)} checks, {outcome}, "
            f"{self.seconds:.2f} s"
        )
        rows = [["step", "status", "rel. error", "tolerance", "seconds", "failing leaves"]]
        for r in self.history:
            rows.append(
                [
                    str(r.step),
                    r.status.value,
                    f"{r.relative_error:.1e}" if math.isfinite(r.relative_error) else "—",
                    f"{r.tolerance:.1e}" if math.isfinite(r.tolerance) else "—",
                    f"{r.seconds:.2f}",
                    ", ".join(r.failing),
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join([head] + ["  " + fmt.format(*row).rstrip() for row in rows])


def _described(x) -> str:
    """`x` in a few words for an error: a container as its type and number of leaves
    (a swapped params tree would fill the message otherwise)."""
    if isinstance(x, list | tuple | dict):
        return f"<{type(x).__name__} of {len(jax.tree_util.tree_leaves(x))} leaves>"
    return _tree.describe(x)
