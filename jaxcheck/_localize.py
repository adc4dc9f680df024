"""Localization: which leaves are checked on their own (all of them after a failure; after a
pass, those too small for the all-leaf check to see a 0.1 % error in them), the per-leaf
checks along leaf-local directions, and how their results change the overall status."""

import math

import numpy as np

from . import _ladder, _verdict
from ._report import LeafResult, Status
from ._state import Run

LEAF_INDEX_OFFSET = 2**30  # leaf-local directions use indices disjoint from the global ones
COVERAGE_ERROR = 1e-3  # leaves where a 0.1 % error might go unseen globally are checked alone


def chosen_leaves(localize, status: Status, share, tolerance: float, num_leaves: int) -> list:
    """Indices of the leaves to check alone, given the `localize` option, the all-leaf
    status and tolerance, and each leaf's share of the all-leaf projections (None when the
    directions were not balanced against the gradient)."""
    if localize is True or (localize == "auto" and status is Status.FAIL):
        return list(range(num_leaves))
    if localize == "auto" and status is Status.PASS and share is not None:
        # leaves whose 0.1 % error the all-leaf check could not see: check them alone
        return [i for i, s in enumerate(share) if COVERAGE_ERROR * math.sqrt(s) <= tolerance]
    return []


def localize(run: Run, scales, leaf_k, h, paths, chosen) -> tuple:
    """One `LeafResult` per chosen leaf, from `leaf_k` directions along that leaf alone."""
    index = np.tile(LEAF_INDEX_OFFSET + np.arange(leaf_k, dtype=np.int32), len(chosen))
    rows = np.repeat(np.diag(scales)[chosen], leaf_k, axis=0)
    groups = [slice(j * leaf_k, (j + 1) * leaf_k) for j in range(len(chosen))]
    results = []
    for leaf, (p, _) in zip(chosen, _ladder.ladder(run, index, rows, h, groups)):
        checks = _verdict.compare(run, p)
        status = _verdict.status(run, p, checks, leaf_k, [])
        head, x = checks[0], run.inputs.diff[leaf]
        results.append(
            LeafResult(
                paths[leaf],
                tuple(x.shape),
                str(x.dtype),
                head.relative_error,
                head.interval,
                head.tolerance,
                p.fd.num_nonsmooth,
                status,
            )
        )
    return tuple(results)


def merge_leaves(run: Run, status: Status, leaves) -> Status:
    """The overall status once the leaves are checked: a failing leaf fails the check
    (a non-finite one stays so), and is named."""
    failing = [leaf.path or "(root)" for leaf in leaves if leaf.status is Status.FAIL]
    if failing:
        run.problems.append(f"wrong: {', '.join(failing)}")
        return Status.FAIL if status is not Status.NONFINITE else status
    if status is Status.FAIL:
        run.problems.append(
            "no single leaf fails on its own: the error is spread thinly over several "
            "leaves, or comes from their interaction"
        )
    return status
