"""Execution planning: how directions are batched and placed, and compiling each program once.

The finite-difference programs evaluate fn at many perturbed copies of the parameters.
Directions run in chunks: `jax.vmap` inside a chunk, a sequential `lax.map` across chunks,
so memory grows with the chunk size, not with the number of directions. The rule:

- On CPU, one direction at a time (chunk 1) and the stencil points of a direction one
  after another. Measured on 2 CPU cores (float64 MLPs, 2.6e4 to 8.4e6 parameters),
  vmapping 16 directions was 1.2x to 4x slower than the sequential loop: a batched matmul
  of perturbed weights runs slower than the same matmuls one by one, and the loop keeps one
  perturbed copy in cache.
- On accelerators, as many directions at once as fit the memory budget (default: a
  quarter of the device's free memory), stencil points vmapped too: small models only
  fill the device when batched.
- Small problems (inputs times directions times stencil points up to `SMALL_PROBLEM`
  elements, 4 MiB of float64 copies), on CPU too: everything vmapped. Their first check
  is mostly compile time, and one vmapped body compiles to less code than loops.

`memory_budget` bounds the bytes of perturbed parameter copies in flight; a `chunk_size`
given by the caller overrides the rule.

Sharding: a parameter leaf that is sharded over several devices keeps its sharding in every
perturbed copy (`with_sharding_constraint`), so nothing is gathered onto one device. With a
`direction_sharding`, directions are spread over a mesh axis instead (data parallel over
directions), all vmapped at once.

Programs with small inputs are compiled with XLA options that favour compile time over run
time (`FAST_COMPILE_OPTIONS`, where this XLA knows them): a test suite checks many small,
new functions once each, and there compiling is the whole cost.

Compiled programs are kept (least recently used first out) under the program, its static
configuration (the function under check, the pytree structure, the options) and the shapes,
dtypes and shardings of its inputs, so repeated checks of the same function compile nothing.
Like `jax.jit`, values the function closes over are fixed at its first check. XLA compiles
a check's first program in a background thread while the next is traced (`lower_ahead`).

A function that `jax.jit` cannot trace (it converts traced values to NumPy, or branches in
Python on them) is evaluated eagerly instead: the same programs run without `jit`, one
direction and one stencil point at a time.
"""

import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _precision

_EAGER = contextvars.ContextVar("jaxcheck_eager", default=False)
_MAP_HAS_BATCH_SIZE = "batch_size" in inspect.signature(jax.lax.map).parameters

# What tracing raises when a function needs concrete values.
TRACING_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
    # x[mask]: the output's shape depends on values (jax.grad, run op by op, takes it)
    jax.errors.NonConcreteBooleanIndexError,
)

# How jax.jit begins its error for a static argument it cannot hash (an array, a tracer).
UNHASHABLE_STATIC = "Non-hashable static arguments are not supported"


def cannot_trace(err: BaseException) -> bool:
    """Whether `err` says that fn cannot be traced, though it may run eagerly: one of
    `TRACING_ERRORS`, or jax.jit refusing a traced static argument. The latter is what
    jax.custom_jvp(jnp.round) raises under a trace: custom_jvp passes the defaults of the
    wrapped function's keywords (round's `decimals`, static inside it) as traced values,
    while op by op they stay Python numbers."""
    if isinstance(err, TRACING_ERRORS):
        return True
    text = str(err)
    return isinstance(err, ValueError) and text.startswith(UNHASHABLE_STATIC) and "Tracer" in text


CPU_MEMORY_BUDGET = 1 << 30  # bytes of perturbed parameter copies in flight on a CPU
ACCELERATOR_SHARE = 0.25  # share of an accelerator's free memory for them
# Inputs (parameters and data) times directions times stencil points up to this many
# elements: everything vmapped, on CPU too. Loops (`lax.map`) compile to more code than one
# vmapped body: measured 1.3x less compile CPU time on 24 cold checks of small functions,
# and on 2 CPU cores (K = 16, float64 reference) 14 % to 15 % less compile time for a
# 1e4-parameter tanh MLP and a 6e3-parameter CNN, whose first checks are mostly compile
# time (about 2 s). Run time: the MLP's warm check 17 % faster (32 % with a fixed K; also
# at 3e4 parameters, 25 %), the small CNN's 4 % to 18 % slower (batched convolutions), a
# few milliseconds either way. Beyond, batching loses: a 3e5-parameter MLP's warm check
# 17 % slower (55 % with a fixed K), a 9e4-parameter CNN's 2x slower.
SMALL_PROBLEM = 1 << 19
# Directions times leaves times parameters up to this many elements: the probe also
# computes the forward projections, one jvp per direction and leaf (`fold`), so a check
# compiles one program fewer.
FOLD_ELEMENTS = 1 << 16


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a program maps over directions; static, part of the compiled program's key."""

    chunk: int | None  # directions vmapped at once (None: all of them)
    vmap_points: bool  # the stencil points of one direction vmapped, or one after another
    leaf_shardings: tuple = ()  # per parameter leaf: its multi-device sharding, or None
    direction_sharding: Any = None  # a Sharding of the directions axis, or None


def memory_budget(device=None) -> int:
    """Default bytes for perturbed parameter copies: 1 GiB on CPU, else a quarter of the
    device's free memory (1 GiB when the backend does not report it)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return CPU_MEMORY_BUDGET
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = {}
    free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    return int(ACCELERATOR_SHARE * free) if free > 0 else CPU_MEMORY_BUDGET


def default_chunk(
    num_params: int,
    num_directions: int,
    copies: int,
    itemsize: int = 8,
    *,
    platform: str = "cpu",
    budget: int | None = None,
):
    """Directions per vmapped chunk (None: all at once), by the rule in the module docstring:
    1 on CPU; on accelerators as many as keep `copies` perturbed copies of `num_params`
    parameters of `itemsize` bytes each within `budget`."""
    if platform == "cpu":
        return 1 if num_directions > 1 else None
    budget = CPU_MEMORY_BUDGET if budget is None else budget
    chunk = max(1, budget // max(1, copies * num_params * itemsize))
    return None if chunk >= num_directions else int(chunk)


def make_plan(
    diff,
    num_directions,
    copies,
    itemsize,
    *,
    chunk_size,
    budget,
    direction_sharding,
    other_elements: int = 0,
) -> Plan:
    """The plan for parameter leaves `diff` (concrete arrays) on their devices; `itemsize`
    is that of the finite-difference precision, `other_elements` the size of the inputs
    held fixed."""
    shardings = tuple(multi_device(x) for x in diff)
    device = device_of(diff)
    platform = platform_of(device)
    accelerator = platform != "cpu"
    if direction_sharding is not None:
        return Plan(None, accelerator, shardings, direction_sharding)
    small = (sum(x.size for x in diff) + other_elements) * num_directions * copies
    if chunk_size is None and not any(shardings) and small <= SMALL_PROBLEM:
        return Plan(None, True, shardings, None)
    if chunk_size is None:
        if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in diff):
            # several processes: every sequential step waits on collectives between
            # them (measured 2 x 4 CPU devices: 32 directions looped 616 ms, vmapped
            # 19 ms), so directions are batched by the memory budget, as on accelerators
            platform = "multiprocess"
        per_device = sum(
            x.size if s is None else math.prod(s.shard_shape(x.shape))
            for x, s in zip(diff, shardings)
        )
        chunk_size = default_chunk(
            per_device,
            num_directions,
            copies,
            itemsize,
            platform=platform,
            budget=memory_budget(device) if budget is None else budget,
        )
    return Plan(chunk_size, accelerator, shardings, None)


def looped(plan: Plan) -> Plan:
    """`plan` with nothing batched by `jax.vmap`: one direction and one stencil point at a
    time, for a function with a primitive that has no batching rule."""
    return dataclasses.replace(plan, chunk=1, vmap_points=False)


def unbatchable(err: BaseException) -> bool:
    """Whether `err` is JAX saying that fn cannot be batched by `jax.vmap` (a primitive
    without a batching rule, a `pure_callback` without a `vmap_method`)."""
    text = str(err)
    return isinstance(err, NotImplementedError) and ("Batching rule for" in text or "vmap" in text)


def fold(plan: Plan, modes, scalar_output: bool, diff, num_directions: int) -> tuple:
    """The modes whose projections along the check's `num_directions` directions (global
    and leaf-local) the probe computes itself (`_autodiff.probe_folded`), sparing the check
    the separate projections program: those that need one (forward mode; reverse mode of a
    non-scalar fn), for problems planned all-vmapped and unsharded. Forward mode takes one
    jvp per direction and leaf: only while their tangents total at most `FOLD_ELEMENTS`
    elements."""
    needed = tuple(m for m in modes if m == "forward" or not scalar_output)
    whole = plan.chunk is None and plan.vmap_points and plan.direction_sharding is None
    if not needed or not whole or any(plan.leaf_shardings):
        return ()
    tangents = num_directions * len(diff) * sum(x.size for x in diff)
    if "forward" in needed and tangents > FOLD_ELEMENTS:
        return ()
    return needed


def device_of(leaves):
    """The device a program over the arrays among `leaves` runs on: their lowest-numbered
    device (tracers have none), or the default device when there are none."""
    devices = [
        d
        for x in leaves
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
        for d in x.sharding.device_set
    ]
    return min(devices, key=lambda d: d.id) if devices else jax.devices()[0]


def platform_of(device) -> str:
    """Which rule of the module docstring applies to `device`: "cpu", "gpu" or "tpu"."""
    return device.platform


def host_array(x) -> np.ndarray:
    """`x` as a NumPy array, gathered from every process first when it spans devices of
    other processes too (each process then reads the whole array)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # noqa: PLC0415 - multi-process only

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def multi_device(x):
    """The sharding of array `x` when it spans several devices, else None."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or len(sharding.device_set) <= 1:
        return None
    return sharding


def constrain(leaves, plan: Plan) -> list:
    """Keep each perturbed leaf on its parameter's sharding (inside a traced program)."""
    if not any(plan.leaf_shardings) or _EAGER.get():
        return leaves
    return [x if s is None else _constrained(x, s) for x, s in zip(leaves, plan.leaf_shardings)]


def _constrained(x, sharding):
    # a mesh with Explicit axes (jax.make_mesh's default in newer jax) takes `reshard`:
    # with_sharding_constraint refers to Auto axes only
    if explicit_axes(sharding) and hasattr(jax.sharding, "reshard"):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def explicit_axes(sharding) -> bool:
    """Whether `sharding` (None, or a sharding of any kind) lies on a mesh of Explicit
    axes."""
    types = getattr(getattr(sharding, "mesh", None), "axis_types", ()) or ()
    return any("Explicit" in str(t) for t in types)


def typed_like(x, like):
    """`x` resharded as `like` is, where `like`'s type carries a sharding over Explicit mesh
    axes (there a vjp takes only a cotangent typed as its output, and an array sharded
    otherwise does not mix with it); `x` itself elsewhere."""
    if not explicitly_sharded(like) or jax.typeof(x).sharding == jax.typeof(like).sharding:
        return x
    return jax.sharding.reshard(x, jax.typeof(like).sharding)


def explicitly_sharded(x) -> bool:
    """Whether array or tracer `x`'s type carries a sharding over Explicit mesh axes."""
    if not hasattr(jax, "typeof") or not hasattr(jax.sharding, "reshard"):
        return False
    return explicit_axes(getattr(jax.typeof(x), "sharding", None))


def explicit_mesh_of(tree):
    """A context that sets the mesh of Explicit axes the arrays of `tree` lie on, where
    none is set already (arrays a check makes, its directions, take that mesh then; without
    it JAX refuses to mix them with the arrays on it); a context that does nothing
    elsewhere."""
    set_mesh, current = (
        getattr(jax, "set_mesh", None),
        getattr(jax.sharding, "get_abstract_mesh", None),
    )
    if set_mesh is None or current is None or not getattr(current(), "empty", True):
        return contextlib.nullcontext()
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array) and explicitly_sharded(x):
            return set_mesh(x.sharding.mesh)
    return contextlib.nullcontext()


def vdot(a, b):
    """jnp.vdot(a, b), or with `b` resharded as `a` is and summed elementwise where `a` is
    sharded over Explicit mesh axes: there a dot over a sharded dimension has no output
    sharding to take, and the two may come in different layouts (a grad_fn's)."""
    if not explicitly_sharded(a):
        return jnp.vdot(a, b)
    return jnp.sum(jnp.conj(a) * typed_like(b, a))


def map_points(fn, offsets, plan: Plan):
    """fn at every stencil offset: vmapped, or one after another."""
    if _EAGER.get():
        return jnp.stack([fn(offsets[i]) for i in range(offsets.shape[0])])
    if plan.vmap_points:
        return jax.vmap(fn)(offsets)
    return jax.lax.map(fn, offsets)  # one copy of fn in the program: quicker to compile


def map_directions(fn, xs, plan: Plan):
    """Apply `fn` to every row of the arrays in the pytrees `xs` (a None among them stays
    None): vmapped, in sequential vmapped chunks, or (eagerly) in a Python loop."""
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if _EAGER.get():
        rows = [fn(*jax.tree_util.tree_map(lambda x, i=i: x[i], xs)) for i in range(n)]
        return jax.tree_util.tree_map(lambda *r: jnp.stack([jnp.asarray(v) for v in r]), *rows)
    if plan.direction_sharding is not None:
        xs = jax.tree_util.tree_map(
            lambda x: _constrained(x, _rows(plan.direction_sharding, x)), xs
        )
        out = jax.vmap(fn)(*xs)
        # per-direction results are a few numbers: replicate them, so that every process of
        # a multi-host run can read them
        everywhere = jax.sharding.NamedSharding(
            plan.direction_sharding.mesh, jax.sharding.PartitionSpec()
        )
        return jax.tree_util.tree_map(lambda y: _constrained(y, everywhere), out)
    chunk = plan.chunk
    if chunk == 1:  # a loop without vmap: fn need not have batching rules (`looped`)
        return jax.lax.map(lambda row: fn(*row), xs)
    if chunk is None or chunk >= n:
        return jax.vmap(fn)(*xs)
    if _MAP_HAS_BATCH_SIZE:
        return jax.lax.map(lambda row: fn(*row), xs, batch_size=chunk)
    return jax.lax.map(lambda row: fn(*row), xs)  # jax < 0.4.31: one direction at a time


def _rows(sharding, x):
    """`sharding` (of a 1-d directions axis) extended to the trailing axes of `x`."""
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[: x.ndim]))


@contextlib.contextmanager
def eager():
    token = _EAGER.set(True)
    try:
        yield
    finally:
        _EAGER.reset(token)


def is_eager() -> bool:
    """Whether the programs are running eagerly now (fn cannot be traced)."""
    return _EAGER.get()


CACHE_SIZE = 64
# the check running now (an object standing for it, set by the outermost check; None
# outside one): what it uses is kept beyond CACHE_SIZE until it ends (`Kept`)
RUNNING = contextvars.ContextVar("jaxcheck_running_check", default=None)


class Kept(collections.OrderedDict):
    """Values kept under their keys (compiled programs, jitted functions), the least
    recently used first. Beyond CACHE_SIZE the least recently used are let go, but none
    the running check has used: a check of a model calling 30 custom rules uses some 90
    jitted functions, and let go in turn as it went, the same check again (a training
    loop's) compiled 90 programs anew each time (50 s a check where keeping them took 2 s;
    2 cores, other work on the machine)."""

    def find(self, key):
        """The value kept under `key` (None if none), now the most recently used."""
        entry = self.get(key)
        if entry is None:
            return None
        self.move_to_end(key)
        self[key] = (entry[0], RUNNING.get())
        return entry[0]

    def kept(self) -> list:
        """(key, value) of every entry, the least recently used first."""
        return [(key, entry[0]) for key, entry in self.items()]

    def keep(self, key, value) -> None:
        running = RUNNING.get()
        self[key] = (value, running)
        self.move_to_end(key)
        while len(self) > CACHE_SIZE:
            oldest = next(iter(self))
            if running is not None and self[oldest][1] is running:
                break  # (all after it are the running check's too)
            del self[oldest]


_CACHE = Kept()
_ONCE = Kept()  # `run_once`'s kept programs
_JITTED = Kept()  # `kept_jit`'s functions
compilations = 0  # programs compiled so far in this process


def signature(args):
    """The pytree structure and the shape, dtype, weak type and placement of every leaf
    of `args`: what a compiled program depends on besides static values."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    default = _default_device()
    avals = tuple(
        (np.shape(x), x.dtype, bool(getattr(x, "weak_type", False)), _placement(x, default))
        for x in leaves
    )
    return treedef, avals, _precision.x64_enabled(), _tracing_config()


def _default_device():
    """The device that uncommitted arrays, and programs lowered for shapes alone, go to."""
    device = getattr(jax.config, "jax_default_device", None)
    if isinstance(device, jax.Device):
        return device
    return jax.devices(device if isinstance(device, str) else None)[0]


def _placement(x, default):
    """What of `x`'s sharding a program depends on: a sharding over several devices, or
    over a mesh even of one device (a program traced for a mesh of Explicit axes returns
    arrays on that mesh, which another mesh's arrays do not mix with); the device of an
    array on one device other than `default`; None for one on `default` (as for a
    NumPy array or a number, or the shapes a program is lowered for ahead)."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spread = multi_device(x)
    if spread is None and sharding is not None:
        # a program compiled for arrays on one device refuses arrays committed to another
        device = next(iter(sharding.device_set))
        return None if device == default else device
    return spread


def _tracing_config() -> tuple:
    """The settings that change what tracing fn produces (besides x64), and the default
    device, where a program for NumPy inputs runs: a program traced under other ones is
    not reused."""
    names = (
        "default_matmul_precision",
        "numpy_dtype_promotion",
        "numpy_rank_promotion",
        "default_device",
    )
    return tuple(getattr(jax.config, f"jax_{name}", None) for name in names)


def _cache_key(fn, args):
    """The cache key of a partial(program, *static) applied to `args` (it may turn out
    unhashable)."""
    return (fn.func, fn.args, tuple(sorted(fn.keywords.items())), signature(args), REUSED.get())


def is_compiled(fn, args) -> bool:
    """Whether the program partial(program, *static) is already compiled for `args`."""
    try:
        return _cache_key(fn, args) in _CACHE
    except Exception:  # noqa: BLE001 - unhashable static leaves: never cached
        return False


def _compile(fn, args, ahead=None):
    """(compiled program, its peak bytes, whether it calls back into Python) for `fn` at
    `args`, from the cache if there (or from its compile started ahead, `lower_ahead`).
    A program compiled here is compiled in the background while `ahead(out_info)`, if
    given, lowers the program expected next (`out_info`: the shapes and dtypes of this
    program's outputs)."""
    global compilations
    key = _cache_key(fn, args) if isinstance(fn, functools.partial) else None
    try:
        cached = None if key is None else _CACHE.find(key)
    except Exception:  # noqa: BLE001 - unhashable or incomparable static leaves: no reuse
        key, cached = None, None
    if cached is not None:
        return cached
    compiled = None
    pending = None if key is None else _PENDING.pop(key, None)
    if pending is not None:
        try:
            compiled = pending.result()
        except Exception:  # noqa: BLE001 - compiled again here, so that the error is raised here
            compiled = None
    if compiled is None:
        lowered = _lower(fn, args)
        settings = _settings() if ahead is not None and AHEAD else None
        if settings is not None:
            future = _compiler().submit(_finish_with, settings, lowered, args, REUSED.get())
            try:
                ahead(lowered.out_info)
            except Exception:  # noqa: BLE001 - a guess that failed costs nothing but itself
                pass
            compiled = future.result()
        else:
            compiled = _finish(lowered, args, REUSED.get())
    compilations += 1
    if key is not None:
        _CACHE.keep(key, compiled)
    return compiled


# Compiling ahead. XLA compiles without Python's global interpreter lock, and a check's
# programs run one after the other, each traced and lowered (in Python) and then compiled
# (in XLA): while one compiles, the next can be traced. The probe's program is compiled in
# a background thread while the main thread lowers the finite-difference program that
# follows it (`lower_ahead`, with inputs of the shapes and dtypes it will be called with);
# that one compiles in the background too, and is taken from `_PENDING` when called. Only
# XLA's compile leaves the main thread: fn is traced there, under the caller's settings.
# Measured on the test-suite benchmark's cold checks (jax 0.10.2, 2 CPU cores, two runs
# each way): order 1, 194 checks, 16 % less wall time (59.8 and 62.2 s to 50.4 and 52.2 s);
# order 2, the first 80, 15 % to 21 % (63.7 and 68.9 s to 53.9 and 54.6 s); CPU time
# within 5 % either way. Where every core is busy with checks already (this package's
# tests, one worker per core) it gains nothing: 490.8 s against 479.6 s, within noise.
AHEAD = True
_PENDING: dict = {}  # cache key -> Future of `_finish`'s result
PENDING_KEPT = 4  # compiles started ahead and not yet asked for; the oldest are dropped
_COMPILER = None


def _compiler():
    global _COMPILER
    if _COMPILER is None:
        _COMPILER = concurrent.futures.ThreadPoolExecutor(1, "jaxcheck-compile")
    return _COMPILER


# JAX settings read while a program compiles (logging, the persistent cache, XLA's
# optimization effort): the caller's, which may hold in its own thread only (`with
# jax.log_compiles():`), are set likewise in the compile thread
_COMPILE_SETTINGS = (
    "enable_x64",
    "log_compiles",
    "explain_cache_misses",
    "enable_compilation_cache",
    "compilation_cache_dir",
    "compilation_cache_max_size",
    "compilation_cache_include_metadata_in_key",
    "compilation_cache_expect_pgle",
    "persistent_cache_min_compile_time_secs",
    "persistent_cache_min_entry_size_bytes",
    "persistent_cache_enable_xla_caches",
    "raise_persistent_cache_errors",
    "use_shardy_partitioner",
    "optimization_level",
    "memory_fitting_level",
    "exec_time_optimization_effort",
    "memory_fitting_effort",
    "enable_pgle",
    "pgle_profiling_runs",
)


def _settings() -> list | None:
    """[(setting, its value here)] for `_COMPILE_SETTINGS`, or None where this JAX does
    not let them be read and set so (then nothing is compiled in the background)."""
    try:
        from jax._src import config  # noqa: PLC0415 - not public: feature-detected

        states = [getattr(config, name, None) for name in _COMPILE_SETTINGS]
        return [(s, s.value) for s in states if isinstance(s, config.State)]
    except Exception:  # noqa: BLE001 - another JAX
        return None


def _finish_with(settings, lowered, args, reused: bool):
    """`_finish` under `settings` (in the compile thread)."""
    with contextlib.ExitStack() as stack:
        for state, value in settings:
            stack.enter_context(state(value))
        return _finish(lowered, args, reused)


def lower_ahead(fn, args) -> None:
    """Lower the program partial(program, *static) for inputs like `args` (arrays or
    `jax.ShapeDtypeStruct`s: only their shapes, dtypes and shardings count) and start
    compiling it in the background, unless it is compiled or started already. A program
    that cannot be lowered so is left to its call, which raises what it raises."""
    try:
        key = _cache_key(fn, args)
        if key in _CACHE or key in _PENDING:
            return
    except Exception:  # noqa: BLE001 - unhashable static leaves: never cached
        return
    settings = _settings()
    if settings is None:
        return
    try:
        lowered = _lower(fn, args)
    except Exception:  # noqa: BLE001 - the call itself will say
        return
    _PENDING[key] = _compiler().submit(_finish_with, settings, lowered, args, REUSED.get())
    while len(_PENDING) > PENDING_KEPT:
        _PENDING.pop(next(iter(_PENDING)))


# XLA options that trade the speed of the compiled code for compile time, for CPU programs
# whose inputs total at most FAST_COMPILE_BYTES: there compiling is the whole cost of a check.
# Without the fusion emitters (MLIR), XLA's CPU backend emits fusions directly to LLVM IR,
# and one LLVM module (no split for parallel codegen) suits a program of a few kernels:
# measured on 24 cold checks of small functions (jax 0.10.2, 2 CPU cores), 2.4x less compile
# CPU time (19 s to 7.9 s); results equal, or an ulp apart. LLVM at -O0 saves another 1.6x
# (12 cold order-2 checks: 14.7 s to 9.2 s CPU): rounding then follows the program as
# written (no reassociation), a few ulps from the optimized build, far inside the
# tolerances, which are never below 10 eps of the tested dtype.
# Set to None once this XLA turns out not to know them.
FAST_COMPILE_OPTIONS: dict | None = {
    "xla_cpu_use_fusion_emitters": False,
    "xla_cpu_parallel_codegen_split_count": 1,
    "xla_backend_optimization_level": 0,
}
FAST_COMPILE_BYTES = 1 << 14
# Also for CPU programs of at most FAST_COMPILE_FLOPS operations (XLA's estimate, before
# optimization), unless a `Checker` compiles them to run again and again (REUSED): a one-off
# check runs each program a few times, and for these its compile time dwarfs its run time.
# A 2-block flax transformer of 21k parameters (programs of 1.1e7 and 1.4e7 operations):
# 14.6 s compiling against 5.9 s, its programs then running in 24 ms instead of 10 ms.
FAST_COMPILE_FLOPS = 1e8
# set while a `Checker` runs its check: its programs are compiled for speed of the code
REUSED = contextvars.ContextVar("jaxcheck_reused", default=False)


def _lower(fn, args):
    # jaxcheck's own programs are traced without `jax_enable_checks`: the derivatives they
    # evaluate were traced alone under the caller's setting first (`_probe.under_checks`);
    # the checks' cost grows faster than a program's size, and in these programs (fn
    # batched over directions, in float64, beside the direction hashing) it was a third of
    # a small check's time
    with jax.enable_checks(False):
        return jax.jit(fn).lower(*args)


def _finish(lowered, args, reused: bool):
    """(compiled program, its peak bytes, whether it calls back into Python): XLA's part,
    which may run in the background thread."""
    global FAST_COMPILE_OPTIONS
    callbacks = _calls_back(lowered)
    options = FAST_COMPILE_OPTIONS
    leaves = jax.tree_util.tree_leaves(args)
    # the options are XLA:CPU's: the arrays' real platform decides, not the plan's rule
    small = _bytes(args) <= FAST_COMPILE_BYTES or (
        not reused and _operations(lowered) <= FAST_COMPILE_FLOPS
    )
    compiled = None
    if options and device_of(leaves).platform == "cpu" and small:
        try:
            compiled = lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as err:
            if "compile option" not in str(err):
                raise
            FAST_COMPILE_OPTIONS = None  # feature detection: an older or newer XLA
    if compiled is None:
        compiled = lowered.compile()
    # the analysis costs milliseconds: once
    return compiled, peak_bytes(compiled), callbacks


def run_once(f, *args, key=None):
    """f(*args), jitted for a search the check makes once (fn's kinks, its one-sided slopes
    there): compiled as `_finish` compiles a one-off check's programs (for compile time,
    where they are small), and counted in `compilations`. A Jacobian over 40 kink entries,
    compiled as jax.jit compiles, took 0.64 s of a 2.6 s check. With a hashable `key`
    standing for f (its function and every value it closes over), the program is kept for
    a later call with an equal key and arguments of the same signature (a `Checker`'s next
    call at the same kinks)."""
    global compilations
    full = None if key is None else (key, signature(args), REUSED.get())
    try:
        compiled = None if full is None else _ONCE.find(full)
    except Exception:  # noqa: BLE001 - unhashable or incomparable: no reuse
        full, compiled = None, None
    if compiled is None:
        lowered = _lower(f, args)
        compiled = _finish(lowered, args, reused=False)[0]
        compilations += 1
        if full is not None:
            _ONCE.keep(full, compiled)
    return compiled(*args)


def kept_jit(f, key):
    """`jax.jit(f)`, kept under a hashable `key` standing for f (its function and every
    value it closes over) and returned for a later call with an equal key, so that its
    compiled programs are reused as `jax.jit` reuses them (a rule's own checks, re-bound
    to a new function at every check of the model that calls it); `jax.jit(f)` anew
    where the key cannot be hashed."""
    try:
        jitted = _JITTED.find(key)
    except Exception:  # noqa: BLE001 - unhashable or incomparable: no reuse
        return jax.jit(f)
    if jitted is None:
        jitted = jax.jit(f)
        _JITTED.keep(key, jitted)
    return jitted


def _operations(lowered) -> float:
    """XLA's estimate of a lowered program's floating-point and transcendental operations
    (inf where this JAX gives none)."""
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", math.inf)) + float(cost.get("transcendentals", 0.0))
    except Exception:  # noqa: BLE001 - no estimate: compiled for speed
        return math.inf


def _calls_back(lowered) -> bool:
    """Whether a lowered program calls back into Python (`jax.pure_callback` and kin in
    fn), as far as this JAX tells (False where it does not)."""
    lowering = getattr(lowered, "_lowering", None)
    compile_args = getattr(lowering, "compile_args", None)
    return isinstance(compile_args, dict) and bool(compile_args.get("host_callbacks"))


def _bytes(args) -> int:
    leaves = [x for x in jax.tree_util.tree_leaves(args) if hasattr(x, "dtype")]
    return sum(np.size(x) * getattr(x.dtype, "itemsize", 8) for x in leaves)


def forget(fn) -> None:
    """Drop the programs compiled for the function under check `fn` (one that closed over
    a traced value: its programs must not be reused)."""
    for cache in (_CACHE, _PENDING):
        for key in [k for k in cache if any(getattr(a, "fn", None) is fn for a in k[1])]:
            del cache[key]

    def held(a) -> bool:  # (fn itself, or its key for the compiled programs)
        return a is fn or getattr(a, "f", None) is fn

    for key in [k for k in _ONCE if any(map(held, jax.tree_util.tree_leaves(k[0])))]:
        del _ONCE[key]


def peak_bytes(compiled) -> int | None:
    """Peak device memory of a compiled program by XLA's own analysis (per device), or
    None when the backend does not report it."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without memory analysis
        return None
    if m is None:
        return None
    peak = getattr(m, "peak_memory_in_bytes", 0)
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(max(peak, total - m.alias_size_in_bytes))


@dataclasses.dataclass
class Timer:
    """Runs the programs of a check, jitted (or eagerly when fn cannot be traced), and
    keeps their compile and run seconds, how many were compiled, and their peak memory."""

    compile_s: float = 0.0
    run_s: float = 0.0
    eager_reason: str | None = None
    compiled: int = 0
    peak_bytes: int | None = None

    def run(self, fn, *args, ahead=None):
        """Compile `fn` ahead of time for `args` (or take it from the cache), then run it;
        times both separately. `ahead(out_info)` lowers the program expected next while
        this one compiles (`_compile`)."""
        if self.eager_reason is None:
            t0 = time.perf_counter()
            before = compilations
            args = _on_device(args)
            try:
                with user_transfers():
                    compiled, peak, callbacks = _compile(fn, args, ahead)
            except (*TRACING_ERRORS, ValueError) as err:
                if not cannot_trace(err):
                    raise
                self.eager_reason = type(err).__name__
                if isinstance(err, ValueError):
                    self.eager_reason = "a static argument of jax.jit got a traced value"
            else:
                t1 = time.perf_counter()
                self.compiled += compilations - before
                if peak is not None:
                    self.peak_bytes = max(self.peak_bytes or 0, peak)
                args = _placed(compiled, args)
                with user_transfers(), _precision.x64_everywhere(callbacks):
                    out = jax.block_until_ready(compiled(*args))
                self.compile_s += t1 - t0
                self.run_s += time.perf_counter() - t1
                return out
        t1 = time.perf_counter()
        with eager():
            out = jax.block_until_ready(fn(*args))
        self.run_s += time.perf_counter() - t1
        return out


_GUARDS = ("host_to_device", "device_to_device", "device_to_host")
_USER_GUARDS = contextvars.ContextVar("jaxcheck_user_guards", default=None)


@contextlib.contextmanager
def own_transfers():
    """Allow jaxcheck's own transfers (seeds, step sizes, results read back) under a
    caller's `jax.transfer_guard("disallow")`, remembering the caller's levels for
    `user_transfers`."""
    levels = _USER_GUARDS.get()  # already set when one check runs others
    if levels is None:
        general = jax.config.jax_transfer_guard
        levels = {d: getattr(jax.config, f"jax_transfer_guard_{d}") or general for d in _GUARDS}
    token = _USER_GUARDS.set(levels)
    try:
        with jax.transfer_guard("allow"):
            yield
    finally:
        _USER_GUARDS.reset(token)


def user_transfers():
    """The caller's transfer guards, for tracing and running the compiled programs: their
    NumPy inputs are put on the device explicitly first (`_on_device`), so any transfer
    refused there is one the function under check makes itself."""
    levels = _USER_GUARDS.get()
    stack = contextlib.ExitStack()
    for d, level in (levels or {}).items():
        if level is not None:
            stack.enter_context(getattr(jax, f"transfer_guard_{d}")(level))
    return stack


def _placed(compiled, args):
    """`args` moved where `compiled` takes them, by explicit transfers of jaxcheck's own,
    when the caller's guard would refuse the implicit ones: jaxcheck's arrays (seeds,
    directions, steps) are made on the default device, and params on other devices or
    sharded over a mesh would pull them across (else they go with the call)."""
    if all((_USER_GUARDS.get() or {}).get(d) in (None, "allow") for d in _GUARDS[:2]):
        return args
    try:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        targets = treedef.flatten_up_to(compiled.input_shardings[0])
    except Exception:  # noqa: BLE001 - no shardings to follow: the call says what it says
        return args
    for i, (x, target) in enumerate(zip(leaves, targets, strict=True)):
        here = getattr(x, "sharding", None)
        if isinstance(target, jax.sharding.Sharding) and not (
            here is not None and here.is_equivalent_to(target, np.ndim(x))
        ):
            leaves[i] = jax.device_put(x, target)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _on_device(args):
    """NumPy leaves of `args` put on the default device by one explicit transfer, when the
    caller's guard would refuse the implicit one (else they go with the call: cheaper)."""
    if (_USER_GUARDS.get() or {}).get("host_to_device") in (None, "allow"):
        return args
    leaves, treedef = jax.tree_util.tree_flatten(args)
    host = [i for i, x in enumerate(leaves) if isinstance(x, np.ndarray | np.generic)]
    for i, x in zip(host, jax.device_put([leaves[i] for i in host])):
        leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)
