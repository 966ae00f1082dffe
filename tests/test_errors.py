"""Bad input: a clear ValueError or TypeError from favorplus naming the argument."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import favorplus as fp


@pytest.fixture
def qkvw(xp):
    rng = np.random.default_rng(0)
    q, k, v = (xp.asarray(rng.standard_normal((2, 5, 4))) for _ in range(3))
    w = xp.asarray(fp.draw_projection(8, 4, seed=0))
    return q, k, v, w


def test_feature_dimension_mismatch(xp, qkvw):
    q, k, v, w = qkvw
    k3 = xp.asarray(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match=r"q and k .*feature dimension.*\(2, 5, 4\).*\(2, 5, 3\)"):
        fp.favor_attention(q, k3, v, w)
    w3 = xp.asarray(fp.draw_projection(8, 3, seed=0))
    with pytest.raises(ValueError, match=r"projection\.shape\[1\].*\(4\).*\(8, 3\)"):
        fp.favor_attention(q, k, v, w3)
    with pytest.raises(
        ValueError, match=r"projection must have shape \(num_features, 4\); got shape \(4,\)"
    ):
        fp.favor_attention(q, k, v, w[0, ...])


def test_length_mismatch(xp, qkvw):
    q, k, v, w = qkvw
    v6 = xp.asarray(np.zeros((2, 6, 4)))
    with pytest.raises(ValueError, match=r"k and v .*same length.*\(2, 5, 4\).*\(2, 6, 4\)"):
        fp.favor_attention(q, k, v6, w)
    with pytest.raises(ValueError, match=r"k and v"):
        fp.softmax_attention(q, k, v6)


def test_batch_dimensions_must_broadcast(xp, qkvw):
    q, k, v, w = qkvw
    k3 = xp.asarray(np.zeros((3, 5, 4)))
    with pytest.raises(ValueError, match=r"broadcast.*q: \(2,\).*k: \(3,\)"):
        fp.favor_attention(q, k3, v, w)


def test_mixed_namespaces(xp, qkvw):
    q, k, v, w = qkvw
    if xp.name == "numpy":
        pytest.skip("needs a second namespace")
    with pytest.raises(TypeError, match=r"same array library.*v: numpy\.ndarray"):
        fp.favor_attention(q, k, np.zeros((2, 5, 4)), w)
    with pytest.raises(TypeError, match=r"projection: numpy\.ndarray"):
        fp.favor_attention(q, k, v, fp.draw_projection(8, 4, seed=0))


def test_not_an_array(xp, qkvw):
    q, k, v, w = qkvw
    with pytest.raises(TypeError, match=r"v must be an array.*list"):
        fp.favor_attention(q, k, [[1.0]], w)


def test_mixed_devices():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    q = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"same device.*cuda"):
        fp.favor_attention(q, q, q.cuda(), torch.zeros(8, 4))


@pytest.mark.parametrize("bad", ["int64", "int32", "bool", "complex128"])
def test_integer_complex_and_bool_dtypes(xp, qkvw, bad):
    q, k, v, w = qkvw
    ns = xp.xp
    if not hasattr(ns, bad):
        pytest.skip(f"{xp.name} has no {bad}")
    x = ns.asarray(np.ones((2, 5, 4)).astype(bad), device=xp.device)
    with pytest.raises(TypeError, match=rf"q must have a real floating dtype.*{bad}"):
        fp.favor_attention(x, k, v, w)
    with pytest.raises(TypeError, match=r"v must have a real floating dtype"):
        fp.favor_attention(q, k, x, w)
    with pytest.raises(TypeError, match=r"projection must have a real floating dtype"):
        fp.favor_attention(q, k, v, ns.asarray(np.ones((8, 4)).astype(bad), device=xp.device))
    with pytest.raises(TypeError, match=r"real floating"):
        fp.softmax_attention(q, x, v)


def test_mask_shape_and_dtype(xp, qkvw):
    q, k, v, w = qkvw
    with pytest.raises(
        ValueError, match=r"key_mask must have shape \(\.\.\., Lk\).*5 keys.*\(2, 4\)"
    ):
        fp.favor_attention(q, k, v, w, key_mask=xp.asarray(np.ones((2, 4), dtype=bool)))
    with pytest.raises(TypeError, match=r"key_mask must be a boolean mask .* or a real floating"):
        ints = xp.xp.asarray(np.ones((2, 5), dtype=np.int32), device=xp.device)
        fp.favor_attention(q, k, v, w, key_mask=ints)
    with pytest.raises(ValueError, match=r"broadcast.*key_mask: \(3,\)"):
        fp.favor_attention(q, k, v, w, key_mask=xp.asarray(np.ones((3, 5), dtype=bool)))


def test_num_features_and_dim():
    with pytest.raises(ValueError, match=r"num_features must be at least 1; got 0"):
        fp.draw_projection(0, 4)
    with pytest.raises(ValueError, match=r"dim must be at least 1; got -2"):
        fp.draw_projection(4, -2)
    with pytest.raises(TypeError, match=r"num_features must be an int; got float"):
        fp.draw_projection(4.0, 4)
    with pytest.raises(ValueError, match=r"kind must be one of.*'gaussian'"):
        fp.draw_projection(4, 4, kind="gaussian")
    with pytest.raises(ValueError, match=r"norms must be one of.*'unit'"):
        fp.draw_projection(4, 4, norms="unit")
    with pytest.raises(TypeError, match=r"seed must be an int.*str"):
        fp.draw_projection(4, 4, seed="0")
    with pytest.raises(TypeError, match=r"seed must be an int.*bool"):
        fp.draw_projection(4, 4, seed=True)
    with pytest.raises(ValueError, match=r"seed must be a non-negative int; got -1"):
        fp.draw_projection(4, 4, seed=-1)


def test_empty_projection(xp, qkvw):
    q, k, v, _ = qkvw
    w0 = xp.asarray(np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"at least one row.*num_features >= 1.*\(0, 4\)"):
        fp.favor_attention(q, k, v, w0)


def test_unknown_kernel_and_bad_scale(xp, qkvw):
    q, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"kernel must be one of.*'gelu'"):
        fp.favor_attention(q, k, v, w, kernel="gelu")
    with pytest.raises(ValueError, match=r"kernel must be one of"):
        fp.feature_map(q, w, kernel=3)
    with pytest.raises(ValueError, match=r"scale must be finite and non-negative; got -1"):
        fp.favor_attention(q, k, v, w, scale=-1.0)
    with pytest.raises(TypeError, match=r"scale must be a real number"):
        fp.favor_attention(q, k, v, w, scale="0.5")
    with pytest.raises(
        ValueError, match=r"projection must be an \(m, 4\) array for kernel 'softmax'"
    ):
        fp.favor_attention(q, k, v, None)
    with pytest.raises(ValueError, match=r"chunk_size must be at least 1; got 0"):
        fp.favor_attention(q, k, v, w, causal=True, chunk_size=0)
    # A flag that is not a bool ("False" would count as true): an error, not a guess.
    for bad in ("False", 1, None):
        with pytest.raises(TypeError, match=r"causal must be a bool; got"):
            fp.favor_attention(q, k, v, w, causal=bad)
        with pytest.raises(TypeError, match=r"causal must be a bool; got"):
            fp.softmax_attention(q, k, v, causal=bad)
    assert fp.favor_attention(q, k, v, w, causal=np.bool_(True)).shape == v.shape


def test_too_few_dimensions(xp, qkvw):
    _, k, v, w = qkvw
    with pytest.raises(ValueError, match=r"q must have at least 2 dimensions.*\(4,\)"):
        fp.favor_attention(xp.asarray(np.zeros(4)), k, v, w)


def test_import_loads_no_backend():
    code = (
        "import sys, favorplus; "
        "bad = [m for m in ('torch', 'jax', 'cupy', 'array_api_strict') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
