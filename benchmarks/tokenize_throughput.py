"""Tokens/s of the ways to tokenize inside tf.data, per tokenizer kind, against plain encode_batch.

Why: the issue asks that SentencePiece run inside tf.data without Python's GIL being the bottleneck, and
that we keep the faster of tensorflow-text's SentencePiece op and a batched ``tf.numpy_function``. Each
option tokenizes the same stdlib documents; the peer is ``tok.encode_batch`` called directly from Python
(no tf.data) in the same run. Prints one JSON line per (tokenizer, option).

    python benchmarks/tokenize_throughput.py [--docs 600] [--batch 64] [--repeats 3]
        [--tf-text-ops PATH/_sentencepiece_tokenizer.so]

tensorflow-text's op is used through ``import tensorflow_text`` when that works, else from the op library
named by ``--tf-text-ops`` (the wheel for TF 2.21 requires the full ``tensorflow`` package, which conflicts
with ``tensorflow-cpu``, and its Python package fails to import; its op library alone loads fine).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stdlib_docs(n: int) -> list[str]:
    from jaxllama.data.corpus import iter_documents

    docs = []
    for doc in iter_documents("stdlib"):
        docs.append(doc)
        if len(docs) == n:
            break
    return docs


def llama3_style_tiktoken(docs: list[str], vocab: int, folder: str) -> str:
    """A byte-level BPE with the Llama 3 regex trained on the docs, written in Meta's tiktoken format."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from jaxllama.data.tokenizers import LLAMA3_PATTERN

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "w") as f:
        for rank, (tok, _) in enumerate(sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])):
            f.write(f"{base64.b64encode(bytes(to_byte[c] for c in tok)).decode()} {rank}\n")
    return path


def hf_folder(tiktoken_path: str, folder: str) -> str:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from jaxllama.data.tokenizers import LLAMA3_SPECIALS

    TikTokenConverter(vocab_file=tiktoken_path, extra_special_tokens=LLAMA3_SPECIALS).converted().save(
        os.path.join(folder, "tokenizer.json"))
    return folder


def tf_text_sentencepiece(model_path: str, ops_path: str | None):
    """A batch -> RaggedTensor function using tensorflow-text's C++ SentencePiece op, or None if unavailable."""
    import tensorflow as tf

    model = Path(model_path).read_bytes()
    try:
        import tensorflow_text as tft

        sp = tft.SentencepieceTokenizer(model=model, out_type=tf.int32)
        return sp.tokenize, "tensorflow_text"
    except Exception:  # not installed, or the wheel's import fails against this TF build
        pass
    if not ops_path:
        return None, "tensorflow_text unavailable"
    lib = tf.load_op_library(ops_path)
    handle = lib.SentencepieceOp(model=model)

    def tokenize(texts):
        if texts.shape.rank == 0:  # one document (per-element map): tokenize it as a batch of one
            return tokenize(tf.reshape(texts, [1])).flat_values
        values, splits = lib.SentencepieceTokenizeOp(sp_handle=handle, input=texts, nbest_size=0, alpha=1.0,
                                                     add_bos=False, add_eos=False, reverse=False,
                                                     out_type=tf.int32, Tsplits=tf.int64)
        return tf.RaggedTensor.from_row_splits(values, splits, validate=False)

    return tokenize, f"op library {ops_path}"


def per_batch_py_function(tok):
    """The same work as tf_tokenize but through tf.py_function (eager tensors instead of numpy)."""
    import numpy as np
    import tensorflow as tf

    def encode(batch):
        ids = tok.encode_batch([b.decode("utf-8") for b in batch.numpy()])
        splits = np.zeros(len(ids) + 1, np.int64)
        np.cumsum([len(x) for x in ids], out=splits[1:])
        flat = np.fromiter((i for x in ids for i in x), np.int32, int(splits[-1]))
        return flat, splits

    def fn(texts):
        flat, splits = tf.py_function(encode, [texts], [tf.int32, tf.int64])
        flat.set_shape([None])
        splits.set_shape([None])
        return tf.RaggedTensor.from_row_splits(flat, splits, validate=False)

    return fn


def measure(make_ds, n_tokens: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        ds = make_ds()
        start = time.perf_counter()
        count = 0
        for batch in ds:
            count += int(batch.flat_values.shape[0]) if hasattr(batch, "flat_values") else int(batch.shape[0])
        best = min(best, time.perf_counter() - start)
        assert count == n_tokens, (count, n_tokens)
    return n_tokens / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=600, help="stdlib documents to tokenize")
    ap.add_argument("--batch", type=int, default=64, help="documents per tf.data batch")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    ap.add_argument("--sp-vocab", type=int, default=8000, help="SentencePiece vocabulary (cached stdlib model)")
    ap.add_argument("--bpe-vocab", type=int, default=8000, help="tiktoken/HF byte-level BPE vocabulary")
    ap.add_argument("--tf-text-ops", help="path of tensorflow-text's _sentencepiece_tokenizer.so")
    args = ap.parse_args()

    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from jaxllama.data.tokenizers import cached_stdlib_tokenizer, load_tokenizer, tf_tokenize

    docs = stdlib_docs(args.docs)
    work = tempfile.mkdtemp(prefix="tokbench-")
    tik = llama3_style_tiktoken(docs, args.bpe_vocab, work)
    paths = {"sentencepiece": cached_stdlib_tokenizer(args.sp_vocab),
             "tiktoken": tik, "hf": hf_folder(tik, work)}
    autotune = tf.data.AUTOTUNE
    base = lambda: tf.data.Dataset.from_tensor_slices(docs)  # noqa: E731
    for kind, path in paths.items():
        tok = load_tokenizer(path)
        n_tokens = sum(len(x) for x in tok.encode_batch(docs))  # also warms the encoder up
        tok.encode_batch(docs)
        start = time.perf_counter()
        for _ in range(args.repeats):
            tok.encode_batch(docs)
        peer = n_tokens * args.repeats / (time.perf_counter() - start)
        options = {
            "numpy_function_batched (tf_tokenize)":
                lambda: base().batch(args.batch).map(tf_tokenize(tok), num_parallel_calls=autotune),
            "numpy_function_per_document":
                lambda: base().map(tf_tokenize(tok), num_parallel_calls=autotune),
            "py_function_batched":
                lambda: base().batch(args.batch).map(per_batch_py_function(tok), num_parallel_calls=autotune),
        }
        note = ""
        if kind == "sentencepiece":
            tft_fn, note = tf_text_sentencepiece(path, args.tf_text_ops)
            if tft_fn is not None:
                options["tf_text_sentencepiece_op_batched"] = \
                    lambda: base().batch(args.batch).map(tft_fn, num_parallel_calls=autotune)
                options["tf_text_sentencepiece_op_per_document"] = \
                    lambda: base().map(tft_fn, num_parallel_calls=autotune)
        for name, make in options.items():
            rate = measure(make, n_tokens, args.repeats)
            print(json.dumps({"tokenizer": kind, "option": name, "tokens_per_s": round(rate),
                              "vs_encode_batch": round(rate / peer, 3), "encode_batch_tokens_per_s": round(peer),
                              "docs": len(docs), "tokens": n_tokens, "batch": args.batch,
                              "vocab": tok.vocab_size, **({"tf_text": note} if note else {})}), flush=True)


if __name__ == "__main__":
    main()
