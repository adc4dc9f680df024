"""Random directions in parameter space and random cotangents in output space.

A direction is drawn per leaf from a key that depends only on the check's key, the leaf's
key path and the direction's index, so adding an unrelated leaf or changing the chunking
does not change the directions of the other leaves. Values are always drawn in float32 and
then cast, so the native-precision and the float64 programs see the same directions.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("gaussian", "rademacher")


def as_key(key):
    """Accept an int seed, a typed PRNG key or a raw uint32[2] key."""
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array | np.ndarray):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        if key.dtype == jnp.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(jnp.asarray(key))
    raise TypeError(
        f"key must be an int seed or a single JAX PRNG key, got {type(key).__name__}"
        f"{getattr(key, 'shape', '')}. Try key=0 or key=jax.random.key(0)."
    )


def _seed(namespace: str, path: str) -> int:
    return zlib.crc32(f"{namespace}:{path}".encode()) & 0x7FFFFFFF


def stream_keys(key, namespace: str, paths) -> list:
    """One key per leaf path, independent of the other paths."""
    return [jax.random.fold_in(key, _seed(namespace, p)) for p in paths]


def draw(leaf_key, index, shape, kind: str):
    """Draw direction number `index` of one leaf, as float32."""
    k = jax.random.fold_in(leaf_key, index)
    if kind == "gaussian":
        return jax.random.normal(k, shape, jnp.float32)
    return jax.random.rademacher(k, shape, jnp.float32)


def direction(keys, index, leaves, beta, kind: str) -> list:
    """The direction `index`: leaf l is beta[l] * z_l, with z_l ~ N(0, I) or Rademacher."""
    return [
        (beta[i] * draw(k, index, x.shape, kind).astype(beta.dtype)).astype(x.dtype)
        for i, (k, x) in enumerate(zip(keys, leaves))
    ]


def leaf_scales(leaves) -> jax.Array:
    """RMS magnitude of each leaf; all-zero leaves get the RMS of the whole parameter set
    (or 1 when every parameter is zero), so that they are still perturbed."""
    sq = jnp.stack([jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves])
    sizes = jnp.asarray([max(x.size, 1) for x in leaves], jnp.float32)
    rms = jnp.sqrt(sq / sizes)
    overall = jnp.sqrt(jnp.sum(sq) / jnp.sum(sizes))
    floor = jnp.where(overall > 0, overall, 1.0)
    return jnp.where(rms > 0, rms, floor)


def balance(scales, grad_norms, dynamic_range: float, min_total: float = 0.0):
    """Per-leaf step sizes beta_l that make every leaf contribute about equally.

    Leaf l's share of a directional derivative has standard deviation c_l = s_l |g_l|
    (s_l its scale, g_l its gradient). Leaves above a level c_ref are scaled down to it, so
    that a bug confined to a small leaf is not drowned by the large ones; no leaf is ever
    perturbed more than its natural relative step. c_ref is the smallest level that keeps
    (a) every leaf within `dynamic_range` of the largest, and (b) the total derivative
    sqrt(sum_l min(c_l, c_ref)^2) at least `min_total`, below which roundoff would swamp it.

    Returns (beta, share): the step sizes and each leaf's share of the derivative variance.
    """
    scales = np.asarray(scales, np.float64)
    c = scales * np.asarray(grad_norms, np.float64)
    positive = np.sort(c[c > 0])
    if positive.size == 0:
        return scales.copy(), np.zeros_like(scales)
    c_ref = max(positive[0], dynamic_range * positive[-1])
    total = lambda level: np.sqrt(np.sum(np.minimum(positive, level) ** 2))  # noqa: E731
    if total(c_ref) < min_total:
        lo, hi = c_ref, positive[-1]
        if total(hi) <= min_total:
            c_ref = hi
        else:
            for _ in range(60):  # bisection in log space
                mid = np.sqrt(lo * hi)
                lo, hi = (mid, hi) if total(mid) < min_total else (lo, mid)
            c_ref = hi
    weights = np.where(c > c_ref, c_ref / np.where(c > 0, c, 1.0), 1.0)
    contribution = (c * weights) ** 2
    return scales * weights, contribution / contribution.sum()


def cotangent(keys, index, scales, like, kind: str) -> list:
    """A random output cotangent, each output leaf divided by its RMS magnitude so that
    outputs of very different scales count alike."""
    return [
        (draw(k, index, y.shape, kind) / scales[i]).astype(y.dtype)
        for i, (k, y) in enumerate(zip(keys, like))
    ]
