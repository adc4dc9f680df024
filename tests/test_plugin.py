"""The pytest plugin: `pytest --jaxcheck` routes JAX's check_grads to jaxcheck."""

import os
import subprocess
import sys
import textwrap

SAMPLE = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import pytest
    from jax._src import public_test_util
    from jax._src import test_util as jtu
    from jax.test_util import check_grads


    @jax.custom_jvp
    def wrong_sin(x):
        return jnp.sin(x)


    @wrong_sin.defjvp
    def _wrong_sin_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return wrong_sin(x), 1.5 * jnp.cos(x) * t


    X = np.linspace(0.1, 1.0, 4)


    def test_correct():
        check_grads(lambda x: jnp.sin(x) ** 2, (X,), order=1)


    def test_wrong_custom_jvp():
        check_grads(wrong_sin, (X,), order=1, modes=["fwd"])


    def test_kink():
        check_grads(jnp.abs, (np.zeros(3),), order=1)


    def test_nan_at_point():
        check_grads(jnp.log, (np.array([-1.0, -2.0]),), order=1)


    def test_via_public_test_util():
        public_test_util.check_grads(jnp.tanh, (X,), 1, ("rev",))


    def test_via_jtu():
        jtu.check_grads(wrong_sin, (X,), 1, ("rev",))


    def test_expects_the_wrong_rule_to_fail():
        with pytest.raises(AssertionError):
            check_grads(wrong_sin, (X,), order=1, modes=["fwd"])


    @pytest.mark.xfail(strict=True)
    def test_marked_to_fail():
        check_grads(wrong_sin, (X,), order=1, modes=["fwd"])


    def test_jax_captures_what_the_test_prints():
        # JAX's capture_stdout binds the sys.stdout of the moment jax._src.test_util is
        # imported: under pytest, its capture; the plugin must not import it earlier
        with jtu.capture_stdout() as printed:
            print("hello")
        assert printed() == "hello\\n"
    """
)


# a reference to the original taken before the plugin starts, which no module attribute holds
CONFTEST = textwrap.dedent(
    """
    import functools

    import pytest
    from jax.test_util import check_grads

    CHECK_REV = functools.partial(check_grads, order=1, modes=["rev"])


    @pytest.fixture
    def check_rev():
        return CHECK_REV
    """
)

SAMPLE += textwrap.dedent(
    """

    def test_via_a_partial_made_in_conftest(check_rev):
        check_rev(wrong_sin, (X,))
    """
)


SAMPLE += textwrap.dedent(
    """

    def test_modes_naming_no_mode():
        # JAX checks the modes it finds in `modes`: none here, and the test passes
        check_grads(jnp.sin, (X,), 1, modes=())


    def test_modes_as_jax_reads_them():
        check_grads(jnp.sin, (X,), 1, modes="fwdrev")  # both: JAX asks `"fwd" in modes`
        check_grads(jnp.sin, (X,), 1, modes=("rev", "backward"))  # the unknown one ignored
        # read once (it raised "modes is empty": reading them had used them up)
        check_grads(jnp.sin, (X,), 1, modes=(m for m in ["fwd", "rev"]))


    @pytest.fixture
    def caught_in_a_fixture():
        with pytest.raises(AssertionError):
            check_grads(wrong_sin, (X,), 1, modes=["fwd"])


    def test_caught_in_a_fixture(caught_in_a_fixture):
        pass


    def test_caught_then_failing_otherwise():
        with pytest.raises(AssertionError):
            check_grads(wrong_sin, (X,), 1, modes=["fwd"])
        assert 1 == 2


    @jax.custom_vjp
    def vjp_sin(x):
        return jnp.sin(x)


    vjp_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))


    def test_expects_forward_mode_through_a_custom_vjp_to_raise():
        # in JAX's words, as a suite may match them
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff .jvp. to a"):
            check_grads(vjp_sin, (X,), 1, modes=["fwd"])


    def test_skips_itself_on_the_error():
        try:
            check_grads(wrong_sin, (X,), 1, modes=["fwd"])
        except AssertionError:
            pytest.skip("a known failure")
    """
)


# a check made while the module is imported, outside any test (the kink is not judged, so
# the import goes on); every pytest-xdist worker imports it
AT_IMPORT = textwrap.dedent(
    """
    import numpy as np
    from jax import numpy as jnp
    from jax.test_util import check_grads

    check_grads(jnp.abs, (np.zeros(3),), order=1)


    def test_nothing_to_do_with_it():
        pass
    """
)


def _pytest(tmp_path, *flags):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    return _run(tmp_path, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=line", *flags)


def _run(tmp_path, *arguments):
    """Python with `arguments` in `tmp_path`, outside this run's pytest: its output."""
    # (and without this run's compilation cache: the child's own pytest-xdist workers
    # would share its folder, and one reading an entry the other is writing warns)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PYTEST_") and k != "JAX_COMPILATION_CACHE_DIR"
    }
    env["COLUMNS"] = "300"  # the short summary's lines whole
    done = subprocess.run(
        [sys.executable, *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.stdout + done.stderr


def test_jaxcheck_flag_routes_every_check_grads_and_summarizes(tmp_path):
    """Under pytest-xdist too: each test's report carries what its checks found from the
    worker that ran it to the summary (which listed nothing under `-n 2`)."""
    # (pytest-benchmark, where installed, warns under xdist; on a loaded machine a worker
    # can be stopped inside JAX's garbage-collection callback, which pytest reports as an
    # unraisable-exception warning: neither is the plugin's)
    xdist = (
        "-n",
        "2",
        "-p",
        "no:benchmark",
        "-W",
        "ignore::pytest.PytestUnraisableExceptionWarning",
    )
    (tmp_path / "test_at_import.py").write_text(AT_IMPORT)
    flags = ("-p", "jaxcheck.pytest_plugin", "--jaxcheck", *xdist)
    out = _pytest(tmp_path, *flags, "test_sample.py", "test_at_import.py")
    assert "4 failed, 11 passed, 1 skipped, 1 xfailed" in out, out
    assert "FAILED test_sample.py::test_wrong_custom_jvp - jaxcheck.GradientCheckError" in out
    assert "FAILED test_sample.py::test_via_jtu - jaxcheck.GradientCheckError" in out
    # (routed though the partial holds the original function object)
    assert (
        "FAILED test_sample.py::test_via_a_partial_made_in_conftest - "
        "jaxcheck.GradientCheckError" in out
    )
    summary = out.split("jaxcheck check_grads")[1]
    assert (
        "18 check_grads calls routed to jaxcheck: 5 passed, 3 failed (raised "
        "GradientCheckError, an AssertionError, in the test), "
        "6 failed or raised as the test expected (it caught the error, or is xfail), "
        "4 not judged (kink or non-finite fn at the point, a derivative below fn's rounding, "
        "empty, or no mode asked; nothing raised), 0 raised an error" in summary
    ), summary
    assert (
        "FAIL     test_sample.py::test_wrong_custom_jvp: fail; relative error 5.0e-01 "
        "(tolerance " in summary
    )
    assert "FAIL     test_sample.py::test_via_jtu: fail; relative error 5.0e-01" in summary
    assert (
        "CAUGHT   test_sample.py::test_expects_the_wrong_rule_to_fail: fail; relative error "
        "5.0e-01" in summary
    )
    assert "CAUGHT   test_sample.py::test_marked_to_fail: fail; relative error 5.0e-01" in summary
    # caught where the test expected it, though not in its call, or not by its last word
    # (listed as failing in the test, and as raising an error)
    for caught in (
        "test_caught_in_a_fixture",
        "test_caught_then_failing_otherwise",
        "test_skips_itself_on_the_error",  # (listed as a failure in the test)
    ):
        assert f"CAUGHT   test_sample.py::{caught}: fail; relative error 5.0e-01" in summary
    assert (
        "CAUGHT   test_sample.py::test_expects_forward_mode_through_a_custom_vjp_to_raise: "
        "TypeError: check_grads: modes=('fwd',) needs forward-mode autodiff (jvp)" in summary
    )
    assert "FAILED test_sample.py::test_caught_then_failing_otherwise - assert 1 == 2" in out
    # JAX checks nothing and passes: listed, not failed (it raised a ValueError)
    assert (
        "UNJUDGED test_sample.py::test_modes_naming_no_mode: modes=() names no mode: nothing "
        "checked" in summary
    )
    assert (
        "UNJUDGED test_sample.py::test_kink: inconclusive; only 0 of 16 directions are smooth"
        in summary
    )
    # named where it ran, and counted once though both workers imported the module
    assert (
        "UNJUDGED test_at_import.py (at import): inconclusive; only 0 of 16 directions are "
        "smooth" in summary
    )
    assert summary.count("test_at_import.py") == 1, summary
    assert (
        "UNJUDGED test_sample.py::test_nan_at_point: nonfinite; f's output (root) is NaN/Inf "
        "at params; not judged" in summary
    )
    assert "warning" not in out.lower()


def test_without_the_flag_the_original_check_grads_runs(tmp_path):
    out = _pytest(tmp_path, "-p", "jaxcheck.pytest_plugin", "test_sample.py")
    # JAX's own check fails the planted bugs, and also the kink and the NaN point
    assert "6 failed, 8 passed, 1 skipped, 1 xfailed" in out, out
    assert "FAILED test_sample.py::test_wrong_custom_jvp - AssertionError" in out
    assert "GradientCheckError" not in out
    assert "jaxcheck check_grads" not in out


LATE_IMPORT = textwrap.dedent(
    """
    import jax.numpy as jnp
    from jax.test_util import check_grads

    from sample_rules import wrong_sin


    def check_twice(f, args, check=check_grads):
        check(f, args, 1)


    def test_wrong():
        check_grads(wrong_sin, (jnp.ones(3),), 1)


    def test_wrong_by_default_argument():
        check_twice(wrong_sin, (jnp.ones(3),))
    """
)

RUN_TWICE = textwrap.dedent(
    """
    import sys

    import pytest

    flags = ["-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--tb=line", "test_late.py"]
    pytest.main(["-p", "jaxcheck.pytest_plugin", "--jaxcheck", *flags])
    print("SECOND RUN")
    pytest.main(flags)
    print("routed:", getattr(sys.modules["test_late"].check_grads, "routed_by_jaxcheck", False))
    """
)


def test_names_bound_during_the_session_call_jax_after_it(tmp_path):
    """A test module imported during a --jaxcheck session keeps the replacement it imported;
    a later run in the same process without the flag (an IDE, a notebook) gets JAX's own
    check through it."""
    (tmp_path / "sample_rules.py").write_text(
        "import jax, jax.numpy as jnp\n"
        "@jax.custom_jvp\n"
        "def wrong_sin(x):\n"
        "    return jnp.sin(x)\n"
        "wrong_sin.defjvp(lambda p, t: (jnp.sin(p[0]), 1.5 * jnp.cos(p[0]) * t[0]))\n"
    )
    (tmp_path / "test_late.py").write_text(LATE_IMPORT)
    (tmp_path / "run_twice.py").write_text(RUN_TWICE)
    out = _run(tmp_path, "run_twice.py")
    first, second = out.split("SECOND RUN")
    for test in ("test_wrong", "test_wrong_by_default_argument"):
        assert f"FAILED test_late.py::{test} - jaxcheck.GradientCheckError" in first, out
        assert f"FAILED test_late.py::{test} - AssertionError" in second, out
    assert "2 check_grads calls routed to jaxcheck" in first, out
    assert "jaxcheck" not in second.split("routed:")[0], out
    assert "2 failed" in second, out


NESTED = textwrap.dedent(
    '''
    """
    >>> from jax.test_util import check_grads
    >>> from test_nested import X, wrong_sin
    >>> check_grads(wrong_sin, (X,), 1)
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.test_util import check_grads


    @jax.custom_jvp
    def wrong_sin(x):
        return jnp.sin(x)


    wrong_sin.defjvp(lambda p, t: (jnp.sin(p[0]), 1.5 * jnp.cos(p[0]) * t[0]))
    X = np.linspace(0.1, 1.0, 4)


    def wrong_sin_expected_to_raise_as_jax_words_it():
        """
        >>> from test_nested import X, wrong_sin
        >>> check_grads(wrong_sin, (X,), 1)
        Traceback (most recent call last):
        ...
        AssertionError: ...
        """


    def test_a_session_inside_this_one(pytester):
        pytester.makepyfile(
            test_inner=(
                "import numpy as np\\n"
                "from jax.test_util import check_grads\\n"
                "def test_x():\\n"
                "    check_grads(np.sin, (np.ones(2),), 1, modes=())\\n"
            )
        )
        inner = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--jaxcheck")
        inner.assert_outcomes(passed=1)
        inner.stdout.fnmatch_lines(["1 check_grads calls routed to jaxcheck: 0 passed, *"])


    def test_after_the_inner_session():
        check_grads(wrong_sin, (X,), 1)


    def test_failing_on_the_way_to_failing():
        # as hypothesis does while it shrinks a failing example
        for x in (X, X + 0.1):
            try:
                check_grads(wrong_sin, (x,), 1)
            except AssertionError:
                pass
        check_grads(wrong_sin, (X + 0.2,), 1)
    '''
)


def test_nested_sessions_doctests_and_failures_on_the_way_are_told_apart(tmp_path):
    """A pytest session run inside a --jaxcheck session's test (pytester) took the outer
    session's replacement for JAX's function, failed to swap its code (INTERNALERROR), and
    left later checks routed nowhere; a check failing a doctest, and checks failing on the
    way to the one that failed a test, were listed as caught, as the test expected; so was
    a check failing a doctest that expected JAX's AssertionError (its text differs)."""
    (tmp_path / "test_nested.py").write_text(NESTED)
    flags = ["-p", "pytester", "-p", "jaxcheck.pytest_plugin", "--jaxcheck", "-p", "no:xdist"]
    out = _run(
        tmp_path, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=line", *flags,
        "--doctest-modules", "test_nested.py",
    )  # fmt: skip
    assert "INTERNALERROR" not in out, out
    assert "4 failed, 1 passed" in out, out
    summary = out.split("jaxcheck check_grads")[-1]
    assert "6 check_grads calls routed to jaxcheck: 0 passed, 6 failed" in summary, summary
    assert (
        "FAIL     test_nested.py::test_nested.wrong_sin_expected_to_raise_as_jax_words_it: fail;"
        in summary
    )
    assert "FAIL     test_nested.py::test_nested: fail;" in summary, summary
    assert "FAIL     test_nested.py::test_after_the_inner_session: fail;" in summary, summary
    assert summary.count("FAIL     test_nested.py::test_failing_on_the_way_to_failing") == 3
    assert "CAUGHT" not in summary, summary
