"""pytest plugin: `pytest --jaxcheck` runs every `jax.test_util.check_grads` call of a suite
through `jaxcheck.check_grads`, without editing a test.

Loaded through the `pytest11` entry point (or `-p jaxcheck.pytest_plugin`), it only adds the
option; without `--jaxcheck` it changes nothing. With it, the original `check_grads` is
replaced in `jax._src.public_test_util`, which defines it, and wherever an already loaded
module holds it, so `jax.test_util`, `jax._src.test_util` and test modules that import it
later get the replacement too; the original function's own code calls the replacement, for
references taken earlier (a `functools.partial` built in a conftest). A wrong derivative,
or a NaN/Inf one where the function is finite, fails the test. A check with nothing to
judge (a kink at the point, the function itself NaN/Inf there, or `modes` naming no mode,
which JAX passes) does not; it is listed, with the wrong ones (and those whose error the
test caught, as it expected), in a summary at the end, under pytest-xdist too.
"""

import dataclasses
import sys

import pytest

ENTRY_POINT = "jaxcheck"  # the name of the pytest11 entry point in pyproject.toml


def pytest_addoption(parser):
    parser.getgroup("jaxcheck").addoption(
        "--jaxcheck",
        action="store_true",
        default=False,
        help="run jax.test_util.check_grads calls through jaxcheck.check_grads and list the "
        "checks that did not pass at the end",
    )


def pytest_plugin_registered(plugin, plugin_name, manager):
    # `-p jaxcheck.pytest_plugin` registers this module under its module name; pytest would
    # then load the same module again through the `jaxcheck` entry point and stop with
    # "Plugin already registered under a different name" (pytest-dev/pytest#4718).
    if (
        plugin is sys.modules[__name__]
        and plugin_name != ENTRY_POINT
        and manager.get_plugin(ENTRY_POINT) is None
    ):
        manager.set_blocked(ENTRY_POINT)


def pytest_configure(config):
    if config.getoption("jaxcheck", default=False):
        config.pluginmanager.register(Router(), "jaxcheck-router")


@dataclasses.dataclass
class Record:
    """A routed check that did not pass: where it ran and what it found."""

    nodeid: str
    verdict: str  # "fail", "unjudged" or "error"
    headline: str


class Router:
    """Holds the replacement while the session runs and collects what it found."""

    def __init__(self):
        self.nodeid = OUTSIDE
        self.ended = False  # the session is over: route nothing more
        self.records: list[Record] = []
        self.calls = 0
        # what the running test's checks found, not yet on its report: each test report
        # carries its own (in `user_properties`), which pytest-xdist sends from the worker
        # that ran the test to the process that prints the summary
        self.pending: list[list[str]] = []
        self.pending_calls = 0
        self.raised: list[tuple[int, BaseException]] = []  # (index in pending, the error)
        # calls made outside any test (at a module's import, while collecting), by where
        # they ran: carried on the next report, and counted once in the summary though
        # every pytest-xdist worker imports the module and makes them again
        self.collecting = OUTSIDE
        self.outside: dict[str, dict] = {}
        self.outside_counted: set[str] = set()
        self.replaced: list[tuple[object, str, object]] = []

    # -- replacing the original -----------------------------------------------------------

    def pytest_configure(self, config):
        # Only the module that defines check_grads is imported here; the others take the
        # replacement from it when a test imports them. Importing jax._src.test_util now
        # would also bind its capture_stdout to the stdout of this moment, not to pytest's
        # capture, and JAX's tests that read what they print would fail.
        from jax._src import public_test_util

        self.original = public_test_util.check_grads
        self.replacement = self._make_replacement()
        for module in list(sys.modules.values()):
            for attr, value in list(getattr(module, "__dict__", {}).items()):
                if value is self.original:
                    setattr(module, attr, self.replacement)
                    self.replaced.append((module, attr, value))
        self.route = public_test_util.__dict__.get(_ROUTE)
        public_test_util.__dict__[_ROUTE] = self.replacement
        if getattr(self.original, "routed_by_jaxcheck", False):
            # a session inside another one's test (pytester's runpytest_inprocess): the
            # original's code routes already, to this session's replacement while it runs;
            # afterwards calls go back to the outer session's
            self.code = None
            return
        # a reference taken before now that no module attribute holds (a conftest's
        # functools.partial(check_grads, ...), a default argument) still calls the
        # original function object: its code is swapped for a call of the replacement
        # (looked up in the original's own module, which its code reads globals from)
        self.code = self.original.__code__
        self.original.__code__ = _routed.__code__

    def pytest_unconfigure(self, config):
        # a name bound to the replacement during the session (a test module's `from
        # jax.test_util import check_grads`, a default argument) outlives it, in a process
        # that runs pytest again (an IDE, a notebook): from now on it calls the original
        self.ended = True
        for module, attr, value in reversed(self.replaced):
            setattr(module, attr, value)
        self.replaced.clear()
        if not hasattr(self, "route"):  # (configure did not run)
            return
        if self.code is not None:
            self.original.__code__ = self.code
            self.code = None
        from jax._src import public_test_util

        if self.route is None:
            public_test_util.__dict__.pop(_ROUTE, None)
        else:
            public_test_util.__dict__[_ROUTE] = self.route
        del self.route

    def _make_replacement(self):
        import functools

        from . import _check_grads
        from ._errors import one_line

        @functools.wraps(self.original)
        def check_grads(f, args, order, modes=("fwd", "rev"), atol=None, rtol=None, eps=None):
            if self.ended:
                return self.original(f, args, order, modes, atol, rtol, eps)
            if self.nodeid == OUTSIDE:
                found = self.outside.setdefault(self.collecting, {"calls": 0, "records": []})
                records = found["records"]
                found["calls"] += 1
            else:
                records = self.pending
                self.pending_calls += 1
            # JAX checks the modes it finds `in modes` and ignores the rest: a test whose
            # modes name none (modes=(), a parametrization's empty list) passes there
            once = _once(modes)
            found = tuple(m for m in _check_grads.MODES if _has(modes, m))
            if not found:
                said = (
                    "modes, an iterator, gave no mode as JAX reads it ('fwd' in modes, then "
                    "'rev' in modes, from the one iterator): nothing checked; pass a tuple"
                    if once
                    else f"modes={modes!r} names no mode: nothing checked"
                )
                records.append(["unjudged", said])
                return None
            if isinstance(modes, str) or once or len(found) < _count(modes):
                # the names JAX reads: in a string ("fwdrev" holds both), beside unknown
                # ones, which it ignores, or from an iterator, which reading them used up
                modes = found
            try:
                outcome = _check_grads.run(f, args, order, modes, atol, rtol, eps)
            except Exception as e:
                records.append(["error", one_line(e)])
                self._raised(records, e)
                raise
            if outcome.verdict != "pass":
                records.append([outcome.verdict, outcome.headline])
            if outcome.verdict == "fail":
                error = _check_grads.error(outcome.report)
                self._raised(records, error)
                raise error

        check_grads.routed_by_jaxcheck = True
        return check_grads

    def _raised(self, records, error) -> None:
        """Remember the error a running test's check raised (its last record), to tell
        when the test reports whether the error ended it or the test caught it."""
        if records is self.pending:
            self.raised.append((len(records) - 1, error))

    # -- knowing which test is running ----------------------------------------------------

    def pytest_collectstart(self, collector):
        if isinstance(collector, pytest.Module):
            self.collecting = f"{collector.nodeid} (at import)"

    def pytest_collectreport(self, report):
        self.collecting = OUTSIDE

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.nodeid = item.nodeid
        try:
            return (yield)
        finally:
            self.nodeid = OUTSIDE

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        # the errors checks raised were caught (pytest.raises, assertRaises, a fixture's
        # try) where none of them ended this phase, whatever else then made the test fail;
        # where one did, the others are failures on the way to it (hypothesis shrinking a
        # failing example), not expected ones
        ended = _chain(call.excinfo.value if call.excinfo is not None else None)
        # (a test that skips itself on the error, pytest.skip or unittest.SkipTest raised
        # while handling it, caught it too; a doctest whose output, a traceback expected
        # there, differed did not: doctest caught the error only to compare its text)
        compared = report.failed and any(_differed_in_text(e) for e in ended)
        if report.skipped or not (
            compared or any(error is e for _, error in self.raised for e in ended)
        ):
            for i, _ in self.raised:
                self.pending[i][0] = "caught"
        self.raised = []
        if self.pending_calls:
            found = {"calls": self.pending_calls, "records": self.pending}
            report.user_properties.append((PROPERTY, found))
            self.pending, self.pending_calls = [], 0
        if self.outside:
            report.user_properties.append((OUTSIDE_PROPERTY, self.outside))
            self.outside = {}
        return report

    def pytest_runtest_logreport(self, report):
        for name, found in report.user_properties:
            if name == OUTSIDE_PROPERTY:
                self._count_outside(found)
            if name != PROPERTY:
                continue
            self.calls += found["calls"]
            for verdict, headline in found["records"]:
                # a GradientCheckError that ended a test marked xfail, as it expected (one
                # the test caught is marked when its report is made)
                if verdict == "fail" and hasattr(report, "wasxfail"):
                    verdict = "caught"
                self.records.append(Record(report.nodeid, verdict, headline))

    def _count_outside(self, outside):
        for where, found in outside.items():
            if where not in self.outside_counted:
                self.outside_counted.add(where)
                self.calls += found["calls"]
                self.records += [Record(where, v, h) for v, h in found["records"]]

    # -- the summary ----------------------------------------------------------------------

    def pytest_terminal_summary(self, terminalreporter):
        self._count_outside(self.outside)  # (made after the last test, or with no test)
        self.outside = {}
        counts = {v: sum(r.verdict == v for r in self.records) for v in VERDICTS}
        passed = self.calls - len(self.records)
        tr = terminalreporter
        tr.section("jaxcheck check_grads")
        tr.line(
            f"{self.calls} check_grads calls routed to jaxcheck: {passed} passed, "
            + ", ".join(f"{counts[v]} {VERDICTS[v]}" for v in VERDICTS)
        )
        for verdict in VERDICTS:
            for r in self.records:
                if r.verdict == verdict:
                    tr.line(f"{verdict.upper():8} {r.nodeid}: {r.headline}")


def _has(modes, mode: str) -> bool:
    try:
        return mode in modes
    except TypeError:  # not a container: check_grads says what modes must be
        return True


def _once(modes) -> bool:
    """Whether `modes` is an iterator (a generator), which can be read once only."""
    try:
        return iter(modes) is modes
    except TypeError:
        return False


def _count(modes) -> int:
    """The number of distinct names in `modes` (0 where they cannot be counted: check_grads
    then says what modes must be)."""
    try:
        return len(set(modes))
    except TypeError:
        return 0


def _chain(error) -> list:
    """`error` and the errors it was raised from or while handling, and those a doctest's
    failure holds (pytest's doctest items raise their own exception around the example's)."""
    out, todo = [], [error]
    while todo:
        error = todo.pop()
        if error is None or any(error is e for e in out):
            continue
        out.append(error)
        todo += [error.__cause__, error.__context__]
        # doctest.UnexpectedException, and pytest's MultipleDoctestFailures of them
        for held in [error, *getattr(error, "failures", ())]:
            info = getattr(held, "exc_info", None)
            if isinstance(info, tuple) and len(info) == 3:
                todo.append(info[1])
    return out


def _differed_in_text(error) -> bool:
    """Whether `error` is a doctest example's output differing from the one expected
    (doctest's DocTestFailure, alone or among pytest's MultipleDoctestFailures)."""
    return any(
        type(e).__name__ == "DocTestFailure" for e in [error, *getattr(error, "failures", ())]
    )


OUTSIDE = "(outside a test)"  # where a call made at import or collection is listed
_ROUTE = "_check_grads_routed_by_jaxcheck"  # the replacement, in check_grads' module


def _routed(f, args, order, modes=("fwd", "rev"), atol=None, rtol=None, eps=None):
    """The code the original check_grads runs while the plugin is on (its globals are
    those of JAX's module, where the replacement is put under `_ROUTE`)."""
    return _check_grads_routed_by_jaxcheck(f, args, order, modes, atol, rtol, eps)  # noqa: F821


OUTSIDE_PROPERTY = "jaxcheck-outside"  # calls made outside any test, carried by the next report
PROPERTY = "jaxcheck"  # the key of what a test's checks found in its report's user_properties

VERDICTS = {
    "fail": "failed (raised GradientCheckError, an AssertionError, in the test)",
    "caught": "failed or raised as the test expected (it caught the error, or is xfail)",
    "unjudged": (
        "not judged (kink or non-finite fn at the point, a derivative below fn's rounding, "
        "empty, or no mode asked; nothing raised)"
    ),
    "error": "raised an error",
}
