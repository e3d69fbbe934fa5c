"""The native CPU int8 / int4 matmul (jaxllama.model.cpu_kernels) equals XLA's dequantize-then-matmul,
in every layout quant.py makes, under jit and while_loop, on sharded operands, and falls back to XLA
with one warning when it cannot be built."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllama.model import cpu_kernels, quant



@pytest.fixture(autouse=True, scope="module")
def _built():
    if not cpu_kernels.available():  # builds it (once per cache) on first use
        pytest.skip(f"the native kernel is not built: {cpu_kernels._state.get('why')}")


# (mode, group, in, out): per-row and grouped int8, int4 with groups 32 / 128 and per row; odd
# output sizes (tails of the 4-row blocks), input sizes that are not a multiple of the vector
# width (partial vectors) or of a 64-byte chunk (int4), group sizes the fast int4 path does not
# take (8: 4 bytes a group), the 135M shapes.
CASES = [("int8", 0, 576, 193), ("int8", 32, 576, 37), ("int8", 0, 40, 5), ("int8", 40, 200, 3),
         ("int4", 32, 576, 193), ("int4", 128, 1536, 37), ("int4", 0, 576, 7), ("int4", 8, 48, 9),
         ("int4", 128, 256, 1),
         # large enough to be split between threads
         ("int8", 0, 1024, 2051), ("int4", 32, 1024, 2053)]


def _expected(x, q, s, mode):
    """x @ quant.dequantize(q, s) in float64 (numpy)."""
    w = np.asarray(quant.dequantize(q, s, mode), np.float64)
    return np.asarray(x, np.float64) @ w


def _case(mode, group, d_in, d_out, rows, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((d_in, d_out), np.float32))
    q, s = quant.quantize(w, mode, group)
    x = jnp.asarray(rng.standard_normal((*rows, d_in), np.float32))
    return x, q, s


def _close(got, want, d_in):
    # float32 sums of d_in products, in another order than numpy's float64 ones
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=4e-7 * np.sqrt(d_in) * np.abs(want).max())


@pytest.mark.parametrize("mode,group,d_in,d_out", CASES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_equals_xla_reference(mode, group, d_in, d_out, rows, monkeypatch):
    x, q, s = _case(mode, group, d_in, d_out, (rows,))
    got = jax.jit(cpu_kernels.qmatmul, static_argnums=3)(x, q, s, mode)
    assert got.shape == (rows, d_out) and got.dtype == jnp.float32
    want = _expected(x, q, s, mode)
    _close(got, want, d_in)
    if rows == 3:  # XLA's float32 path (quant.matmul without the kernel) is as close to the float64 answer
        monkeypatch.setattr(cpu_kernels, "wanted", lambda rows, dtype: False)
        _close(quant.matmul(x, q, s, jnp.float32), want, d_in)


def test_leading_batch_dims_and_quant_matmul():
    x, q, s = _case("int4", 32, 576, 100, (2, 1))  # [b, 1, in], as decoding's
    assert cpu_kernels.wanted(2, jnp.float32)
    got = jax.jit(lambda x: quant.matmul(x, q, s, jnp.float32))(x)
    assert got.shape == (2, 1, 100)
    _close(got, _expected(x, q, s, "int4"), 576)
    x3, q8, s8 = _case("int8", 0, 64, 24, (2, 3, 5))
    _close(cpu_kernels.qmatmul(x3, q8, s8, "int8"), _expected(x3, q8, s8, "int8"), 64)


def test_wanted():
    assert cpu_kernels.wanted(1, jnp.float32) and cpu_kernels.wanted(16, "float32")
    assert not cpu_kernels.wanted(1, jnp.bfloat16)
    assert not cpu_kernels.wanted(cpu_kernels.MAX_ROWS + 1, jnp.float32)


def test_inside_while_loop():
    """A decode-style loop: the kernel's output feeds the next step's input."""
    x, q, s = _case("int8", 32, 64, 64, (1,))
    x = x / 8

    def steps(use_kernel):
        mm = cpu_kernels.qmatmul if use_kernel else cpu_kernels.reference

        def body(c):
            i, h = c
            return i + 1, jnp.tanh(mm(h, q, s, "int8"))

        return jax.jit(lambda h: jax.lax.while_loop(lambda c: c[0] < 5, body, (0, h))[1])(x)

    np.testing.assert_allclose(steps(True), steps(False), rtol=0, atol=1e-5)


def test_vmap_and_grad():
    x, q, s = _case("int4", 32, 64, 12, (3,))
    got = jax.vmap(lambda xi: cpu_kernels.qmatmul(xi, q, s, "int4"))(x[:, None])
    _close(got[:, 0], _expected(x, q, s, "int4"), 64)

    def loss(fn):
        return jax.grad(lambda x, s: jnp.sum(jnp.sin(fn(x, q, s, "int4"))), argnums=(0, 1))(x, s)

    for a, b in zip(loss(cpu_kernels.qmatmul), loss(cpu_kernels.reference)):  # the forward's rounding differs
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("d_in,d_out", [(64, 32), (1024, 2048)])
def test_sharded_operands_under_jit(d_in, d_out):
    """Sharded inputs are gathered: the call runs replicated on every device (the larger one on
    all 8 at once, each splitting its work with the worker threads) and the result is the same."""
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    x, q, s = _case("int8", 0, d_in, d_out, (8, 1))
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    qs = jax.device_put(q, NamedSharding(mesh, P("d")))
    ss = jax.device_put(s, NamedSharding(mesh, P("d")))
    got = jax.jit(lambda x, q, s: quant.matmul(x, q, s, jnp.float32))(xs, qs, ss)
    _close(got, _expected(x, q, s, "int8"), d_in)
    rep = NamedSharding(mesh, P())
    got = jax.jit(lambda x: quant.matmul(x, q, s, jnp.float32), out_shardings=rep)(jax.device_put(x, rep))
    _close(got, _expected(x, q, s, "int8"), d_in)


def test_failed_build_falls_back(monkeypatch, tmp_path, caplog):
    """No compiler: wanted() is False, one warning says why, qmatmul still answers (XLA)."""
    x, q, s = _case("int4", 32, 64, 16, (2,))
    native = np.asarray(cpu_kernels.qmatmul(x, q, s, "int4"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cpu_kernels, "COMPILERS", ("no-such-c++",))
    with caplog.at_level(logging.WARNING, logger="jaxllama.model.cpu_kernels"):
        assert not cpu_kernels.wanted(1, jnp.float32)
        assert not cpu_kernels.wanted(4, jnp.float32)
        fallback = np.asarray(quant.matmul(x, q, s, jnp.float32))
        direct = np.asarray(cpu_kernels.qmatmul(x, q, s, "int4"))
    lines = [r.getMessage() for r in caplog.records if "native CPU" in r.getMessage()]
    assert len(lines) == 1 and "no C++ compiler" in lines[0], lines
    _close(fallback, _expected(x, q, s, "int4"), 64)
    np.testing.assert_allclose(direct, native, rtol=0, atol=1e-5)


def test_compile_error_falls_back(monkeypatch, tmp_path, caplog):
    """A compiler that fails: the same fallback, the compiler's first error line in the warning."""
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "SOURCES", (bad, *cpu_kernels.SOURCES[1:]))
    monkeypatch.setenv("JAXLLAMA_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="jaxllama.model.cpu_kernels"):
        assert not cpu_kernels.available()
    assert "failed on bad.cc, cpu_fmatmul.cc, cpu_attention.cc" in caplog.text
    assert not list((tmp_path / "kernels").glob("*.so")) and not list((tmp_path / "kernels").glob("*.tmp"))
