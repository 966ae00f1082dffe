"""Run by tests/test_distributed_jax.py in a fresh process: 8 simulated CPU devices
(XLA_FLAGS must be set before jax is imported). Prints one JSON line of results."""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import favorplus as fp

jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
B, H, L, D = 2, 2, 64, 8
q0, k0, v0 = (jnp.asarray(rng.standard_normal((B, H, L, D)) * 0.7) for _ in range(3))
w = jnp.asarray(fp.draw_projection(16, D, seed=0))
mask = np.ones((B, 1, L), dtype=bool)
mask[0, :, 8:40] = False  # whole shards of 8 tokens without any key (8 devices)
mask[1, :, 3] = False
bias = np.where(rng.random((B, 1, L)) < 0.2, -np.inf, rng.standard_normal((B, 1, L)))
masks = {
    "none": jnp.ones((B, 1, L), dtype=bool),
    "bool": jnp.asarray(mask),
    "float": jnp.asarray(bias),
}
res: dict[str, float] = {}
# single-device references, computed outside any mesh
refs = {
    (c, kern, m): np.asarray(fp.favor_attention(q0, k0, v0, w, causal=c, kernel=kern, key_mask=km))
    for c in (False, True)
    for kern in ("softmax", "softmax_hyperbolic", "relu")
    for m, km in masks.items()
}
grefs = {
    c: jax.grad(
        lambda q, k, v, c=c: jnp.sum(
            jnp.sin(fp.favor_attention(q, k, v, w, causal=c, key_mask=masks["float"]))
        ),
        (0, 1, 2),
    )(q0, k0, v0)
    for c in (False, True)
}


def sharded(mesh, spec, causal, kernel, km):
    seq = P(*spec, None)
    mspec = P(spec[0], None, spec[2])

    def body(q, k, v, m):
        return fp.favor_attention(
            q, k, v, w, causal=causal, kernel=kernel, key_mask=m, axis_name=spec[2]
        )

    f = jax.shard_map(body, mesh=mesh, in_specs=(seq, seq, seq, mspec), out_specs=seq)
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    return jax.jit(f), (put(q0, seq), put(k0, seq), put(v0, seq), put(km, mspec))


for shape, spec in (((8,), (None, None, "s")), ((2, 4), ("b", None, "s"))):
    names = ("s",) if len(shape) == 1 else ("b", "s")
    mesh = jax.make_mesh(shape, names)
    with jax.set_mesh(mesh):
        for causal in (False, True):
            # every kernel on the (8,) mesh; softmax on (2, 4) (each case compiles)
            kernels = ("softmax", "softmax_hyperbolic", "relu") if shape == (8,) else ("softmax",)
            for kernel in kernels:
                for mname, km in masks.items():
                    f, args = sharded(mesh, spec, causal, kernel, km)
                    out = f(*args)
                    ref = refs[(causal, kernel, mname)]
                    key = f"{shape}-{causal}-{kernel}-{mname}"
                    res[key] = float(jnp.max(jnp.abs(np.asarray(out) - ref)))
            # gradients, softmax with the float mask
            km = masks["float"]
            f, args = sharded(mesh, spec, causal, "softmax", km)
            g = jax.grad(
                lambda q, k, v, f=f, m=args[3]: jnp.sum(jnp.sin(f(q, k, v, m))), (0, 1, 2)
            )(*args[:3])
            gr = grefs[causal]
            res[f"grad-{shape}-{causal}"] = max(
                float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(g, gr)
            )
        # leak-freedom: shards 0..4 of 8 bit for bit unchanged whatever shards 5..7 hold
        if shape == (8,):
            km = masks["none"]
            f, args = sharded(mesh, spec, True, "softmax", km)
            base = np.asarray(f(*args))
            worst = 0
            for bad in (np.inf, np.nan, 1e30, -1e30):
                k2, v2 = np.asarray(k0).copy(), np.asarray(v0).copy()
                k2[..., 40:, :] = bad
                v2[..., 40:, :] = bad
                seq = P(None, None, "s")
                a2 = (
                    args[0],
                    jax.device_put(jnp.asarray(k2), NamedSharding(mesh, seq)),
                    jax.device_put(jnp.asarray(v2), NamedSharding(mesh, seq)),
                    args[3],
                )
                out2 = np.asarray(f(*a2))
                worst += int(np.sum(out2[..., :40, :] != base[..., :40, :]))
            res["leaked_bits"] = worst

# Other mesh shapes and shard counts: 2 shards on a (2, 2) mesh of 4 devices (batch over
# the other axis), and 8 shards over a tuple of two mesh axes (2, 4); bidirectional and
# causal, the bool mask (it empties whole shards of 8 tokens).
for shape, names, axis in (((2, 2), ("b", "s"), "s"), ((2, 4), ("a", "c"), ("a", "c"))):
    mesh = jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])
    with jax.set_mesh(mesh):
        bspec = "b" if "b" in names else None
        seq, mspec = P(bspec, None, axis, None), P(bspec, None, axis)
        put = lambda x, s, mesh=mesh: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
        for causal in (False, True):

            def body(q, k, v, m, causal=causal, axis=axis):
                return fp.favor_attention(q, k, v, w, causal=causal, key_mask=m, axis_name=axis)

            f = jax.jit(
                jax.shard_map(body, mesh=mesh, in_specs=(seq, seq, seq, mspec), out_specs=seq)
            )
            args = (put(q0, seq), put(k0, seq), put(v0, seq), put(masks["bool"], mspec))
            out = f(*args)
            ref = refs[(causal, "softmax", "bool")]
            res[f"mesh-{shape}-{causal}"] = float(jnp.max(jnp.abs(np.asarray(out) - ref)))
            if axis == ("a", "c"):
                g = jax.grad(
                    lambda q, k, v, f=f, m=args[3]: jnp.sum(jnp.sin(f(q, k, v, m))), (0, 1, 2)
                )(*args[:3])
                gr = jax.grad(
                    lambda q, k, v, c=causal: jnp.sum(
                        jnp.sin(fp.favor_attention(q, k, v, w, causal=c, key_mask=masks["bool"]))
                    ),
                    (0, 1, 2),
                )(q0, k0, v0)
                res[f"mgrad-{shape}-{causal}"] = max(
                    float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(g, gr)
                )

# Under jax.jit without shard_map: a sequence-sharded NamedSharding on a mesh with Auto
# axes; the plain call (no axis_name), partitioned by XLA, equals the single-device call.
auto = jax.make_mesh((8,), ("s",), axis_types=(jax.sharding.AxisType.Auto,))
seq = P(None, None, "s", None)
for causal in (False, True):
    put = lambda x: jax.device_put(x, NamedSharding(auto, seq))  # noqa: E731
    plain = jax.jit(lambda q, k, v, c=causal: fp.favor_attention(q, k, v, w, causal=c))
    out = plain(put(q0), put(k0), put(v0))
    res[f"jit-{causal}"] = float(
        jnp.max(jnp.abs(np.asarray(out) - refs[(causal, "softmax", "none")]))
    )
    res[f"jit-spec-{causal}"] = str(out.sharding.spec)

# Under jax.jit on a mesh with Explicit axes (jax.make_mesh's default): the plain call
# runs the sharded algorithm inside jax.shard_map by itself; outputs and gradients equal
# the single-device ones, the output keeps the inputs' sharding.
mesh = jax.make_mesh((2, 4), ("b", "s"))
seq, mspec = P("b", None, "s", None), P("b", None, "s")
put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
with jax.set_mesh(mesh):
    args = (put(q0, seq), put(k0, seq), put(v0, seq), put(masks["bool"], mspec))
    for causal in (False, True):
        plain = jax.jit(
            lambda q, k, v, m, c=causal: fp.favor_attention(q, k, v, w, causal=c, key_mask=m)
        )
        out = plain(*args)
        ref = refs[(causal, "softmax", "bool")]
        res[f"explicit-{causal}"] = float(jnp.max(jnp.abs(np.asarray(out) - ref)))
        res[f"explicit-spec-{causal}"] = str(out.sharding.spec)
    g = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(plain(q, k, v, args[3]))), (0, 1, 2))(*args[:3])
    gr = jax.grad(
        lambda q, k, v: jnp.sum(
            jnp.sin(fp.favor_attention(q, k, v, w, causal=True, key_mask=masks["bool"]))
        ),
        (0, 1, 2),
    )(q0, k0, v0)
    res["explicit-grad"] = max(
        float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(g, gr)
    )
    # A key mask not sharded like k: not along the keys, or along the keys but with its
    # batch axis replicated (each shard would pair the whole batch's mask with its half
    # of the batch, and the output come back with twice the batch).
    for case, spec in (("keys", P("b", None, None)), ("batch", P(None, None, "s"))):
        try:
            fp.favor_attention(*args[:3], w, key_mask=put(masks["bool"], spec))
            res[f"explicit-mask-{case}"] = "no error"
        except ValueError as e:
            res[f"explicit-mask-{case}"] = str(e)
    # One mask row for every batch row and head, (L,) sharded over the keys: broadcast.
    row = np.asarray(masks["bool"])[1, 0]
    out = jax.jit(lambda q, k, v, m: fp.favor_attention(q, k, v, w, causal=True, key_mask=m))(
        *args[:3], put(row, P("s"))
    )
    ref = fp.favor_attention(*map(np.asarray, (q0, k0, v0, w)), causal=True, key_mask=row)
    res["explicit-mask-row"] = float(jnp.max(jnp.abs(np.asarray(out) - np.asarray(ref))))

try:
    fp.favor_attention(q0, k0, v0, w, axis_name="nowhere")
    res["unbound"] = "no error"
except ValueError as e:
    res["unbound"] = str(e)
print(json.dumps(res))
