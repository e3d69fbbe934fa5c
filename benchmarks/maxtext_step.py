"""MaxText reference train-step throughput for a small Llama shape (CPU).

Standalone: it does NOT import jaxllama. It builds MaxText's own real training
step (MaxText's pyconfig, ``train.initialize``, ``train_utils.setup_train_loop``,
``train_utils.jit_train_and_eval_step`` with ``train.train_step``, exactly the
pieces ``maxtext.trainers.pre_train.train.train_loop`` uses) for a Llama-style
decoder and times it, so jaxllama's own step can be compared against it.

Environment (separate venv; MaxText 0.2.5 needs Python >= 3.12, and a plain
``pip install maxtext`` installs the package WITHOUT any dependencies: the
dependencies live in the ``tpu`` / ``cuda12`` extras; ``[tpu]`` is the
hardware-agnostic Python set plus libtpu, which is harmless on CPU when
JAX_PLATFORMS=cpu; it pulls jax/jaxlib 0.12.0.1 CPU wheels, no CUDA, no torch,
no tensorflow; about 3 minutes)::

    /root/.pyenv/versions/3.12.1/bin/python3.12 -m venv /work/mtvenv
    /work/mtvenv/bin/pip install -U pip
    /work/mtvenv/bin/pip install "maxtext[tpu]==0.2.5"

Run (one JSON line on stdout; MaxText's logging goes to stderr)::

    JAX_PLATFORMS=cpu /work/mtvenv/bin/python benchmarks/maxtext_step.py \
        --seq-len 256 --batch 8 [--steps 10] [--warmup 3] \
        [--remat-policy save_everything] [--per-step] [--dump-hlo /tmp/maxtext_hlo_256x8.txt]

Model: decoder_block=llama2, vocab 2048, emb 256, 4 layers, 8 q heads, 4 kv
heads, head_dim 32, MLP 688 (SwiGLU: mlp_activations=[silu, linear]), untied
embeddings (logits_via_embedding=False), RMSNorm eps 1e-5, rope theta 10000,
dtype=float32 and weight_dtype=float32, attention=dot_product, no dropout.
Optimizer: MaxText adamw, b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1, global
grad-norm clip 1.0; MaxText's default cosine LR schedule (10% warmup) with peak
--learning-rate (3e-4). Data: dataset_type=synthetic, packing=False; two batches
are pulled from MaxText's synthetic loader before timing and alternated (that
loader yields one fixed random-token batch every time, so the loss falls fast
by memorisation; the compute is the same). base.yml's persistent compilation
cache (jax_cache_dir=~/jax_cache) is switched off so compile_s is a real compile.

Remat: MaxText always wraps each decoder layer in jax.checkpoint and has no
"save everything" policy ('full' = save nothing; 'none' also maps to policy None,
i.e. the same as 'full'; the most-saving named one is 'minimal_with_context').
The default here, ``save_everything``, runs MaxText with remat_policy=minimal_with_context
and replaces the policy MaxText's decoder hands to jax.checkpoint by
jax.checkpoint_policies.everything_saveable (a one-method override of
NNXDecoder.get_remat_policy; the model code is MaxText's), so there is no
recomputation in the backward pass. Any MaxText policy name (minimal,
minimal_with_context, full, ...) can be passed instead and is used unpatched.

Timing: compile (lower + compile) is timed separately as compile_s; then
``--warmup`` steps, then ``--steps`` timed steps ending with
jax.block_until_ready on the returned state and metrics;
tokens/s = steps * batch * seq_len / elapsed. ``--per-step`` then runs --steps
more steps, blocking after each, and adds step_s_min / step_s_median / step_s_all.
This 2-core VM's speed drifts by up to ~2x over minutes (a plain f32 matmul
ranged 39-99 GFLOP/s in one session), so compare against another program with
runs taken close together, and repeat them.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("DECOUPLE_GCLOUD", "TRUE")  # MaxText's switch that stubs the optional Google Cloud clients
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="global batch (= per_device_batch_size on one device)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument(
        "--remat-policy",
        default="save_everything",
        help="save_everything (default, no recomputation) or any MaxText remat_policy name",
    )
    p.add_argument(
        "--scan-layers", default="true", choices=["true", "false"], help="MaxText scan_layers (default true)"
    )
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument(
        "--per-step",
        action="store_true",
        help="also time each step separately (block after each) and add step_s_min / step_s_median",
    )
    p.add_argument("--dump-hlo", default="", help="write the compiled (optimized) HLO text of the train step here")
    p.add_argument("--output-dir", default="", help="MaxText base_output_directory (default: a temp dir)")
    return p.parse_args()


def main():
    args = parse_args()
    # Keep stdout for the one JSON line: everything MaxText/XLA prints goes to stderr.
    json_out = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import jax
    from flax import nnx
    from flax.core.spmd import logical_axis_rules

    import maxtext
    from maxtext.configs import pyconfig
    from maxtext.trainers.pre_train import train
    from maxtext.layers import nnx_decoders
    from maxtext.utils import maxtext_utils, sharding, train_utils

    try:
        from importlib.metadata import version as _pkg_version

        maxtext_version = _pkg_version("maxtext")
    except Exception:  # pylint: disable=broad-exception-caught
        maxtext_version = getattr(maxtext, "__version__", "unknown")

    if args.remat_policy == "save_everything":
        mt_remat = "minimal_with_context"
        nnx_decoders.NNXDecoder.get_remat_policy = lambda self: jax.checkpoint_policies.everything_saveable
        remat_desc = "save_everything (jax.checkpoint_policies.everything_saveable via NNXDecoder.get_remat_policy)"
    else:
        mt_remat = args.remat_policy
        remat_desc = args.remat_policy

    out_dir = args.output_dir or tempfile.mkdtemp(prefix="maxtext_step_")
    total_steps = args.warmup + args.steps
    base_yml = os.path.join(os.path.dirname(pyconfig.__file__), "base.yml")
    overrides = {
        "run_name": "maxtext_step_bench",
        "base_output_directory": out_dir,
        "hardware": "cpu",
        "skip_jax_distributed_system": True,
        "enable_checkpointing": False,
        "save_checkpoint_on_completion": False,
        "enable_tensorboard": False,
        "enable_goodput_recording": False,
        "monitor_goodput": False,
        "gcs_metrics": False,
        "log_period": 1_000_000,
        "jax_cache_dir": "",  # base.yml enables a persistent cache in ~/jax_cache; off, so compile_s is a real compile
        # data
        "dataset_type": "synthetic",
        "packing": False,
        "max_target_length": args.seq_len,
        "per_device_batch_size": args.batch,
        "steps": total_steps + 1,
        "eval_interval": -1,
        # model: Llama
        "decoder_block": "llama2",
        "vocab_size": 2048,
        "base_emb_dim": 256,
        "base_num_decoder_layers": 4,
        "base_num_query_heads": 8,
        "base_num_kv_heads": 4,
        "head_dim": 32,
        "base_mlp_dim": 688,
        "mlp_activations": "[silu,linear]",
        "logits_via_embedding": False,
        "normalization_layer_epsilon": 1e-5,
        "rope_max_timescale": 10000,
        "enable_dropout": False,
        "dropout_rate": 0.0,
        "dtype": "float32",
        "weight_dtype": "float32",
        "attention": "dot_product",
        "remat_policy": mt_remat,
        "scan_layers": args.scan_layers == "true",
        "z_loss_multiplier": 0.0,
        # optimizer
        "opt_type": "adamw",
        "adam_b1": 0.9,
        "adam_b2": 0.95,
        "adam_eps": 1e-8,
        "adam_weight_decay": 0.1,
        "gradient_clipping_threshold": 1.0,
        "learning_rate": args.learning_rate,
    }
    argv = ["train.py", base_yml] + [f"{k}={v}" for k, v in overrides.items()]

    # MaxText's own initialisation (prng impl, config parse + validation, shardy flag ...).
    config, recorder = train.initialize(argv)

    # The same pieces train.train_loop uses.
    (
        _init_rng,
        _checkpoint_manager,
        state_mesh_shardings,
        _model,
        mesh,
        _lr_schedule,
        _data_iterator,
        data_loader,
        rampup_manager,
        _eval_data_iterator,
        state,
    ) = train_utils.setup_train_loop(config, recorder)
    _, model_params, _ = nnx.split(state.model, nnx.Param, ...)
    num_params = int(sum(x.size for x in jax.tree.leaves(model_params)))
    jit_model, state = nnx.split(state)
    params_shardings, state_mesh_shardings = sharding.maybe_update_params_sharding_with_opt(
        config, state_mesh_shardings
    )
    p_train_step, _ = train_utils.jit_train_and_eval_step(
        config, jit_model, mesh, state, state_mesh_shardings, train.train_step, train.eval_step, None, params_shardings
    )

    with jax.set_mesh(mesh), logical_axis_rules(config.logical_axis_rules):
        data_sharding = sharding.get_input_data_sharding(config, mesh)
        shaped_batch = maxtext_utils.get_shaped_batch(config, batch_sharding=data_sharding)
        t0 = time.perf_counter()
        compiled = p_train_step.lower(state, shaped_batch).compile()
        compile_s = time.perf_counter() - t0
    if args.dump_hlo:
        with open(args.dump_hlo, "w", encoding="utf-8") as f:
            f.write(compiled.as_text())

    # Two batches from MaxText's synthetic loader, fetched before any timing.
    batches = [data_loader.load_next_batch(rampup_manager=rampup_manager) for _ in range(2)]
    jax.block_until_ready(batches)

    metrics = None
    with jax.set_mesh(mesh), logical_axis_rules(config.logical_axis_rules):
        for i in range(args.warmup):
            state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, metrics = compiled(state, batches[i % 2])
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - t0
        final_loss = float(jax.device_get(metrics["scalar"]["learning/loss"]))
        step_times = []
        if args.per_step:
            for i in range(args.steps):
                t1 = time.perf_counter()
                state, metrics = compiled(state, batches[i % 2])
                jax.block_until_ready((state, metrics))
                step_times.append(time.perf_counter() - t1)

    result = {
        "maxtext_tokens_per_s": args.steps * args.batch * args.seq_len / elapsed,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "maxtext_version": maxtext_version,
        "jax_version": jax.__version__,
        "compile_s": round(compile_s, 3),
        "remat_policy": remat_desc,
        "final_loss": final_loss,
        "steps": args.steps,
        "warmup": args.warmup,
        "elapsed_s": round(elapsed, 4),
        "scan_layers": args.scan_layers == "true",
        "num_params": num_params,
        "devices": [str(d) for d in jax.devices()],
    }
    if step_times:
        ordered = sorted(step_times)
        result["step_s_min"] = round(ordered[0], 4)
        result["step_s_median"] = round(ordered[len(ordered) // 2], 4)
        result["step_s_all"] = [round(t, 3) for t in step_times]
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()


if __name__ == "__main__":
    main()
