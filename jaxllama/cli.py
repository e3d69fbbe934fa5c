"""``jaxllama <verb>``: parses arguments, calls library functions, maps errors to exit codes.

Exit 0 on success, 2 on bad usage or configuration, 1 on a runtime failure. Errors print as one
line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxllama import interrupts
from jaxllama.errors import ConfigError, JaxllamaError

EPILOG = "overrides: dotted key=value pairs, e.g. model.preset=llama3-8b mesh.fsdp=-1 train.steps=100 optim.lr=3e-4"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own convention for usage errors)
        # the top-level parser's prog is "jaxllama", which the error line already starts with
        raise ConfigError(message if self.prog == "jaxllama" else f"{self.prog}: {message}")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: the built-in demo config)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxllama", description="Train, inspect and run Llama models with JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    # One line per verb; each _add_<verb> builds its sub-parser and sets func=cmd_<verb>.
    _add_train(sub)
    _add_info(sub)
    _add_compile_check(sub)
    _add_convert(sub)
    _add_tokenizer(sub)
    _add_data(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_serve(sub)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: the CPU demo)", epilog=EPILOG,
                       description="Train a Llama model. With no arguments, trains the tiny demo model on CPU. "
                                   "An existing run_dir resumes from its latest complete checkpoint.")
    _add_config_args(p)
    p.add_argument("--no-resume", action="store_true",
                   help="refuse to continue a run_dir that already has checkpoints (error instead of resuming)")
    p.set_defaults(func=cmd_train)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameter count, per-device memory and FLOPs/token", epilog=EPILOG,
                       description="Describe a model on the configured mesh without materializing it. "
                                   "With --devices/--device-memory: the per-device memory plan for a "
                                   "topology that need not be present.")
    _add_config_args(p)
    p.add_argument("--devices", type=int, help="plan for this many devices (default: the devices present)")
    p.add_argument("--device-memory", help="memory of one device, e.g. 80GB, 95GiB: says whether the run fits")
    p.set_defaults(func=cmd_info)


def _add_compile_check(sub) -> None:
    p = sub.add_parser("compile-check", help="compile the real train step for a TPU slice or N simulated devices",
                       epilog=EPILOG,
                       description="Lower and compile the train step (and with --generate the prefill and decode "
                                   "steps) for the configured mesh with abstract (unallocated) inputs, and print "
                                   "the compiler's per-chip memory analysis; for a TPU slice also whether it fits "
                                   "in HBM, its FLOPs and bytes and the roofline bound.")
    _add_config_args(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--target", help="a TPU slice, e.g. v5p-64, v5e-256, v6e-8, v4-32: compile with the real TPU "
                                        "compiler (needs pip install -e '.[tpu]')")
    where.add_argument("--devices", type=int, help="number of CPU devices to simulate (the mesh's product)")
    p.add_argument("--slices", type=int, default=1, help="with --target: this many slices over DCN (multi-slice)")
    p.add_argument("--generate", action="store_true", help="also compile generate's prefill and decode steps")
    p.add_argument("--batch", type=int, default=0, help="with --generate: rows (default: one per batch shard)")
    p.add_argument("--prompt-len", type=int, default=1024, help="with --generate: prompt tokens (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="with --generate: new tokens (default 256)")
    p.set_defaults(func=cmd_compile_check)


def cmd_compile_check(args) -> int:
    import jax

    from jaxllama.compile_check import GenerateShape, compile_check, format_report

    # This process only validates and starts the compiling one: it must not claim an accelerator (or
    # libtpu's lock) that process needs, so it stays on the CPU.
    jax.config.update("jax_platforms", "cpu")
    generate = None
    if args.generate:
        for flag, value, low in (("--batch", args.batch, 0), ("--prompt-len", args.prompt_len, 1),
                                 ("--max-new-tokens", args.max_new_tokens, 1)):
            if value < low:
                raise ConfigError(f"{flag}: must be >= {low}, got {value}")
        generate = GenerateShape(args.batch, args.prompt_len, args.max_new_tokens)
    print(format_report(compile_check(args.config, args.overrides, args.devices, args.target, args.slices, generate)))
    return 0


def _load(args):
    from jaxllama.train.init_from import load_train_config

    return load_train_config(args.config, args.overrides)  # fine-tuning: shapes/tokenizer from train.init_from


def cmd_train(args) -> int:
    from jaxllama.parallel.distributed import exit_if_peer_failed, initialize_from_env
    from jaxllama.train.loop import train

    cfg = _load(args)
    initialize_from_env()  # no-op unless JAX_COORDINATOR_ADDRESS etc. (or SLURM/TPU) describe several processes
    try:
        train(cfg, resume=not args.no_resume)
    except Exception as e:
        exit_if_peer_failed(e)  # multi-process only: a dead peer -> one line, exit 1 now
        raise
    return 0


def cmd_info(args) -> int:
    from jaxllama.config import parse_size
    from jaxllama.plan import format_info, format_plan, plan

    cfg = _load(args)
    memory = parse_size(args.device_memory, "--device-memory") if args.device_memory is not None else None
    p = plan(cfg, args.devices, memory)
    print(format_info(p))
    if args.devices is not None or memory is not None:
        print(format_plan(p))
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints: Hugging Face, Meta, GGUF, jaxllama",
                       description="Convert SRC (format detected: a Hugging Face folder, a Meta folder, a .gguf "
                                   "file, a jaxllama params/checkpoint/run dir) to --to's format at DST. Tensors "
                                   "stream one at a time; DST appears only when complete.")
    p.add_argument("src", help="source checkpoint (file or folder)")
    p.add_argument("dst", help="destination (must not exist)")
    p.add_argument("--to", required=True, choices=("jaxllama", "hf", "meta", "gguf", "peft"),
                   help="output format (peft: a LoRA run's adapter as a PEFT folder)")
    p.add_argument("--merge-lora", action="store_true",
                   help="SRC is a LoRA adapter (run or PEFT folder): write its base with the adapter folded in")
    p.add_argument("--base", help="--merge-lora: the base model (default: the one the adapter records)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast weights (default: as stored)")
    p.add_argument("--gguf-type", metavar="TYPE",  # checked by convert() against api.GGUF_TYPES (imports jax)
                   help="GGUF tensor type: f32 f16 bf16 q8_0 q6_k q5_1 q5_0 q4_k_m q4_k q4_1 q4_0 (default: from "
                        "--dtype or the source; norms stay f32; quantized types choose per tensor as llama.cpp does)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"),
                   help="--to jaxllama: store weight-only quantized projections, embedding and LM head")
    p.add_argument("--group-size", type=int, help="with --quantize: inputs per scale (default int8 0 = per "
                                                  "output channel, int4 128)")
    p.add_argument("--shard-size", default="5GB", help="Hugging Face: max bytes per safetensors file (default 5GB)")
    p.add_argument("--shards", type=int, default=1, help="Meta: number of model-parallel shards (default 1)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from jaxllama.config import parse_size
    from jaxllama.convert import convert

    out = convert(args.src, args.dst, args.to, dtype=args.dtype, gguf_type=args.gguf_type,
                  shard_size=parse_size(args.shard_size, "--shard-size"), meta_shards=args.shards,
                  merge_lora=args.merge_lora, base=args.base, quantize=args.quantize, group_size=args.group_size)
    print(f"wrote {out} ({args.to}{'' if args.quantize in (None, 'none') else ', ' + args.quantize})")
    return 0


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a tokenizer",
                       description="Tokenizer tools: train a SentencePiece BPE model, or describe a tokenizer.")
    tsub = p.add_subparsers(dest="tokenizer_verb", required=True, parser_class=_Parser)
    t = tsub.add_parser("train", help="train a SentencePiece BPE tokenizer (byte fallback) on text",
                        description="Train a Llama-style SentencePiece BPE model (byte fallback, digits split, "
                                    "whitespace kept; <unk>=0 <s>=1 </s>=2 <pad>=3) and write it atomically.")
    t.add_argument("--input", required=True, help="a file glob ('**' allowed) or 'stdlib' (the demo corpus)")
    t.add_argument("--vocab-size", type=int, required=True, help="number of pieces, e.g. 32000")
    t.add_argument("--output", required=True, help="the model file to write, e.g. tokenizer.model")
    t.add_argument("--format", default="auto", choices=("auto", "text", "lines", "jsonl"),
                   help="auto (.jsonl/.json -> jsonl, else text: one document per file), text, lines, jsonl")
    t.add_argument("--text-key", default="text", help="JSONL field holding the text (default: text)")
    t.add_argument("--max-sentences", type=int, default=1_000_000,
                   help="lines sampled for training (seeded reservoir sample; default 1000000)")
    t.add_argument("--debug", action="store_true", help="show tracebacks")
    t.set_defaults(func=cmd_tokenizer_train)
    i = tsub.add_parser("info", help="kind, vocabulary and special ids of a tokenizer; optionally encode text",
                        description="Load a tokenizer (SentencePiece, Llama 3 tiktoken, HF tokenizer.json or "
                                    "folder) and describe it.")
    i.add_argument("path", help="tokenizer file or folder")
    i.add_argument("--text", help="also print the ids and pieces of this text")
    i.add_argument("--debug", action="store_true", help="show tracebacks")
    i.set_defaults(func=cmd_tokenizer_info)


def cmd_tokenizer_train(args) -> int:
    from jaxllama.data.tokenizer_train import train_from_source

    r = train_from_source(args.input, args.vocab_size, args.output, args.format, args.text_key, args.max_sentences)
    print(f"wrote {r.output}: SentencePiece BPE, {r.vocab_size} pieces, from {r.sampled:,} of {r.lines:,} lines "
          f"in {r.documents:,} documents, {r.seconds:.1f} s")
    return 0


def cmd_tokenizer_info(args) -> int:
    from jaxllama.data.tokenizers import describe_tokenizer

    if args.path.endswith(".gguf"):  # the vocabulary inside a llama.cpp model, rebuilt as generate reads it
        from jaxllama.convert.api import open_source

        src = open_source(args.path)  # metadata and vocabulary only; no tensor is read
        try:
            if src.extras.tokenizer_dir is None:
                raise ConfigError(f"{args.path}: the GGUF file carries no tokenizer")
            print(f"{args.path}: the tokenizer inside the GGUF file, rebuilt as generate reads it:")
            print(describe_tokenizer(str(src.extras.tokenizer_dir), args.text))
        finally:
            src.close()
        return 0
    print(describe_tokenizer(args.path, args.text))
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="inspect training data as the pipeline sees it",
                       description="Data tools.")
    dsub = p.add_subparsers(dest="data_verb", required=True, parser_class=_Parser)
    i = dsub.add_parser("inspect", help="show records' tokens with the loss mask (what is trained)", epilog=EPILOG,
                        description="Render and tokenize records of data.source exactly as training does (chat "
                                    "template, data.loss_on, data.truncate) and show the trained tokens: "
                                    "[[marked]] (green on a terminal), or a token table with --tokens.")
    _add_config_args(i)
    i.add_argument("--count", type=int, default=1, help="records to show (default 1)")
    i.add_argument("--skip", type=int, default=0, help="records to skip first (default 0)")
    i.add_argument("--tokens", action="store_true", help="one line per token: position, id, T/., piece")
    i.set_defaults(func=cmd_data_inspect)


def cmd_data_inspect(args) -> int:
    from jaxllama.data.chat_data import inspect_records

    print(inspect_records(_load(args), args.count, args.skip, args.tokens, color=sys.stdout.isatty()))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a jaxllama checkpoint or run dir, a Hugging Face or Meta folder, or a .gguf file")
    p.add_argument("--tokenizer", help="tokenizer file or folder (default: the one beside the model)")
    p.add_argument("--lora", help="a LoRA adapter (a jaxllama LoRA run or a PEFT folder) over MODEL (generate runs it unmerged; eval folds it in)")
    p.add_argument("--mesh", help="inference mesh, e.g. data=1,tensor=4 (default: widest tensor split that fits)")
    p.add_argument("--rules", help="logical-axis rules as in mesh.rules: a YAML list, or a config file (e.g. a "
                                   "run's config.yaml) whose mesh.rules is used (default: the built-in rules)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="weights and compute (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"),
                   help="weight-only quantization of the projections, embedding and LM head (default: as stored)")
    p.add_argument("--group-size", type=int,
                   help="inputs per quantization scale (default: int8 one per output channel = 0, int4 128)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"),  # quant.KV_DTYPES (no jax import here)
                   help="KV cache: auto (the compute dtype) or int8 (a float32 scale per token and head: "
                        "about a quarter of float32's memory)")


def _rules(args) -> list | None:
    from jaxllama.config import parse_rules

    return parse_rules(args.rules) if args.rules else None


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts (batched, KV cache, sharded)",
                       description="Generate continuations of prompts with a sharded KV-cache engine. Text streams "
                                   "to stdout as it is produced; --json prints one JSON object per completion.")
    _add_model_args(p)
    _add_kv_cache_arg(p)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="a file of prompts, one per line (run as one batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--chat-template", default="auto", choices=("auto", "jinja", "llama3", "llama2"),
                   help="auto: the checkpoint's Jinja template, else Llama 3 or Llama 2 by tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per completion (default 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (default 0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="JSON lines: text, token ids, log-probabilities")
    p.add_argument("--chunk", type=int, default=16, help="decode steps per jitted call between stream updates")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import jax

    from jaxllama.infer.generate import generate, load, read_prompts
    from jaxllama.infer.sampling import Sampling
    from jaxllama.parallel.distributed import initialize_from_env

    prompts = read_prompts(args.prompt, args.prompt_file)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.n < 1:
        raise ConfigError(f"--n: must be >= 1, got {args.n}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    initialize_from_env()  # several processes (launchers, SLURM, TPU pods) share one mesh; process 0 prints
    loaded = load(args.model, args.tokenizer, args.mesh, args.dtype, rules=_rules(args), lora=args.lora,
                  quantize=args.quantize, group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype)
    quiet = (lambda _: None) if jax.process_index() else None
    say = None if jax.process_index() else (lambda line: print(line, file=sys.stderr, flush=True))
    generate(loaded, prompts, args.max_new_tokens, sampling, n=args.n, stop=args.stop, chat=args.chat,
             system=args.system, template=args.chat_template, json_lines=args.json, chunk=args.chunk, out=quiet,
             say=say)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="mean NLL and perplexity of a model over a data source",
                       description="Evaluate MODEL on --data (any data.source: stdlib, synthetic, tfds:NAME, a "
                                   "file glob) through the input pipeline; prints one JSON line.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="the eval data, as data.source (e.g. 'data/*.jsonl', tfds:NAME)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default 512, or the model's context if shorter)")
    p.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (default 0: all)")
    p.add_argument("overrides", nargs="*", metavar="data.key=value", help="input pipeline overrides")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import json

    import jax

    from jaxllama.infer.evaluate import evaluate
    from jaxllama.parallel.distributed import initialize_from_env

    initialize_from_env()
    main_process = jax.process_index() == 0
    result = evaluate(args.model, args.data, args.tokenizer, args.mesh, args.dtype, args.seq_len, args.batch,
                      args.max_batches, args.overrides,
                      say=(lambda line: print(line, file=sys.stderr)) if main_process else (lambda _: None),
                      rules=_rules(args), lora=args.lora, quantize=args.quantize, group_size=args.group_size)
    if main_process:
        print(json.dumps(result))
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve MODEL over the OpenAI API (continuous batching, sharded KV cache)",
                       description="An OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (with "
                                   "stream), /v1/models, /health, /metrics. Requests share a fixed set of decode slots; "
                                   "a new request is prefilled in chunks and joins the running batch.")
    _add_model_args(p)
    _add_kv_cache_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--slots", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-len", type=int, help="positions per slot: prompt + output (default: the model's context)")
    p.add_argument("--chunk", type=int, default=128, help="prompt tokens prefilled per step (default 128)")
    p.add_argument("--max-queue", type=int, default=256, help="sequences waiting for a slot before 429 (default 256)")
    p.add_argument("--served-model-name", action="append", default=[],
                   help="name(s) clients use in 'model' (repeatable; default: MODEL as given)")
    p.add_argument("--chat-template", default="auto", choices=("auto", "jinja", "llama3", "llama2"),
                   help="auto: the checkpoint's Jinja template, else Llama 3 or Llama 2 by tokenizer")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from jaxllama.parallel.distributed import initialize_from_env
    from jaxllama.serve.server import ServeOptions, serve

    initialize_from_env()  # several processes: process 0 serves HTTP, every process steps the engine
    return serve(ServeOptions(model=args.model, tokenizer=args.tokenizer, mesh=args.mesh, dtype=args.dtype,
                              lora=args.lora, rules=_rules(args), host=args.host, port=args.port, slots=args.slots,
                              max_len=args.max_len, chunk=args.chunk, max_queue=args.max_queue,
                              names=tuple(args.served_model_name), chat_template=args.chat_template,
                              quantize=args.quantize, group_size=args.group_size,
                              kv_cache_dtype=args.kv_cache_dtype))


def _skip_absent_tpu() -> None:
    """With the TPU compiler installed (the ``tpu`` extra, for compile-check) on a machine with no TPU
    and no GPU plugin, JAX would start libtpu anyway: it prints a page of warnings, probes the network
    for TPU metadata and takes a lock only one process may hold. Use the CPU there, unless
    ``JAX_PLATFORMS`` says otherwise. TPU VMs expose their chips as /dev/accel* or /dev/vfio/N."""
    import glob
    import importlib.util

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    interrupts.install()  # Ctrl-C once: a clean stop (a save in flight finishes); twice: exit at once
    debug = "--debug" in argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _skip_absent_tpu()
    try:
        parser = build_parser()
        if not [a for a in argv if a != "--debug"]:  # bare `jaxllama`: what it can do, not an error line
            parser.print_help(sys.stderr)
            return 2
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may come after options (argparse stops filling a positional list at the
        # first option): they join the overrides; anything else is still refused.
        strays = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if strays:
            parser.error(f"unrecognized arguments: {' '.join(strays)}")
        if extra:
            args.overrides = [*(args.overrides or []), *extra]
        return args.func(args)
    except JaxllamaError as e:
        if debug:
            raise
        print(f"jaxllama: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("jaxllama: interrupted", file=sys.stderr)
        return interrupts.INTERRUPTED


def entry() -> None:
    """The console script: :func:`main`, then exit. After Ctrl-C the process ends at once (stdio
    flushed) instead of running the interpreter's shutdown, which could crash (SIGSEGV) finalizing
    JAX's and the input pipeline's native threads mid-work. Checkpoints are unaffected: a save cut
    short stays a temporary folder that resume skips.

    Before anything starts a thread, host ``malloc`` is told to keep freed memory on CPU-only hosts
    (:mod:`jaxllama.host_malloc`: XLA:CPU's per-step temporaries are otherwise page-faulted in anew
    every step). Here and not in :func:`main`, which tests call inside their own process."""
    from jaxllama.host_malloc import keep_freed_memory

    try:
        keep_freed_memory()
    except ConfigError as e:
        print(f"jaxllama: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    code = main()
    if code != 0:  # failed or interrupted: skip interpreter shutdown, where half-stopped native and
        # checkpoint threads print tracebacks of their own after our one line
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
