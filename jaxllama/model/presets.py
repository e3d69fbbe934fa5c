"""Published Llama shapes, plus `tiny` (CPU demo) and `debug` (tests).

Each preset is a dict of :class:`jaxllama.config.ModelConfig` fields; a config may override any
of them (``model.preset=llama3-8b model.n_layers=4``).
"""

from __future__ import annotations

_L1 = dict(vocab_size=32000, rope_theta=10000.0, norm_eps=1e-6, max_position=2048)
_L2 = dict(vocab_size=32000, rope_theta=10000.0, norm_eps=1e-5, max_position=4096)
_L3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, max_position=8192)
# Llama 3.1/3.2 stretch RoPE to 128k positions with the "llama3" frequency scaling.
_L31 = dict(_L3, max_position=131072, rope_type="llama3", rope_factor=8.0,
            rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192)
_L32 = dict(_L31, rope_factor=32.0, tie_embeddings=True)


def _shape(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int, **extra) -> dict:
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, **extra)


PRESETS: dict[str, dict] = {
    "llama1-7b": dict(_L1, **_shape(4096, 32, 32, 32, 11008)),
    "llama1-13b": dict(_L1, **_shape(5120, 40, 40, 40, 13824)),
    "llama1-33b": dict(_L1, **_shape(6656, 60, 52, 52, 17920)),
    "llama1-65b": dict(_L1, **_shape(8192, 80, 64, 64, 22016)),
    "llama2-7b": dict(_L2, **_shape(4096, 32, 32, 32, 11008)),
    "llama2-13b": dict(_L2, **_shape(5120, 40, 40, 40, 13824)),
    "llama2-70b": dict(_L2, **_shape(8192, 80, 64, 8, 28672)),
    "llama3-8b": dict(_L3, **_shape(4096, 32, 32, 8, 14336)),
    "llama3-70b": dict(_L3, **_shape(8192, 80, 64, 8, 28672)),
    "llama3.1-8b": dict(_L31, **_shape(4096, 32, 32, 8, 14336)),
    "llama3.1-70b": dict(_L31, **_shape(8192, 80, 64, 8, 28672)),
    "llama3.1-405b": dict(_L31, **_shape(16384, 126, 128, 8, 53248)),
    "llama3.2-1b": dict(_L32, **_shape(2048, 16, 32, 8, 8192)),
    "llama3.2-3b": dict(_L32, **_shape(3072, 28, 24, 8, 8192)),
    # ~3.4M parameters (GQA, Llama 3 style): trains visibly on 2 CPU cores within a minute. Its layers
    # are unrolled (every other preset scans them): 4 compile as fast as one, and the scan's stacked
    # residuals (written per layer, read back by the backward) cost ~7% of a CPU step.
    "tiny": dict(vocab_size=2048, rope_theta=10000.0, norm_eps=1e-5, max_position=1024, scan_layers=False,
                 **_shape(256, 4, 8, 4, 688)),
    # A few thousand parameters' worth of shapes for unit tests: GQA, 2 layers.
    "debug": dict(vocab_size=128, rope_theta=10000.0, norm_eps=1e-5, max_position=256,
                  **_shape(64, 2, 4, 2, 96)),
}
