"""Random directions in parameter space and random cotangents in output space.

A direction is drawn per leaf from a seed that depends only on the check's key and the
leaf's key path, and on the direction's index, so adding an unrelated leaf or changing the
chunking does not change the directions of the other leaves. Values are always drawn in
float32 and then cast, so the native-precision and the float64 programs see the same
directions. The programs hash them in place (`draw`), except for small problems, whose
values are drawn on the host, bit for bit the same, and passed in (`host_signs`);
parameters of at most `SPANNED` elements in all get random signs drawn jointly for all
their leaves, so that the directions span them (`spanning_signs`).
"""

import contextlib
import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from . import _error_model, _plan, _precision

KINDS = ("uniform", "rademacher", "gaussian")
# "uniform": a random sign times one of 128 evenly spaced magnitudes, (2m + 1) / 256 for m in
# 0..127, scaled by sqrt(3) to unit variance (as random signs have). The magnitudes take 7
# more bits of the same hash, so drawing costs what signs cost; but unlike signs no error
# vanishes along a sizeable share of them (two entries of equal size and opposite sign vanish
# along half of all random-sign directions, and along 1 in 256 of these).
UNIFORM_SCALE = np.float32(math.sqrt(3.0) / 256)


def as_key(key):
    """Accept an int seed, a typed PRNG key or a raw uint32[2] key."""
    if isinstance(key, jax.core.Tracer):
        raise TypeError(
            "key is a traced value: jaxcheck.verify runs on the host and cannot be called "
            "inside jax.jit, jax.grad or jax.vmap. Pass a concrete key (say key=0), outside "
            "any transformation."
        )
    if is_int_seed(key):
        seed = seed_of(key)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(
                f"key must be an int seed in [-2**63, 2**64) (JAX seeds are 64-bit), got "
                f"{seed}. Try a smaller seed, say key=0, or key=jax.random.key(0)."
            )
        return _int_key(_signed(seed), jax.config.jax_default_prng_impl)
    if isinstance(key, jax.Array | np.ndarray):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return key
        # (raw key data of the default implementation: uint32[4] under "rbg")
        raw = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
        if key.dtype == jnp.uint32 and key.shape == raw:
            with _concrete():
                return jax.random.wrap_key_data(jax.device_put(key))
        raise TypeError(
            f"key must be an int seed, a typed PRNG key (jax.random.key(0)) or raw key data "
            f"of dtype uint32 and shape {raw} (jax.random.PRNGKey(0), with the default "
            f"implementation, {jax.config.jax_default_prng_impl!r}); got an array of dtype "
            f"{key.dtype} and shape {key.shape}. Try key=0, or key=jax.random.key(0)."
        )
    raise TypeError(
        f"key must be an int seed or a single JAX PRNG key, got {type(key).__name__}"
        f"{getattr(key, 'shape', '')}. Try key=0 or key=jax.random.key(0)."
    )


def _signed(seed: int) -> int:
    """A seed in [2**63, 2**64) as the int64 of the same 64 bits (jax.random.key takes
    int64 seeds and overflows above)."""
    return seed - 2**64 if seed >= 2**63 else seed


def is_int_seed(key) -> bool:
    """A Python or NumPy int, or a 0-d integer array (jnp.int32(3)), as jax.random.key
    takes them."""
    if isinstance(key, jax.Array | np.ndarray) and not isinstance(key, jax.core.Tracer):
        return key.shape == () and jnp.issubdtype(key.dtype, jnp.integer)
    return isinstance(key, int | np.integer) and not isinstance(key, bool)


def seed_of(key) -> int:
    # (an explicit transfer, which a caller's transfer guard allows)
    return int(jax.device_get(key)) if isinstance(key, jax.Array) else int(key)


@functools.lru_cache(maxsize=64)
def _int_key(seed: int, impl) -> jax.Array:
    # made concretely even when verify is (wrongly) called under jax.jit: a traced key in
    # this cache would break every later check with the same seed
    with _concrete():
        return jax.random.key(seed)


def _concrete():
    """Evaluate now, never staged into a caller's trace, and allowed to move jaxcheck's own
    small values to the device under any transfer guard."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.ensure_compile_time_eval())
    stack.enter_context(jax.transfer_guard("allow"))
    return stack


_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix_int(x: int) -> int:
    """32-bit avalanche mix (xor-shift-multiply), on Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def _mix(x):
    """The same mix on uint32 arrays, jax or NumPy (wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def seeds(key, namespace: str, paths) -> np.ndarray:
    """One 32-bit seed per leaf path, from the key and the path only."""
    if is_int_seed(key):
        words = _int_key_words(_signed(seed_of(key)), jax.config.jax_default_prng_impl)
    else:
        words = _key_words(as_key(key))
    return _seeds(words, namespace, tuple(paths))


@functools.lru_cache(maxsize=64)
def _int_key_words(seed: int, impl) -> tuple:
    # an int seed's key data, read back once: every check reads it (a dispatch and a copy)
    return _key_words(_int_key(seed, impl))


def _key_words(key) -> tuple:
    with _concrete():
        return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


@functools.lru_cache(maxsize=256)
def _seeds(words: tuple, namespace: str, paths: tuple) -> np.ndarray:
    state = 0
    for word in words:
        state = _mix_int((state ^ int(word)) & _MASK)
    out = [_mix_int(state ^ zlib.crc32(f"{namespace}:{p}".encode())) for p in paths]
    out = np.asarray(out, np.uint32)
    out.flags.writeable = False  # shared between calls
    return out


def draw(seed, index, shape, kind: str):
    """Direction number `index` of the leaf with `seed`, as float32.

    A counter-based generator: element i is a hash of (seed, index, i), turned into a
    random sign, a random sign times a magnitude from the next 7 bits ("uniform") or, by
    the inverse error function, a Gaussian. It compiles to a few integer operations that
    XLA fuses into the perturbation x + t v, so no direction is ever stored apart from the
    perturbed copy, and any element can be drawn without drawing the others. With random
    signs, 2 evaluations per direction cost 1.13x to 1.44x plain forward passes of a
    float64 MLP (1e5 to 8e6 parameters, 2 CPU cores); with the inverse error function 1.5x
    to 2.1x (`benchmarks/directions.py`). Hence "uniform" by default, which costs what
    signs cost.
    """
    return _values(_bases(jnp.asarray(seed, jnp.uint32), index), shape, kind)


@functools.partial(jax.jit, inline=True)
def _bases(seeds, index):
    """The per-(leaf, direction) hash offsets, for all leaves at once (one small fusion
    instead of one per leaf: each fusion costs compile time)."""
    return _base_of(seeds, jnp.asarray(index))


def _base_of(seeds, index):
    """The hash offset of (leaf seed, direction index), on jax or NumPy arrays."""
    return _mix(seeds ^ _mix(index.astype(np.uint32) * np.uint32(_GOLDEN) + 1))


def _bits(size: int, base, xp):
    """The hash of each element counter of a leaf of `size` elements, from its offset."""
    return _mix(xp.arange(size, dtype=np.uint32) * np.uint32(_GOLDEN) + base)


@functools.partial(jax.jit, static_argnums=(1, 2), inline=True)
def _values(base, shape, kind: str):
    bits = _bits(math.prod(shape), base, jnp)
    if kind == "rademacher":
        values = 1.0 - 2.0 * (bits >> 31).astype(jnp.float32)
    elif kind == "uniform":
        values = units(_uniform_levels(bits).astype(jnp.int16))  # as host-drawn ones
    else:
        values = gaussians(bits)
    return values.reshape(shape)


def gaussians(bits):
    """Standard normal values from uint32 hashes, by the inverse error function of a
    uniform value in (0, 1) of 23 bits: with 24, the top one, (2**24 - 0.5) / 2**24, rounds
    to 1 in float32, where erf_inv is Inf (one entry in 2**24: 6 % of the directions over a
    million parameters were Inf)."""
    uniform = ((bits >> 9).astype(jnp.float32) + 0.5) * (1.0 / 2**23)
    return math.sqrt(2.0) * jax.lax.erf_inv(2.0 * uniform - 1.0)


def _uniform_levels(bits):
    """The "uniform" values before scaling: odd integers in [-255, 255], the sign from the
    hash's top bit and the magnitude from the next 7."""
    magnitude = 2 * ((bits >> 24) & 127).astype(np.int32) + 1
    return magnitude * (1 - 2 * (bits >> 31).astype(np.int32))


def host_signs(seeds, index, shapes, kind: str = "rademacher") -> list[np.ndarray]:
    """The random signs (or "uniform" values) of directions `index` (n,) for leaves of
    `shapes` with `seeds`, drawn on the host: per leaf an int8 array of signs (int16 of
    `_uniform_levels` for "uniform") of shape (n, *shape), which `units` turns into the
    very values `draw` gives. The programs of a problem batched whole take them as an
    input instead of hashing them: the hashing is a third of a small program's compile
    time, and the data is at most a megabyte (`_state.Run.signs`)."""
    bases = _base_of(np.asarray(seeds, np.uint32)[None, :], np.asarray(index)[:, None])
    out = []
    for i, shape in enumerate(shapes):
        bits = _bits(math.prod(shape), bases[:, i : i + 1], np)
        if kind == "uniform":
            z = _uniform_levels(bits).astype(np.int16)
        else:
            z = 1 - 2 * (bits >> 31).astype(np.int8)
        out.append(z.reshape(len(bases), *shape))
    return out


def units(z):
    """float32 values of host-drawn directions: int8 signs as they are, int16 "uniform"
    levels scaled exactly as `draw` scales them."""
    values = z.astype(jnp.float32)
    return values * UNIFORM_SCALE if z.dtype == np.int16 else values


SPANNED = 16  # parameters in all up to which the directions' signs span their space


def spanning_signs(seeds, index, shapes) -> list[np.ndarray]:
    """Random signs of directions `index` (n,) for the parameter leaves of `shapes` (at most
    `SPANNED` elements in all), as `host_signs` gives them, drawn so that every block of M
    consecutive directions (M = 8, or 16 above 8 elements) spans the parameter space.

    Direction i is row r of a Sylvester-Hadamard matrix H (H[r, c] = (-1)^popcount(r & c)),
    restricted to a random injection of the elements into its columns and multiplied by
    random signs; block i // M draws the injection, the signs and the order of its rows. The
    M rows of a block are orthogonal, so sum_i (v_i . x)^2 = M |x|^2 for every x: the
    relative error over a whole block has no sampling error at all, where independent
    signs miss an error on two entries of equal size along all of 8 directions 1 time in
    256. A part of a block (8 of 16 rows) is a draw without replacement from rows that are
    balanced on every pair of entries: it misses such an error 1 time in 12870."""
    sizes = [math.prod(shape) for shape in shapes]
    n = sum(sizes)
    if n > SPANNED:
        raise ValueError(f"spanning_signs: {n} elements, more than {SPANNED}")
    m = spanning_block(n)
    index = np.asarray(index, np.int64)
    rows = np.empty((len(index), n), np.int8)
    entropy = [int(x) for x in np.asarray(seeds, np.uint32)]
    for block in np.unique(index // m):
        rng = np.random.default_rng([*entropy, int(block), m])
        order, columns = rng.permutation(m), rng.permutation(m)[:n]
        signs = rng.integers(0, 2, size=n, dtype=np.int8) * 2 - 1
        at = np.flatnonzero(index // m == block)
        r = order[index[at] % m]
        rows[at] = signs * _hadamard(m)[r[:, None], columns[None, :]]
    ends = np.cumsum([0, *sizes])
    return [rows[:, a:b].reshape(len(index), *shape) for a, b, shape in zip(ends, ends[1:], shapes)]


def spanning_block(n: int) -> int:
    """The number of consecutive directions of `spanning_signs` that span n elements."""
    return 8 if n <= 8 else 16


@functools.lru_cache(maxsize=4)
def _hadamard(m: int) -> np.ndarray:
    """The Sylvester-Hadamard matrix of order m (a power of two), int8."""
    h = np.ones((1, 1), np.int8)
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    h.flags.writeable = False
    return h


def direction(leaf_seeds, index, leaves, beta, kind: str, signs=None, packed=()) -> list:
    """The direction `index`: leaf l is beta[l] * z_l, z_l of `kind` (unit variance); with
    `signs` (per leaf, drawn on the host by `host_signs` or `spanning_signs`),
    z_l = units(signs[l]); a leaf l with `packed[l]` is beta[l] * z_l * `entry_scales`."""
    if signs is not None:
        z = [units(z) for z in signs]
    else:
        bases = _bases(jnp.asarray(leaf_seeds, jnp.uint32), index)
        z = [_values(bases[i], x.shape, kind) for i, x in enumerate(leaves)]
    out = []
    for i, x in enumerate(leaves):
        v = z[i].astype(beta.dtype)
        if i < len(packed) and packed[i]:
            v = v * entry_scales(x).astype(beta.dtype)
        out.append((beta[i] * v).astype(x.dtype))
    return out


# A leaf of at most PACKED_SIZE entries whose nonzero magnitudes span more than PACKED_SPREAD
# holds quantities of different units (a rate of 1e4 beside a damping of 0.05): its
# entries are moved in proportion to their own magnitudes, not all at the leaf's RMS,
# which would move the small ones far beyond their size and drown their derivatives
PACKED_SIZE = 64
PACKED_SPREAD = 1e3


def packed_leaves(leaves) -> tuple[bool, ...]:
    """Per leaf, whether it is a small vector of packed quantities (see PACKED_SIZE):
    real floating, finite, at most PACKED_SIZE entries, nonzero magnitudes spanning more
    than PACKED_SPREAD. Reads only such small leaves to the host."""
    out = []
    for x in leaves:
        packed = False
        if 2 <= x.size <= PACKED_SIZE and not jnp.issubdtype(x.dtype, jnp.complexfloating):
            with _concrete():
                a = np.abs(np.asarray(_plan.host_array(x), np.float64))
            nonzero = a[a > 0]
            packed = bool(
                np.isfinite(a).all()
                and nonzero.size >= 2
                and nonzero.max() / PACKED_SPREAD > nonzero.min()  # (no overflow at 1e308)
            )
        out.append(packed)
    return tuple(out)


# An entry of a packed leaf whose share of the leaf's derivative under test, |g| times its
# own size, is below PACKED_UNSEEN of the largest entry's share is hidden by moves of its own
# size: a bias entry that happens to sit near zero beside others near 0.3 (its derivative
# negated passed; so did a rule returning 0 there, whose |g| is small because it is wrong)
PACKED_UNSEEN = 1e-3


def unseen_entries(x, g) -> np.ndarray:
    """The indices (flat) of the entries of the packed leaf `x` whose derivatives `g` its
    own-size moves hide (see PACKED_UNSEEN); NumPy arrays."""
    shares = np.abs(np.asarray(g, np.float64) * entry_scales(np.asarray(x, np.float64))).ravel()
    if not (np.all(np.isfinite(shares)) and shares.max(initial=0.0) > 0):
        return np.zeros(0, np.int64)
    return np.flatnonzero(shares < PACKED_UNSEEN * shares.max())


def both_signs(x) -> bool:
    """Whether the leaf `x` holds entries of both signs (a complex one: always). Reads two
    numbers from the devices."""
    if jnp.iscomplexobj(x):
        return True
    with _concrete():
        low, high = (float(f(x)) for f in (jnp.min, jnp.max))
    return low < 0 < high


def entry_scales(x):
    """Per entry of a packed leaf, |x| over the power of two just above the largest |x|
    (exact in every precision, so the native and the reference programs draw the same
    directions); where x is zero, the smallest nonzero |x| so scaled (a zero has no size
    of its own, and moved at the leaf's RMS its derivative would drown the others'). NumPy
    or jax."""
    xp = _xp(x)
    a = xp.abs(x)
    _, e = xp.frexp(xp.max(a))
    smallest = xp.min(xp.where(a > 0, a, xp.full_like(a, xp.inf)))
    return xp.ldexp(xp.where(a == 0, smallest, a), -e)


def sum_squares(leaves):
    """Per-leaf sums of squares, in at least float32: one reduction per leaf. (Reductions
    dominate the compile time of small programs on CPU, so the probe makes no others.) A
    non-finite sum means NaN/Inf in the leaf or an overflow; `host_rms` tells them apart."""
    acc = _precision.accumulator([x.dtype for x in leaves])
    return jnp.stack([jnp.sum(jnp.square(x.astype(acc))) for x in leaves])


def unit(top):
    """The scale a leaf of largest entry `top` is divided by before it is squared: `top`,
    or 1 where it is 0 or not finite (an Inf entry leaves its Inf norm; no 0/0 or
    Inf/Inf: no NaN of jaxcheck's own under `jax_debug_nans`)."""
    return jnp.where((top > 0) & jnp.isfinite(top), top, 1.0)


def scaled_squares(x, dtype) -> tuple:
    """(`unit` of leaf `x`, the sum of squares of its entries divided by it) in `dtype`: its
    norm is unit * sqrt(sum), and neither squares to 0 nor to Inf where its entries would
    (a float32 leaf of RMS 1e-20, or 1e20)."""
    a = jnp.abs(x).astype(dtype)
    scale = unit(jnp.max(a, initial=0.0))
    return scale, jnp.sum(jnp.square(a / scale))


def host_rms(squares, leaves) -> tuple[np.ndarray, np.ndarray]:
    """(RMS, finite) of each leaf from its sum of squares; where that sum is not finite, the
    leaf itself is examined in float64 (NaN/Inf, or just too large to square in float32)."""
    squares = np.asarray(squares, np.float64)
    sizes = np.asarray([max(x.size, 1) for x in leaves], np.float64)
    values, finite = np.sqrt(squares / sizes), np.isfinite(squares)
    for i in np.flatnonzero(~finite):
        x = _plan.host_array(leaves[i]).astype(np.float64)
        finite[i] = bool(np.all(np.isfinite(x)))
        # (`rms` scales by the largest entry: a float64 leaf above 1e154 squares to Inf)
        values[i] = _error_model.rms(x) if finite[i] else np.nan
    return values, finite


def _xp(*arrays):
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _where(cond, a, b):
    """`np.where`, or for jax arrays `lax.select` on `cond`'s shape: `jnp.where` stages a
    nested jit, which costs a small program milliseconds of lowering each time."""
    if _xp(cond, a, b) is np:
        return np.where(cond, a, b)
    dtype = jnp.result_type(a, b)
    shape = jnp.shape(cond)
    return jax.lax.select(
        cond,
        jnp.broadcast_to(jnp.asarray(a, dtype), shape),
        jnp.broadcast_to(jnp.asarray(b, dtype), shape),
    )


def pooled(rms_values, sizes):
    """The RMS over several arrays from their RMS values and sizes, without overflow (NumPy
    or jax.numpy, following the input)."""
    xp = _xp(rms_values)
    top = xp.max(rms_values)
    safe = _where((top > 0) & xp.isfinite(top), top, 1.0)
    sizes = xp.asarray(sizes, rms_values.dtype)
    return safe * xp.sqrt(xp.sum(sizes * xp.square(rms_values / safe)) / xp.sum(sizes))


def with_floor(values, sizes):
    """Replace zero (or non-finite) magnitudes by the pooled magnitude, or by 1: an all-zero
    leaf is still perturbed, at the scale of the others."""
    xp = _xp(values)
    ok = xp.isfinite(values) & (values > 0)
    overall = pooled(_where(ok, values, 0.0), sizes)
    floor = _where(overall > 0, overall, 1.0)
    return _where(ok, values, floor)


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
    with np.errstate(over="ignore", invalid="ignore"):  # (an infinite gradient norm)
        c = scales * np.asarray(grad_norms, np.float64)
        positive = np.sort(c[c > 0])
        if positive.size == 0:
            return scales.copy(), np.zeros_like(scales)
        # in units of the largest c (the weights are its ratios): squares of c of 1e160
        # and more overflow (exp at 700 in float64)
        unit = positive[-1] if np.isfinite(positive[-1]) else 1.0
        c, positive, min_total = c / unit, positive / unit, min_total / unit
        c_ref = max(positive[0], dynamic_range * positive[-1])
        total = lambda level: np.sqrt(np.sum(np.minimum(positive, level) ** 2))  # noqa: E731
        if total(c_ref) < min_total:
            c_ref = _level_for_total(positive, min_total)
        weights = np.where(c > c_ref, c_ref / np.where(c > 0, c, 1.0), 1.0)
        contribution = (c * weights) ** 2
        return scales * weights, contribution / contribution.sum()


def _level_for_total(positive: np.ndarray, target: float) -> float:
    """The smallest level L with sqrt(sum min(c, L)^2) >= target, for ascending positive c
    (the largest c when even that falls short). With j values of c below L, the sum is
    prefix_j + (n - j) L^2, solved for L on each interval between consecutive c."""
    n = positive.size
    squares = np.cumsum(positive**2)
    if squares[-1] <= target**2:
        return float(positive[-1])
    below = np.concatenate([[0.0], squares[:-1]])  # sum of the j smallest squares, j = 0..n-1
    level = np.sqrt(np.maximum(target**2 - below, 0.0) / (n - np.arange(n)))
    lower = np.concatenate([[0.0], positive[:-1]])
    return float(level[(level >= lower) & (level <= positive)][0])


def cotangent(out_seeds, index, scales, like, kind: str, signs=None, weights=None) -> list:
    """A random output cotangent, each output leaf divided by its RMS magnitude so that
    outputs of very different scales count alike, and each entry times its `weight` (per
    output leaf, `_autodiff.output_weights`; None: 1) so that entries of very different
    derivatives do too; with `signs` (per output leaf, drawn on the host), those signs."""
    if signs is None:
        bases = _bases(jnp.asarray(out_seeds, jnp.uint32), index)
        signs = [_values(bases[i], y.shape, kind) for i, y in enumerate(like)]
    else:
        signs = [units(z) for z in signs]
    if weights is not None:
        signs = [z.astype(scales.dtype) * w.astype(scales.dtype) for z, w in zip(signs, weights)]
    leaf = leaf_weights([np.size(y) for y in like])
    return [
        _plan.typed_like((z.astype(scales.dtype) * leaf[i] / scales[i]).astype(y.dtype), y)
        for i, (z, y) in enumerate(zip(signs, like))
    ]


# the largest weight of an output leaf's entries against those of the largest leaf
MAX_LEAF_WEIGHT = 32.0


def leaf_weights(sizes: list) -> list:
    """Per output leaf of `sizes` entries, a weight for all of its entries: the square root
    of the largest leaf's size over its own, rounded to a power of two (exact in every
    dtype), from 1 to MAX_LEAF_WEIGHT. Scaled entries count alike, so a leaf of n entries
    weighs sqrt(n) in a projection: a scalar loss returned beside 2048 predictions was a
    forty-fifth of it, and a loss 0.1 % off passed as 2e-5 (JAX's check_grads compares
    each output alone)."""
    largest = max(sizes, default=1)
    return [
        float(2.0 ** round(math.log2(min(math.sqrt(largest / max(n, 1)), MAX_LEAF_WEIGHT))))
        for n in sizes
    ]
