"""``jaxllama generate``: load a checkpoint and tokenizer, encode prompts, run the engine, stream text.

Output: plain text streams to ``out`` as tokens arrive (rows one after another, each under a
``--- prompt i, sample j`` header when there are several); ``json_lines=True`` writes one JSON object
per row instead (text, token ids, their log-probabilities, finish reason). Stop strings end a row at
their first occurrence; the text (and token ids) are cut before them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from jaxllama.errors import ConfigError
from jaxllama.data.chat_format import auto_format, chat_prompt, messages_for
from jaxllama.infer.engine import Completion, Engine
from jaxllama.infer.placement import (inference_arch, inference_program, parse_mesh, place_params,
                                      quantize_for_inference, stored_quantization)
from jaxllama.infer.sampling import Sampling
from jaxllama.model.llama import Arch, model_params

HOLD = "\ufffd"  # an incomplete UTF-8 sequence at the end of a partial decode: wait for more tokens


@dataclass
class Loaded:
    engine: Engine
    tokenizer: Any
    chat_template: str | None


def load(model: str, tokenizer: str | None = None, mesh: str | None = None, dtype: str | None = None,
         devices: list | None = None, rules: list | None = None, lora: str | None = None,
         quantize: str | None = None, group_size: int | None = None, kv_cache_dtype: str = "auto") -> Loaded:
    """Read MODEL (jaxllama/HF/Meta/GGUF), place it sharded on the inference mesh (``--mesh``, laid out
    by ``rules``: default the training defaults), open its tokenizer.

    ``lora`` (a LoRA run or PEFT folder), or MODEL itself being a LoRA run: the adapter runs beside the
    base weights, unmerged (the model computes ``x W + alpha / rank * x A B``), with the run's tokenizer.

    ``quantize`` int8/int4 (``group_size`` inputs per scale): weight-only quantization in the shards
    after placement (:func:`jaxllama.infer.placement.quantize_for_inference`); a model stored
    quantized runs as stored. ``kv_cache_dtype`` int8: the KV cache holds int8 values with a scale per
    token and head (:func:`jaxllama.model.quant.quantize_kv`)."""
    from jaxllama.convert import adapters, load_model
    from jaxllama.data.tokenizers import load_tokenizer
    from jaxllama.model.lora import merge
    from jaxllama.model.quant import check_kv_dtype

    check_kv_dtype(kv_cache_dtype)

    adapter = adapters.read_adapter(lora or model) if lora or adapters.is_adapter(model) else None
    if lora or adapter is None:
        loaded = load_model(model, keep_quantized=adapter is None)  # an adapter merges into float weights
    else:
        loaded = adapters.load_base(adapter)
    lora_cfg = None
    if adapter is not None:
        adapter.check_fits(loaded.model_cfg, model)
        lora_cfg = adapter.lora_config()
        loaded.params = merge(loaded.params, adapter.tree())
        if adapter.tokenizer_dir is not None:
            loaded.tokenizer_path = str(adapter.tokenizer_dir)
    arch = inference_arch(Arch.from_config(loaded.model_cfg, lora_cfg), dtype, scan_layers=False)
    arch = dataclasses.replace(arch, kv_cache_dtype=kv_cache_dtype)
    arch, quantize = stored_quantization(arch, loaded.params, model, quantize, group_size)
    tok_path = tokenizer or loaded.tokenizer_path
    if tok_path is None:
        raise ConfigError(f"{model}: no tokenizer found beside the model; pass --tokenizer PATH")
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > arch.vocab_size:
        raise ConfigError(f"--tokenizer {tok_path}: {tok.vocab_size} tokens, but the model's vocabulary has "
                          f"{arch.vocab_size}")
    program = inference_program(arch, parse_mesh(mesh), devices, rules)
    layout = program.layout
    params = place_params(model_params(loaded.params, arch), arch, layout,  # numpy views, no copy
                          program.model_params(program.params_shardings))
    params, arch = quantize_for_inference(params, arch, layout, quantize or "none", group_size)
    return Loaded(Engine(params, arch, layout, tok.vocab_size), tok, loaded.chat_template or tok.chat_template)


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    """``--prompt`` and/or ``--prompt-file`` (one prompt per line; blank lines skipped)."""
    prompts = [] if prompt is None else [prompt]
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file {prompt_file}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompt-file {prompt_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        prompts += [line for line in lines if line.strip()]
        if not any(line.strip() for line in lines):
            raise ConfigError(f"--prompt-file {prompt_file}: no prompts (every line is blank)")
    if not prompts:
        raise ConfigError("give a prompt: --prompt TEXT or --prompt-file FILE")
    return prompts


def encode_prompts(texts: Sequence[str], tok: Any, chat: bool = False, system: str | None = None,
                   template: str = "auto", jinja: str | None = None) -> list[list[int]]:
    if not chat:
        return [tok.encode(t) for t in texts]
    return [tok.encode(chat_prompt(messages_for(t, system), tok, template, jinja), bos=False, special=True)
            for t in texts]


class TextStops:
    """Decoded text per row, cut at the first stop string; knows how much is safe to print."""

    def __init__(self, tok: Any, stops: Sequence[str]):
        self.tok, self.stops = tok, [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def cut(self, tokens: list[int]) -> tuple[str, int | None]:
        """(text, None) or (text before the first stop string, tokens needed to produce it)."""
        text = self.tok.decode(tokens)
        hits = [text.find(s) for s in self.stops if s in text]
        if not hits:
            return text, None
        at = min(hits)
        keep = next(k for k in range(len(tokens) + 1) if any(s in self.tok.decode(tokens[:k]) for s in self.stops))
        return text[:at], keep - 1

    def hit(self, row: int, tokens: list[int]) -> bool:
        return bool(self.stops) and self.cut(tokens)[1] is not None

    def printable(self, tokens: list[int], final: bool) -> str:
        text, n = self.cut(tokens)
        if final or n is not None:
            return text
        if self.hold:
            text = text[: max(0, len(text) - self.hold)]
        return text.rstrip(HOLD) if text.endswith(HOLD) else text


def generate(loaded: Loaded, prompts: Sequence[str], max_new_tokens: int = 256, sampling: Sampling = Sampling(),
             n: int = 1, stop: Sequence[str] = (), chat: bool = False, system: str | None = None,
             template: str = "auto", json_lines: bool = False, chunk: int = 16,
             out: Callable[[str], None] | None = None, say: Callable[[str], None] | None = None) -> list[dict]:
    """Generate for every prompt ``n`` times; stream to ``out`` (default stdout); return one dict per row.
    ``say`` (the CLI: stderr) hears what is not the output: the chat format ``auto`` fell back to, and
    the throughput at the end."""
    if n < 1:
        raise ConfigError(f"--n: must be >= 1, got {n}")
    out = out or _stdout
    say = say or (lambda _: None)
    tok = loaded.tokenizer
    if chat and template == "auto" and auto_format(tok, loaded.chat_template) == "llama2":
        say("note: the model has no chat template and its tokenizer no Llama 3 header tokens: --chat uses the "
            "Llama 2 [INST] format (--chat-template chooses)")
    ids = encode_prompts(prompts, tok, chat, system, template, loaded.chat_template)
    rows = [p for p in ids for _ in range(n)]
    row_ids = list(range(len(rows)))  # prompt i, sample j -> row i*n + j: its draws are its own
    stops = TextStops(tok, stop)
    stop_ids = set(tok.stop_ids) | ({tok.eos_id} if tok.eos_id is not None else set())
    printer = _Printer(out, stops, len(rows) > 1, n) if not json_lines else None
    final: list[Completion] = []
    start = time.perf_counter()
    for final in loaded.engine.stream(rows, max_new_tokens, sampling, sorted(stop_ids), row_ids, chunk,
                                      stops.hit if stops.stops else None):
        if printer is not None:
            printer.update(final)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(c.tokens) for c in final)
    say(f"generated {new_tokens} tokens in {len(final)} row(s) in {seconds:.2f}s: {new_tokens / max(seconds, 1e-9):,.1f} "
        "tokens/s (prefill and compile included)")
    records = []
    for i, c in enumerate(final):
        text, keep = stops.cut(c.tokens)
        k = len(c.tokens) if keep is None else keep
        records.append(dict(prompt_index=i // n, sample=i % n, prompt=prompts[i // n], prompt_tokens=len(rows[i]),
                            text=text, tokens=c.tokens[:k], logprobs=[round(x, 6) for x in c.logprobs[:k]],
                            finish_reason="stop" if keep is not None else c.finish_reason))
        if json_lines:
            out(json.dumps(records[-1], ensure_ascii=False) + "\n")
    return records


class _Printer:
    """Streams rows in order: the current row live; later rows catch up when it finishes."""

    def __init__(self, out: Callable[[str], None], stops: TextStops, headers: bool, n: int):
        self.out, self.stops, self.headers, self.n = out, stops, headers, n
        self.row, self.shown, self.headed = 0, 0, False

    def update(self, results: list[Completion]) -> None:
        while self.row < len(results):
            if not self.headed and self.headers:
                self.headed = True
                self.out(f"{'' if self.row == 0 else chr(10)}--- prompt {self.row // self.n + 1}, "
                         f"sample {self.row % self.n + 1}\n")
            text = self.stops.printable(results[self.row].tokens, results[self.row].done)
            if len(text) > self.shown:
                self.out(text[self.shown:])
                self.shown = len(text)
            if not results[self.row].done:
                return
            self.out("\n")
            self.row, self.shown, self.headed = self.row + 1, 0, False


def _stdout(text: str) -> None:
    import sys

    sys.stdout.write(text)
    sys.stdout.flush()
