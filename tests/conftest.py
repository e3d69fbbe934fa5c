"""8 simulated CPU devices for every test, set before JAX is imported; shared small fixtures."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The stdlib demo tokenizer is trained on first use and cached: tests cache it per session, not in ~/.cache.
os.environ.setdefault("JAXLLAMA_CACHE", tempfile.mkdtemp(prefix="jaxllama-test-cache-"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

pytest_plugins = ["trained_model"]  # the session fixture trained_tiny: a small model trained for real


# The slowest files (a minute or more each on 2 cores), started first: under pytest-xdist (--dist
# loadfile) a worker takes the next file when it finishes one, so a slow file collected last (the
# alphabet put test_tpu_compile.py there) left the other worker idle for its last minutes.
SLOW_FILES = ("test_tpu_compile.py", "test_option_matrix.py", "test_dpo.py", "test_lora.py", "test_multiprocess.py",
              "test_launch_slurm.py", "test_checkpoint_signals.py", "test_train_loop.py")


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: order.get(item.path.name, len(SLOW_FILES)))  # stable: file order kept within


def pytest_configure(config):
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (XLA_FLAGS set too late?)"


@pytest.fixture
def make_cfg():
    """``make_cfg("model.preset=debug", ...)`` -> a validated Config (debug preset by default)."""
    from jaxllama.config import load_config

    def make(*overrides: str):
        return load_config(None, ["model.preset=debug", "data.source=synthetic", "data.seq_len=32",
                                  "data.global_batch=8", *overrides])

    return make
