"""Chat data pipeline: tokens/s with exact loss masks, packing efficiency, and the peer in the same run.

Synthetic multi-turn conversations (system prompt, 1-4 user/assistant turns of stdlib docstring text,
so lengths vary) go through the real pipeline (`make_source`, data.format=chat: render, tokenize with
offsets, mask, pack, prefetch thread) for three tokenizer/format pairs: SentencePiece + Llama 2 format,
Llama 3 tiktoken + Llama 3 format, and a Hugging Face tokenizer.json with a Jinja template carrying
``{% generation %}`` tags. The peer: transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)``
on the same conversations and template, in a Python loop (rendering, tokenizing and masking only, no
packing): what a Hugging Face SFT pipeline does per conversation. One JSON line per case.

    python benchmarks/chat_data_throughput.py [--conversations 3000] [--seq-len 2048] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

GEN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>"
                "{% endgeneration %}{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}")


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    import ast

    from jaxllama.data.corpus import stdlib_files

    texts = []
    for f in stdlib_files()[:400]:
        try:
            tree = ast.parse(Path(f).read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        texts += [d for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                  and (d := ast.get_docstring(node)) and len(d) > 40]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": "You are a helpful assistant for Python programmers."}]
        for _ in range(rng.randint(1, 4)):
            conv += [{"role": "user", "content": rng.choice(texts)[:300]},
                     {"role": "assistant", "content": rng.choice(texts)[:800]}]
        out.append(conv)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=3000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=30)
    args = ap.parse_args()

    from tokenize_throughput import hf_folder, llama3_style_tiktoken, stdlib_docs

    from jaxllama.config import load_config
    from jaxllama.data.sources import make_source
    from jaxllama.data.tokenizers import cached_stdlib_tokenizer

    convs = conversations(args.conversations)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "chat.jsonl"
        data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
        tiktoken = llama3_style_tiktoken(stdlib_docs(600), 8000, folder)
        os.makedirs(os.path.join(folder, "hf"))
        hf = hf_folder(tiktoken, os.path.join(folder, "hf"))
        config = json.loads((Path(hf) / "tokenizer_config.json").read_text()) if (Path(hf) / "tokenizer_config.json").is_file() else {}
        (Path(hf) / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": GEN_TEMPLATE,
                                                                    "bos_token": "<|begin_of_text|>"}))
        cases = [("sentencepiece", cached_stdlib_tokenizer(8192), "llama2"), ("tiktoken", tiktoken, "llama3"),
                 ("hf", hf, "jinja")]
        for kind, path, template in cases:
            cfg = load_config(None, [f"data.source={data}", "data.format=chat", f"data.tokenizer={path}",
                                     f"data.chat_template={template}", f"data.seq_len={args.seq_len}",
                                     f"data.global_batch={args.batch}", "model.vocab_size=16384",
                                     "model.max_position=8192"])
            src = make_source(cfg)
            try:
                first = next(src)
                trained = slots = 0
                start = time.perf_counter()
                for _ in range(args.batches):
                    b = next(src)
                    trained += float(b["loss_mask"].sum())
                    slots += b["loss_mask"].size
                rate = args.batches * args.batch * args.seq_len / (time.perf_counter() - start)
                eff, truncated = src.efficiency, src.encoder.truncated
            finally:
                src.close()
            row = {"tokenizer": kind, "format": template, "tokens_per_s": round(rate), "packing_efficiency": round(eff, 4),
                   "trained_fraction_of_slots": round(trained / slots, 4), "truncated": truncated,
                   "seq_len": args.seq_len, "batch": args.batch, "cpus": os.cpu_count()}
            del first
            if kind == "hf":
                from transformers import AutoTokenizer

                ref = AutoTokenizer.from_pretrained(hf)
                n_tok, start = 0, time.perf_counter()
                for c in convs[:600]:
                    out = ref.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                    n_tok += len(out["input_ids"])
                peer = n_tok / (time.perf_counter() - start)
                row.update(transformers_masked_tokens_per_s=round(peer), real_tokens_per_s=round(rate * eff),
                           vs_transformers=round(rate * eff / peer, 2))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
