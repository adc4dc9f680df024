"""Checks of sharded parameters and of directions spread over devices.

They need 8 devices; `tests/test_multidevice.py` runs this module in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (8 simulated CPU devices), so the rest of
the suite keeps its single device. In a single-device run they are skipped.
"""

import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxcheck
from jaxcheck import _plan, _report

sys.path.insert(0, str(Path(__file__).parents[1]))
from cases import bug, mlp_data, mlp_loss, mlp_params  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

SIZES = (16, 64, 32, 8)


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _fsdp(params, mesh, axis="fsdp"):
    """Weights split along their first axis over `axis`, biases replicated (FSDP style)."""

    def place(x):
        spec = P(axis) if x.ndim == 2 and x.shape[0] % mesh.shape[axis] == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(place, params)


def test_fsdp_sharded_parameters_give_the_unsharded_verdict():
    params = mlp_params(SIZES, jnp.float32)
    x, y = mlp_data(SIZES, jnp.float32)
    sharded = _fsdp(params, _mesh((8,), ("fsdp",)))
    assert sharded["layers"][0]["w"].sharding.spec == P("fsdp")
    plain = jaxcheck.verify(mlp_loss(), params, x, y)
    report = jaxcheck.verify(mlp_loss(), sharded, x, y)
    assert report.status == "pass", str(report)
    # same directions; step sizes come from float32 gradient norms reduced in another order
    np.testing.assert_allclose(report.numeric, plain.numeric, rtol=1e-5)
    bad = jaxcheck.verify(mlp_loss(bug("scale", 1e-3), (1, "w")), sharded, x, y)
    assert bad.status == "fail"
    assert [leaf.path for leaf in bad.leaves if leaf.status == "fail"] == ["['layers'][1]['w']"]


def test_a_mesh_of_explicit_axes_as_jax_make_mesh_gives():
    """jax.make_mesh's axes are Explicit in newer jax, and with_sharding_constraint refuses
    them: the perturbed leaves are resharded instead."""
    explicit = (jax.sharding.AxisType.Explicit,)
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=explicit)
    params = mlp_params(SIZES, jnp.float32)
    x, y = mlp_data(SIZES, jnp.float32)
    sharded = _fsdp(params, mesh)
    report = jaxcheck.verify(mlp_loss(), sharded, x, y)
    assert report.status == "pass", str(report)
    bad = jaxcheck.verify(mlp_loss(bug("scale", 1e-3), (1, "w")), sharded, x, y)
    assert bad.status == "fail", str(bad)
    assert [leaf.path for leaf in bad.leaves if leaf.status == "fail"] == ["['layers'][1]['w']"]


def _explicit_2x4():
    explicit = (jax.sharding.AxisType.Explicit,) * 2
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=explicit)
    w = jax.device_put(jnp.linspace(-1, 1, 512).reshape(16, 32), NamedSharding(mesh, P("fsdp")))
    x = jax.device_put(jnp.linspace(-1, 1, 512).reshape(32, 16), NamedSharding(mesh, P("data")))
    return mesh, w, x


@pytest.mark.rules_auto
@pytest.mark.parametrize("order", [1, 2])
def test_a_sharded_array_output_on_a_mesh_of_explicit_axes(order):
    """The random output cotangent was replicated, where jax.vjp on Explicit axes takes one
    typed as the output (sharded over "data"): verify and check_grads raised JAX's
    "unexpected JAX type ... for argument to VJP function"."""
    _, w, x = _explicit_2x4()
    report = jaxcheck.verify(lambda w, x: jnp.tanh(x @ w), w, x, order=order)
    assert report.status == "pass", str(report)
    jaxcheck.check_grads(lambda w: jnp.tanh(x @ w), (w,), order, modes=("rev",))
    bad = jaxcheck.verify(lambda w, x: jnp.tanh(x @ _scaled_identity(1.001)(w)), w, x, order=order)
    assert bad.status == "fail", str(bad)
    # the rule's own check runs on the params' mesh (JAX refused to mix its draws with
    # arrays on it: "not checked"), and its cotangents are typed as its output (its bwd's
    # result was refused: a spurious "primal" failure)
    [line] = [q for q in bad.problems if "wrong rule" in q]
    assert "custom_vjp scaled_identity at " in line, line
    assert ": vjp vs finite differences, relative error 1.0e-03" in line, line


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "auto"])
def test_transformation_rows_run_on_the_mesh_of_the_arrays(explicit):
    """With transforms=True on a mesh of Explicit axes, the jit and forward-vs-reverse rows
    ran their jitted gradients outside the arrays' mesh (JAX: "Please enter your `jit` into
    a mesh context"), which failed a correct model as "the gradient under jax.jit is
    WRONG", and the vmap row could not slice one example out of a batch sharded over
    "data"."""
    if explicit:
        _, w, x = _explicit_2x4()
    else:
        mesh = _mesh((2, 4), ("data", "fsdp"))
        w = jax.device_put(jnp.linspace(-1, 1, 512).reshape(16, 32), NamedSharding(mesh, P("fsdp")))
        x = jax.device_put(jnp.linspace(-1, 1, 512).reshape(32, 16), NamedSharding(mesh, P("data")))
    report = jaxcheck.verify(lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2), w, x, transforms=True)
    assert report.status == "pass", str(report)
    rows = {p.label: p.status.value for p in report.parts[-1].parts}
    assert rows == dict.fromkeys(["jit", "vmap", "checkpoint", "forward vs reverse"], "pass")
    assert not any(q.startswith("transforms") for q in report.problems), str(report)


def _scaled_identity(factor):
    @jax.custom_vjp
    def scaled_identity(w):
        return w

    scaled_identity.defvjp(lambda w: (w, None), lambda _, g: (g * factor,))
    return scaled_identity


@pytest.mark.parametrize("order", [1, 2])
def test_a_grad_fn_returning_another_layout_on_a_mesh_of_explicit_axes(order):
    """A tensor-parallel grad_fn returned its gradient column-sharded beside row-sharded
    params: the projection onto the directions raised JAX's ShardingTypeError."""
    mesh, w, x = _explicit_2x4()

    def loss(w, x):
        return jnp.mean(jnp.tanh(x @ w) ** 2)

    def grad_fn(scale):
        def g(w, x):
            cols = NamedSharding(mesh, P(None, "fsdp"))
            return jax.sharding.reshard(scale * jax.grad(loss)(w, x), cols)

        return g

    report = jaxcheck.verify(loss, w, x, grad_fn=grad_fn(1.0), order=order)
    assert report.status == "pass", str(report)
    bad = jaxcheck.verify(loss, w, x, grad_fn=grad_fn(1.001), order=order)
    assert bad.status == "fail", str(bad)


@pytest.mark.parametrize("kind", ["Explicit", "Auto"])
def test_directions_over_an_explicit_axis_the_batch_is_sharded_over_are_refused(kind):
    """On a mesh of Explicit axes, directions spread over the axis that also shards the
    batch raised JAX's ShardingTypeError from inside fn; it is refused by name, and an
    Auto mesh runs."""
    axis_type = getattr(jax.sharding.AxisType, kind)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(axis_type, axis_type))
    w = jnp.linspace(-1.0, 1.0, 512).reshape(16, 32) / 4
    w = jax.device_put(w, NamedSharding(mesh, P(None, "fsdp")))
    x = jnp.linspace(-2.0, 2.0, 128).reshape(8, 16)
    x = jax.device_put(x, NamedSharding(mesh, P("data", None)))

    def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p["w"]) ** 2)

    directions = NamedSharding(mesh, P("data"))
    if kind == "Auto":
        assert jaxcheck.verify(loss, {"w": w}, x, direction_sharding=directions).ok
        return
    with pytest.raises(
        ValueError,
        match=re.escape(
            "direction_sharding spreads the directions over mesh axis 'data', and args[0] is "
            "sharded over it too (PartitionSpec('data', None)); on a mesh of Explicit axes an "
            "array cannot be split over one axis twice"
        ),
    ):
        jaxcheck.verify(loss, {"w": w}, x, direction_sharding=directions)


def test_perturbed_copies_stay_sharded():
    """An elementwise loss of one sharded leaf needs no gathering: no parameter-sized
    all-gather in any compiled program, and per-device peak memory about 1/8 of the
    unsharded one."""
    mesh = _mesh((8,), ("fsdp",))
    w = jnp.full((2048, 256), 0.3, jnp.float32)

    def loss(p):
        return jnp.sum(jnp.sin(p["w"]) ** 2)

    plain = jaxcheck.verify(loss, {"w": w})
    before = set(_plan._CACHE)
    sharded = jaxcheck.verify(loss, {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp")))})
    assert sharded.status == "pass"
    assert sharded.peak_memory_bytes < plain.peak_memory_bytes / 5
    # (by key: a full cache drops its oldest programs as new ones come in)
    programs = [c for key, c in _plan._CACHE.kept() if key not in before]
    gathered = [n for c, *_ in programs for n in _gathered_sizes(c.as_text())]
    # partial sums of a reduction may be gathered (8 numbers); a parameter never is
    assert programs and max(gathered, default=0) < 100, gathered


def _gathered_sizes(hlo: str) -> list[int]:
    """Element counts of the results of all all-gather ops in an HLO text."""
    shapes = re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", hlo)
    return [math.prod(int(d) for d in shape.split(",") if d) for shape in shapes]


@pytest.mark.parametrize("num_directions", [8, 16])
def test_directions_spread_over_a_mesh_axis(num_directions):
    params = mlp_params(SIZES, jnp.float32)
    x, y = mlp_data(SIZES, jnp.float32)
    over = NamedSharding(_mesh((8,), ("data",)), P("data"))
    # spread directions always take all K (no sequential looks): compare with a fixed K
    plain = jaxcheck.verify(
        mlp_loss(), params, x, y, num_directions=num_directions, sequential=False
    )
    spread = jaxcheck.verify(
        mlp_loss(), params, x, y, num_directions=num_directions, direction_sharding=over
    )
    assert spread.status == "pass", str(spread)
    assert spread.num_directions == num_directions
    assert spread.stopped == f"took all {num_directions} directions, {_report.FIXED}"
    # same directions and step; both vmapped, but grouped differently (the plain check of
    # this small problem vmaps its stencil points too), so fn's float64 values round
    # differently, by ~1e-13 of fn, which the step of 6e-6 makes ~1e-6 of the differences
    assert spread.step == plain.step
    np.testing.assert_allclose(spread.numeric, plain.numeric, rtol=1e-5)
    assert spread.relative_error == pytest.approx(plain.relative_error, rel=0.01)
    bad = jaxcheck.verify(
        mlp_loss(bug("scale", 1e-3), (0, "b")),
        params,
        x,
        y,
        num_directions=num_directions,
        direction_sharding=over,
    )
    assert [leaf.path for leaf in bad.leaves if leaf.status == "fail"] == ["['layers'][0]['b']"]


def test_directions_over_data_and_parameters_over_fsdp_on_a_2d_mesh():
    mesh = _mesh((2, 4), ("data", "fsdp"))
    params = _fsdp(mlp_params(SIZES, jnp.float32), mesh)
    x, y = mlp_data(SIZES, jnp.float32)
    report = jaxcheck.verify(
        mlp_loss(), params, x, y, direction_sharding=NamedSharding(mesh, P("data"))
    )
    assert report.status == "pass", str(report)


def test_number_of_directions_must_divide_over_the_shards():
    over = NamedSharding(_mesh((8,), ("data",)), P("data"))
    with pytest.raises(ValueError, match=r"num_directions=12 is not a multiple of the 8 shards"):
        jaxcheck.verify(
            lambda p: jnp.sum(p**2), jnp.ones(3), num_directions=12, direction_sharding=over
        )


def test_a_direction_mesh_of_other_devices_than_the_arrays():
    """Directions spread over a mesh of devices 4..7: NumPy and uncommitted arrays are
    placed there (JAX's "Received incompatible devices" was raised for them too); an array
    committed elsewhere is named, with the fix."""
    d = jax.devices()
    over = NamedSharding(Mesh(np.array(d[4:]), ("d",)), P("d"))

    def fn(p, x):
        return jnp.sum(jnp.sin(p["w"]) * x)

    params, x = {"w": jnp.linspace(-1.0, 1.0, 5)}, np.linspace(0.5, 1.0, 5)
    report = jaxcheck.verify(fn, params, x, num_directions=4, direction_sharding=over)
    assert report.status == "pass", str(report)
    assert params["w"].devices() == {d[0]}  # the caller's array stays where it was
    committed = {"w": jax.device_put(params["w"], d[0])}
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(fn, committed, x, num_directions=4, direction_sharding=over)
    assert str(info.value) == (
        "direction_sharding spreads the directions over the devices of its mesh ("
        + ", ".join(str(device) for device in d[4:])
        + f"), but params['w'] is committed to {d[0]}. Put params and args on the mesh's "
        "devices, say jax.device_put(x, NamedSharding(mesh, PartitionSpec())), or use a mesh "
        "of the devices that hold them."
    )


def test_arrays_on_different_devices_are_named():
    """jax.jit refuses arrays committed to different devices, naming an argument of an
    internal program ("argument diff[0] of probe"); the check names the leaves instead. A
    sharded params with its data on the mesh is checked."""
    d = jax.devices()
    params = {"a": jax.device_put(jnp.ones(3), d[0]), "b": jax.device_put(jnp.ones(3), d[1])}
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(lambda p: jnp.sum(p["a"] * p["b"]), params)
    assert str(info.value) == (
        f"params and args hold arrays committed to different devices (params['a'] on {d[0]}; "
        f"params['b'] on {d[1]}). jax.jit, and so the check, needs every array on the same "
        "devices: move them with jax.device_put(x, device), or shard them all over one mesh."
    )
    x = jax.device_put(jnp.ones(3), d[2])
    with pytest.raises(ValueError, match=r"\(params\['a'\] on .*; args\[0\] on "):
        jaxcheck.verify(lambda p, x: jnp.sum(p["a"] * x), {"a": params["a"]}, x)
    mesh = _mesh((8,), ("d",))
    on_mesh = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("d")))
    data = jax.device_put(jnp.ones(8), NamedSharding(mesh, P()))
    assert jaxcheck.verify(lambda p, x: jnp.sum(jnp.sin(p) * x), on_mesh, data).status == "pass"
    # verify_rule too (its every row failed, and the rule was called WRONG)
    with pytest.raises(ValueError, match=r"^verify_rule: the inputs hold arrays committed to "):
        jaxcheck.verify_rule(lambda a, b: jnp.sin(a) * b, params["a"], params["b"])


@pytest.mark.parametrize("placement", ["fsdp", "device 3"])
@pytest.mark.parametrize("level", ["disallow", "disallow_explicit"])
def test_params_off_the_default_device_under_a_transfer_guard(placement, level):
    """jaxcheck's own arrays (seeds, directions, steps) are made on the default device;
    with params sharded over a mesh or on another device, running its programs moved them
    across, which the caller's transfer guard refused (JaxRuntimeError). They are put where
    the programs take them first, outside the guard; fn keeps the caller's guard."""
    w = jnp.linspace(-1.0, 1.0, 64).reshape(16, 4)
    if placement == "fsdp":
        w = jax.device_put(w, NamedSharding(_mesh((8,), ("fsdp",)), P("fsdp")))
    else:
        w = jax.device_put(w, jax.devices()[3])

    def loss(p):
        return jnp.sum(jnp.tanh(p["w"]) ** 2)

    with jax.transfer_guard(level):
        assert jaxcheck.verify(loss, {"w": w}).status == "pass"
        assert jaxcheck.verify(loss, {"w": w}, order=2).status == "pass"
        bad = jaxcheck.verify(
            lambda p: loss(p) + 1e-3 * jnp.sum(jax.lax.stop_gradient(p["w"])), {"w": w}
        )
        assert bad.status == "fail"
        # the caller's guard is in force again after the check
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.jit(jnp.sin)(np.ones(2, np.float32))


def test_a_function_checked_again_on_another_device_runs_there():
    """Programs were keyed without the device of arrays on one device: a second check of
    the same function on arrays committed to another device reused the first's program,
    which JAX refused ("compiled for input shardings that disagree"); so did NumPy params
    under another default device, and jnp.sin checked by check_grads on two devices."""

    def loss(p, x):
        return jnp.sum(jnp.tanh(p["w"] @ x))

    p = {"w": jnp.linspace(0.1, 1.0, 6).reshape(2, 3)}
    x = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    devices = jax.devices()
    statuses = [jaxcheck.verify(loss, p, x).status.value]
    for d in (3, 5, 0):
        statuses.append(jaxcheck.verify(loss, *jax.device_put((p, x), devices[d])).status.value)
    with jax.default_device(devices[6]):
        numpy_params = jax.tree.map(np.asarray, p)
        statuses.append(jaxcheck.verify(loss, numpy_params, np.asarray(x)).status.value)
    assert statuses == ["pass"] * 5
    a = jnp.linspace(0.1, 1.0, 5)
    jaxcheck.check_grads(jnp.sin, (a,), 1)
    jaxcheck.check_grads(jnp.sin, (jax.device_put(a, devices[3]),), 1)
