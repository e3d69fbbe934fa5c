"""Host malloc keeps freed memory on CPU hosts, so a jitted program's temporaries are not faulted in anew.

Each check runs a fresh interpreter: the setting must come before numpy and JAX start their threads,
and the effect is measured as the process's minor page faults (``getrusage``) per call of a program
with 128 MiB of temporaries, glibc's default against ours. With ours the heap still settles over the
first calls (a call may land its temporaries on pages no call has touched yet), so the probe warms
up for 10 calls and averages 20: glibc's default faults every page in on every call.
"""

import os
import subprocess
import sys

import pytest

from jaxllama.errors import ConfigError
from jaxllama.host_malloc import keep_freed_memory

ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
ENV.pop("JAXLLAMA_HOST_MALLOC", None)

# Prints: faults per call, and the temporary's size in pages.
PROBE = """
import resource
def probe():
    import jax, jax.numpy as jnp
    @jax.jit
    def f(x, w):
        y = jax.lax.optimization_barrier(jnp.sin(x))  # 64 MiB, read twice: a temporary, not an output
        return jnp.cos(y).sum(0) @ w[:, 0] + (y * y).sum()
    x, w = jnp.ones((4096, 4096)), jnp.ones((4096, 8))
    for _ in range(10):  # the heap settles: later calls reuse what earlier ones faulted in
        f(x, w).block_until_ready()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        f(x, w).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 20
    pages = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes / 4096
    print(faults, pages)
    return 0
"""


def _faults(prelude: str, env: dict | None = None) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", prelude + PROBE + "\nmain_()"], capture_output=True, text=True,
                         env=env or ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    faults, pages = map(float, out.stdout.split()[-2:])
    return faults, pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_cli_entry_keeps_the_temporary_mapped():
    # glibc's default: the temporary is mmapped afresh each call, every page faulted in.
    faults, pages = _faults("def main_():\n    probe()\n", dict(ENV, JAXLLAMA_HOST_MALLOC="default"))
    assert pages > 30000 and faults > 0.9 * pages, (faults, pages)
    # Through the console script's entry (JAXLLAMA_HOST_MALLOC unset: auto, and this host has no
    # accelerator), with the verb replaced by the probe: the same program faults almost never.
    entry = ("import jaxllama.cli as cli\n"
             "def main_():\n    cli.main = probe\n    cli.entry()\n")
    faults, pages = _faults(entry)
    assert faults < 0.15 * pages, (faults, pages)


def test_bad_setting_is_a_one_line_error():
    with pytest.raises(ConfigError, match="JAXLLAMA_HOST_MALLOC='sometimes'"):
        keep_freed_memory("sometimes")
    out = subprocess.run([sys.executable, "-m", "jaxllama.cli", "info"], capture_output=True, text=True,
                         env=dict(ENV, JAXLLAMA_HOST_MALLOC="sometimes"), timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "jaxllama: error: JAXLLAMA_HOST_MALLOC='sometimes': expected one of auto, keep, default"]


def test_default_leaves_malloc_alone():
    assert keep_freed_memory("default") is False
