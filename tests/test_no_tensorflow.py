"""TensorFlow stays inside jaxllama/data/: the model, training on synthetic data, checkpoints, conversion
and inference run without importing it (the GPU machines have no TensorFlow at all)."""

import os
import subprocess
import sys

CODE = r"""
import sys, tempfile
import jaxllama, jaxllama.cli, jaxllama.model.llama, jaxllama.program.step, jaxllama.train.loop
import jaxllama.checkpoint, jaxllama.convert.api, jaxllama.infer.engine, jaxllama.infer.generate, jaxllama.plan
from jaxllama.config import load_config
from jaxllama.train.loop import train
from jaxllama.checkpoint import load_params
from jaxllama.convert.api import convert

run = tempfile.mkdtemp()
cfg = load_config(None, ["model.preset=debug", "data.source=synthetic", "data.seq_len=32", "data.global_batch=8",
                         "train.steps=2", "train.tensorboard=false", "train.progress=false", f"run_dir={run}"])
train(cfg, out=lambda _: None)
params, model_cfg = load_params(run)
convert(run, run + "/hf", "hf")
assert "tensorflow" not in sys.modules, "tensorflow was imported"
print("ok")
"""


def test_model_training_checkpoints_and_conversion_do_not_import_tensorflow():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
