"""``jaxllama eval``: mean next-token NLL and perplexity of a checkpoint over a data source, sharded.

The data go through the training input pipeline (``make_source(cfg, split="eval")``, with
``--data`` as ``data.eval_source``), so tokenization, packing and loss masks are exactly what
training sees; the step and the loop are the training loop's own eval (``jaxllama.train.evaluate``:
the training loss function, summed over ``loss_mask``), as the program built for the inference mesh
(``--mesh``, ``--rules``) jits it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from jaxllama.config import config_from_dict
from jaxllama.errors import ConfigError
from jaxllama.infer.placement import (inference_arch, inference_program, parse_mesh, place_params,
                                      quantize_for_inference, stored_quantization)
from jaxllama.model.llama import Arch
from jaxllama.train.evaluate import evaluate as run_eval


def eval_config(model_cfg, data: str, tokenizer: str | None, seq_len: int, batch: int, overrides: Sequence[str]):
    """A validated Config for the pipeline: the checkpoint's model, ``data`` as the eval source."""
    tree: dict = {"model": dataclasses.asdict(model_cfg),
                  "data": {"source": data, "eval_source": data, "seq_len": seq_len, "global_batch": batch,
                           "tokenizer": tokenizer, "shuffle": False}}
    for item in overrides:
        if not item.startswith("data.") or "=" not in item:
            raise ConfigError(f"override {item!r}: eval takes data.<key>=value overrides only")
    return config_from_dict(tree, overrides)


def evaluate(model: str, data: str, tokenizer: str | None = None, mesh: str | None = None, dtype: str | None = None,
             seq_len: int | None = None, batch: int = 8, max_batches: int = 0, overrides: Sequence[str] = (),
             devices: list | None = None, say: Callable[[str], None] = lambda _: None,
             rules: list | None = None, lora: str | None = None, quantize: str | None = None,
             group_size: int | None = None) -> dict:
    """Sum NLL and token counts over the eval pass (or ``max_batches``); returns the summary dict.

    ``seq_len`` defaults to 512 tokens per row, or the model's context when shorter. ``lora``: an
    adapter folded into MODEL's weights first. ``quantize``/``group_size``: as ``generate``'s (the
    perplexity of the quantized model).
    """
    from jaxllama.convert import load_model
    from jaxllama.data.sources import make_source

    if max_batches < 0:
        raise ConfigError(f"--max-batches: must be >= 0 (0 = the whole eval pass), got {max_batches}")
    loaded = load_model(model, lora=lora, keep_quantized=True)
    seq_len = seq_len or min(512, loaded.model_cfg.max_position)
    cfg = eval_config(loaded.model_cfg, data, tokenizer or loaded.tokenizer_path, seq_len, batch, overrides)
    arch = inference_arch(Arch.from_config(cfg.model), dtype)
    arch, quantize = stored_quantization(arch, loaded.params, model, quantize, group_size)
    program = inference_program(arch, parse_mesh(mesh), devices, rules, data=cfg.data)
    params = place_params(loaded.params, arch, program.layout, program.params_shardings)
    if quantize not in (None, "none"):
        params, arch = quantize_for_inference(params, arch, program.layout, quantize, group_size)
        program = inference_program(arch, parse_mesh(mesh), devices, rules, data=cfg.data)
    source = make_source(cfg, split="eval")
    start = time.perf_counter()
    try:
        r = run_eval(program.eval_step, params, source, program.batch.to_global, source.empty_batch,
                     max_batches or None)
    finally:
        source.close()
    count = r["eval_tokens"]
    if count == 0:
        raise ConfigError(f"--data {data}: no evaluation tokens (empty source or every position masked)")
    say(f"{r['eval_batches']} batches, {count:,} tokens")
    return dict(model=model, data=data, batches=r["eval_batches"], tokens=count, mean_nll=r["eval_loss"],
                perplexity=r["eval_ppl"], seconds=time.perf_counter() - start,
                mesh=program.plan.shape, dtype=arch.dtype, quantize=arch.quantize,
                **({"group_size": arch.quant_group} if arch.quantize != "none" else {}))
