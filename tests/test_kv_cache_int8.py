"""``--kv-cache-dtype int8``: the KV cache holds int8 values with a float32 scale per token and head
(jaxllama.model.quant.quantize_kv). Checked: the quantizer's error bound; the native CPU attention
over an int8 cache equals XLA's over the dequantized cache; on the trained tiny model, generation
with an int8 cache keeps float32's greedy tokens and log-probabilities, sharded equals unsharded,
the cache is ~a quarter of float32's bytes, and ``serve --kv-cache-dtype int8`` answers as
``generate --kv-cache-dtype int8`` does."""

from __future__ import annotations

import dataclasses
import json

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllama.cli import main
from jaxllama.infer.engine import cache_bytes, empty_cache
from jaxllama.model import attention, cpu_kernels, quant
from jaxllama.model.llama import Arch
from serve_helpers import running_server

PROMPTS = ["def main():\n    ", "import os\n"]


def run_json(capsys, *argv):
    capsys.readouterr()
    assert main(list(argv)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_quantize_kv_error_bound():
    x = jax.random.normal(jax.random.key(0), (3, 2, 7, 64)) * jnp.arange(1, 8)[None, None, :, None]
    x = x.at[0, 0, 0].set(0.0)  # an all-zero vector: scale 1, values 0
    q, s = quant.quantize_kv(x)
    assert q.dtype == jnp.int8 and s.shape == (3, 2, 7, 1) and s.dtype == jnp.float32
    assert float(s[0, 0, 0, 0]) == 1.0 and not np.any(np.asarray(q[0, 0, 0]))
    err = np.abs(np.asarray(quant.dequantize_kv(q, s)) - np.asarray(x))
    assert np.all(err <= np.asarray(s) / 2 + 1e-6)
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernel")
@pytest.mark.parametrize("b,kv,h,d,s", [(1, 3, 9, 64, 144), (16, 3, 9, 64, 40), (3, 1, 20, 24, 5)])
def test_native_int8_attention_equals_dequantized_reference(b, kv, h, d, s):
    if not cpu_kernels.available():
        pytest.skip(f"the native kernels are not built: {cpu_kernels._state.get('why')}")
    rng = np.random.default_rng(s)
    kc, vc = (quant.quantize_kv(jnp.asarray(rng.standard_normal((b, kv, s, d), np.float32))) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((b, 1, h, d), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((b, 1, kv, d), np.float32)) for _ in range(2))
    pos = jnp.asarray((np.arange(b) * 7 % (s + 3))[:, None], jnp.int32)
    want = attention.cached_attention(q, quant.dequantize_kv(*kc), quant.dequantize_kv(*vc), pos, k, v)

    def native(*args):
        with cpu_kernels.decoding():
            return attention.cached_attention(*args)

    assert "call @jaxllama_decode_attention_int8" in jax.jit(native).lower(q, kc, vc, pos, k, v).as_text()
    got = jax.jit(native)(q, kc, vc, pos, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * float(jnp.abs(want).max()))
    xla = attention.cached_attention(q, kc, vc, pos, k, v)  # outside decoding(): XLA dequantizes
    np.testing.assert_allclose(np.asarray(xla), np.asarray(want), rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


def test_cache_bytes_and_layout():
    a = Arch(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=64, max_position=64,
             norm_eps=1e-5, rope_theta=1e4, scan_layers=False)
    from jaxllama.parallel.sharding import Layout

    q8 = dataclasses.replace(a, kv_cache_dtype="int8")
    cache = empty_cache(q8, Layout(None), 3, 48)
    (kq, ks), (vq, vs) = cache[0]
    assert kq.shape == vq.shape == (3, 2, 48, 64) and kq.dtype == jnp.int8 and ks.shape == (3, 2, 48, 1)
    assert cache_bytes(q8, 3, 48) == sum(x.nbytes for x in jax.tree.leaves(cache))
    assert cache_bytes(a, 3, 48) == sum(x.nbytes for x in jax.tree.leaves(empty_cache(a, Layout(None), 3, 48)))
    assert cache_bytes(q8, 3, 48) / cache_bytes(a, 3, 48) == pytest.approx((64 + 4) / (4 * 64))


def test_int8_cache_keeps_greedy_tokens_and_logprobs(trained_tiny, capsys):
    args = ["generate", str(trained_tiny), *sum((["--prompt", p] for p in PROMPTS), []), "--temperature", "0",
            "--max-new-tokens", "24", "--json"]
    f32 = run_json(capsys, *args)
    int8 = run_json(capsys, *args, "--kv-cache-dtype", "int8")
    for a, b in zip(f32, int8):
        same = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
        assert same >= 12, (a["tokens"], b["tokens"])
        np.testing.assert_allclose(a["logprobs"][:same], b["logprobs"][:same], atol=0.05)
    sharded = run_json(capsys, *args, "--kv-cache-dtype", "int8", "--mesh", "data=2,tensor=2")
    assert [r["tokens"] for r in sharded] == [r["tokens"] for r in int8]
    np.testing.assert_allclose([r["logprobs"] for r in sharded], [r["logprobs"] for r in int8], atol=1e-4)


def test_bad_kv_cache_dtype_is_one_line(trained_tiny, capsys):
    assert main(["generate", str(trained_tiny), "--prompt", "x", "--kv-cache-dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxllama: error: ") and err.count("\n") == 1 and "--kv-cache-dtype" in err, err


def test_serve_with_int8_cache_answers_as_generate(trained_tiny, capsys):
    [want] = run_json(capsys, "generate", str(trained_tiny), "--prompt", PROMPTS[0], "--temperature", "0",
                      "--max-new-tokens", "12", "--kv-cache-dtype", "int8", "--json")
    with running_server(trained_tiny, "--kv-cache-dtype", "int8", "--slots", "2", "--max-len", "96", "--chunk", "16",
                        name="tiny") as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12,
                                                      "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want["text"]
        bad = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": 5, "max_tokens": "x"}, timeout=30)
        assert bad.status_code == 400
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
