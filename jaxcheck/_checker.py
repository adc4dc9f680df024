"""`Checker`: one function's gradient check, set up once and run many times."""

import dataclasses
from collections.abc import Callable
from typing import Any

from . import _fingerprint, _keywords, _options, _plan, _state, _tree, _verify
from ._report import Report


class Checker:
    """A reusable gradient check of `fn`, for loops and test suites.

    The options (any keyword of `verify`) are validated once, when the checker is made.
    Every call `checker(params, *args)` is `verify(fn, params, *args, **options)`; calls
    with the same shapes, dtypes and shardings (and the same values of Python numbers in
    `args`, held fixed as numbers: pass a changing one as an array) reuse the compiled
    programs, so only the first one compiles; they are compiled for the speed of repeated
    runs (`verify` compiles small CPU programs for compile time instead). `compilations`
    counts the programs this checker has compiled. Like `jax.jit`, a checker keeps what it
    traced for the shapes and dtypes it has met (a new shape traces fn as it is then), and
    its programs serve no other check: make a new one where fn's behaviour changes between
    calls (a global or a setting it reads; `verify` checks that itself, at the cost of one
    trace of fn's vjp per call).

    Example:
        >>> import jax.numpy as jnp, jaxcheck
        >>> checker = jaxcheck.Checker(lambda p, x: jnp.sum(jnp.tanh(p * x)), num_directions=8)
        >>> reports = [checker(jnp.full(4, s), jnp.arange(4.0)) for s in (0.1, 0.2, 0.3)]
        >>> [r.status.value for r in reports]
        ['pass', 'pass', 'pass']
        >>> [r.num_compiled for r in reports][1:]
        [0, 0]
    """

    def __init__(self, fn: Callable, **options: Any):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
        _verify.refuse_a_checker(fn, "Checker(fn, **options)")
        _keywords.refuse_unknown(
            "jaxcheck.Checker",
            "Checker(fn, **options)(params, *args)",
            options,
            _options.NAMES,
            fn,
        )
        self.fn = fn
        self.options = _options.make(**options)
        self._given = tuple(options)
        self.compilations = 0
        self._keyed = None  # (fn, options), their functions keyed by what they compute
        self._packed = {}  # `_state.PACKED_SEEN` of its calls

    def __call__(self, params: Any, *args: Any, **keywords: Any) -> Report:
        if keywords:
            options = sorted(set(keywords) & set(_options.NAMES))
            hint = (
                f" {', '.join(options)} {'is an option' if len(options) == 1 else 'are options'}"
                " of the check, fixed when the checker is made: pass "
                f"{', '.join(f'{k}=...' for k in options)} to Checker(fn, ...), or make a "
                "second checker for other values."
                if options
                else " fn's keyword arguments cannot be passed through a checker: close over "
                "them (functools.partial) or pass them positionally."
            )
            raise TypeError(
                f"a Checker is called as checker(params, *args); it got keyword arguments "
                f"{', '.join(sorted(keywords))}.{hint}"
            )
        _verify.refuse_odd_containers(params, args)
        with _tree.settled(params, self.fn, args) as settled:
            return self._run(settled, args)

    def _run(self, params, args):
        again = self._keyed is not None
        if self._keyed is None:
            # what fn computes now, once, so that its own calls cost no trace to find that
            # out; keyed by this checker too: a program it compiles at a later call (new
            # shapes, or after the cache dropped one) is traced from fn as it is then, and
            # must not serve another checker, nor verify, of fn as it was at this first call
            fn, options = _verify.keyed(self.fn, params, args, self.options)
            fn = _fingerprint.Keyed(fn.f, (fn.fingerprint, object()))
            self._keyed = fn, options
        fn, options = self._keyed
        before = _plan.compilations
        token = _plan.REUSED.set(True)  # compiled for repeated runs
        later = _state.CHECKER_AGAIN.set(again)
        packed = _state.PACKED_SEEN.set(self._packed)
        try:
            report = _verify.run(fn, params, args, options)
        finally:
            _state.PACKED_SEEN.reset(packed)
            _state.CHECKER_AGAIN.reset(later)
            _plan.REUSED.reset(token)
            self.compilations += _plan.compilations - before
        shared = _keywords.shared_with(self.fn, 1 + len(args), self._given)
        if shared:
            note = _keywords.shared_note(shared)
            report = dataclasses.replace(report, problems=(note, *report.problems))
        return report

    def __repr__(self) -> str:
        shown = "".join(f", {k}={v!r}" for k, v in self.options.changed().items())
        return f"Checker({getattr(self.fn, '__name__', repr(self.fn))}{shown})"
