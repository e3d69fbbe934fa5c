"""Chat / instruction data: loss masks against transformers' ``return_assistant_tokens_mask`` (a template
with ``{% generation %}`` tags) and against references built turn by turn the way Meta's code tokenizes
Llama 2 and Llama 3 conversations; templates without tags; packing keeps each document's masked loss;
truncation; every bad record is a one-line error naming file:line; the pipeline and ``data inspect``."""

import json
import subprocess
import sys

import numpy as np
import pytest
from test_tokenizers import CHAT_TEMPLATE, ENV, hf_dir, reference, sp_path, tiktoken_path  # noqa: F401 (fixtures)

from jaxllama.config import load_config
from jaxllama.data.chat_data import BadRecord, ChatEncoder, encode_line, token_mask
from jaxllama.data.packing import Packer
from jaxllama.data.tokenizers import load_tokenizer
from jaxllama.errors import ConfigError
from jaxllama.data.chat_format import Rendered

# Llama 3's layout with {% generation %} tags around what the assistant produces (content + <|eot_id|>).
GEN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>"
                "{% endgeneration %}{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You answer briefly.  "},
     {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": " Blue, like the sky!"},
     {"role": "user", "content": "And another — naïve café? 日本"}, {"role": "assistant", "content": "Red 🦙\n\nok"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "def f(x):\n    return x  # 12345"}],
]


def folder_with_template(hf_dir, tmp_path, template):
    folder = tmp_path / "tok"
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_masks_equal_transformers_generation_mask(hf_dir, tmp_path, i):
    from transformers import AutoTokenizer

    folder = folder_with_template(hf_dir, tmp_path, GEN_TEMPLATE)
    ref = AutoTokenizer.from_pretrained(str(folder))
    want = ref.apply_chat_template(CONVERSATIONS[i], tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    ids, mask = ChatEncoder(load_tokenizer(str(folder)), "chat")({"messages": CONVERSATIONS[i]})
    assert ids.tolist() == list(want["input_ids"])
    assert mask.tolist() == list(want["assistant_masks"]) and mask.sum() > 0


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_template_without_tags_trains_the_same_tokens(hf_dir, tmp_path, i):
    """Meta's stock templates have no generation tags (transformers then returns an all-zero mask): the
    turn-by-turn prefix rule finds the same tokens as the tagged template."""
    tagged = ChatEncoder(load_tokenizer(str(folder_with_template(hf_dir, tmp_path / "a", GEN_TEMPLATE))), "chat")
    plain = ChatEncoder(load_tokenizer(str(folder_with_template(hf_dir, tmp_path / "b", CHAT_TEMPLATE))), "chat")
    a, b = tagged({"messages": CONVERSATIONS[i]}), plain({"messages": CONVERSATIONS[i]})
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()


def llama3_reference(tok, messages):
    """Meta's llama3 ChatFormat: encode_header + encode(content.strip()) + <|eot_id|> per message."""
    sp = tok.special_ids()
    ids, mask = [sp["<|begin_of_text|>"]], [0]
    for m in messages:
        head = [sp["<|start_header_id|>"]] + tok.encode(m["role"], bos=False, eos=False) + \
            [sp["<|end_header_id|>"]] + tok.encode("\n\n", bos=False, eos=False)
        body = tok.encode(m["content"].strip(), bos=False, eos=False) + [sp["<|eot_id|>"]]
        ids += head + body
        mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    return ids, mask


def llama2_reference(tok, messages):
    """Meta's llama2 chat_completion: per (user, answer) pair
    ``encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True)``; the answer is what follows
    the prompt's own tokens (llama-recipes' label masking)."""
    if messages[0]["role"] == "system":
        first = f"<<SYS>>\n{messages[0]['content'].strip()}\n<</SYS>>\n\n{messages[1]['content'].strip()}"
        messages = [{"role": "user", "content": first}] + messages[2:]
    ids, mask = [], []
    for u, a in zip(messages[::2], messages[1::2]):
        prompt = tok.encode(f"[INST] {u['content'].strip()} [/INST]", bos=True, eos=False)
        turn = tok.encode(f"[INST] {u['content'].strip()} [/INST] {a['content'].strip()} ", bos=True, eos=True)
        assert turn[:len(prompt)] == prompt
        ids += turn
        mask += [0] * len(prompt) + [1] * (len(turn) - len(prompt))
    return ids, mask


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_llama3_and_llama2_formats_equal_meta_turn_by_turn(tiktoken_path, sp_path, i):
    tok3 = load_tokenizer(tiktoken_path)
    ids, mask = ChatEncoder(tok3, "chat", template="llama3")({"messages": CONVERSATIONS[i]})
    assert (ids.tolist(), mask.tolist()) == llama3_reference(tok3, CONVERSATIONS[i])
    tok2 = load_tokenizer(sp_path)
    ids, mask = ChatEncoder(tok2, "chat", template="llama2")({"messages": CONVERSATIONS[i]})
    assert (ids.tolist(), mask.tolist()) == llama2_reference(tok2, CONVERSATIONS[i])


def test_loss_on_variants_and_prompt_completion(tiktoken_path):
    tok = load_tokenizer(tiktoken_path)
    conv = CONVERSATIONS[1]
    full = ChatEncoder(tok, "chat", template="llama3")({"messages": conv})
    last = ChatEncoder(tok, "chat", loss_on="last_assistant", template="llama3")({"messages": conv})
    every = ChatEncoder(tok, "chat", loss_on="all", template="llama3")({"messages": conv})
    assert (last[0] == full[0]).all() and 0 < last[1].sum() < full[1].sum() and every[1].all()
    assert (full[1] >= last[1]).all()  # the last turn is a subset of all assistant turns
    # prompt/completion as messages: the prompt's assistant turn is context only
    pc = ChatEncoder(tok, "prompt_completion", template="llama3")({"prompt": conv[:4], "completion": conv[4:]})
    assert pc[0].tolist() == full[0].tolist() and pc[1].tolist() == last[1].tolist()
    # plain strings: BOS + prompt + completion + EOS, trained on the completion and EOS
    ids, mask = ChatEncoder(tok, "prompt_completion")({"prompt": "Q: capital of France?\nA:", "response": " Paris"})
    want_prompt = tok.encode("Q: capital of France?\nA:", bos=True)
    assert ids.tolist() == want_prompt + tok.encode(" Paris", bos=False) + [tok.eos_id]
    assert mask.tolist() == [0] * len(want_prompt) + [1] * (len(ids) - len(want_prompt))


def test_token_mask_covers_partial_tokens(sp_path):
    tok = load_tokenizer(sp_path)
    text = "hello world"
    ids, mask = token_mask(tok, Rendered(text, [(7, 8)]), special=False)  # one char inside "world"
    starts = tok.encode_offsets(text, special=False)
    assert mask.sum() >= 1 and all(starts[1][j] <= 7 < max(starts[2][j], starts[1][j] + 1) for j in np.nonzero(mask)[0])


def test_truncation_modes(tiktoken_path):
    tok = load_tokenizer(tiktoken_path)
    conv = CONVERSATIONS[2]
    ids, mask = ChatEncoder(tok, "chat", template="llama3")({"messages": conv})
    n = 12
    right = ChatEncoder(tok, "chat", template="llama3", truncate="right", seq_len=len(ids) - 1 - n)
    r = right({"messages": conv})
    assert r[0].tolist() == ids[: len(ids) - n].tolist() and right.truncated == 1
    left = ChatEncoder(tok, "chat", template="llama3", truncate="left", seq_len=len(ids) - 1 - n)
    lt = left({"messages": conv})
    assert lt[0].tolist() == ids[n:].tolist() and lt[1].tolist() == mask[n:].tolist()
    drop = ChatEncoder(tok, "chat", template="llama3", truncate="drop", seq_len=len(ids) - 2)
    assert drop({"messages": conv}) is None and drop.dropped == 1
    # truncated until no assistant token is left: an error, not a silent zero-loss document
    tiny = ChatEncoder(tok, "chat", template="llama3", truncate="right", seq_len=4)
    with pytest.raises(BadRecord, match="no trained tokens"):
        tiny({"messages": conv})


def masked_nll(batch, logprob):
    """Sum of -logprob[target] over trained positions, with a per-(token, target) table standing in for a model."""
    return float(sum(-logprob[t, g] * m for t, g, m in zip(batch["tokens"].ravel(), batch["targets"].ravel(),
                                                           batch["loss_mask"].ravel())))


@pytest.mark.parametrize("mode", ["pack", "concat"])
def test_packing_keeps_each_documents_masked_loss(tiktoken_path, mode):
    tok = load_tokenizer(tiktoken_path)
    enc = ChatEncoder(tok, "chat", template="llama3")
    docs = [enc({"messages": c}) for c in CONVERSATIONS * 3]
    rng = np.random.default_rng(0)
    logprob = -rng.random((tok.vocab_size, tok.vocab_size))
    alone = 0.0
    for ids, mask in docs:
        p = Packer(len(ids) - 1, "pack", tok.pad_id)
        p.add(ids, mask)
        alone += masked_nll(p.pop(1), logprob)
        # the trained pairs are exactly (ids[j-1] -> ids[j]) where mask[j]
    packer = Packer(64, mode, tok.pad_id)
    for ids, mask in docs:
        packer.add(ids, mask)
    packer.flush()
    packed = packer.pop(len(packer.ready))
    assert masked_nll(packed, logprob) == pytest.approx(alone, rel=1e-12)
    assert packed["loss_mask"].sum() == sum(m[1:].sum() for _, m in docs)
    if mode == "pack":  # positions restart in each segment and the mask never touches padding
        assert (packed["loss_mask"][packed["segment_ids"] == 0] == 0).all()
        # restoring the packer mid-stream keeps the masks
        p2 = Packer(64, mode, tok.pad_id)
        p2.add(*docs[0])
        p3 = Packer(64, mode, tok.pad_id)
        p3.restore(p2.state())
        p2.flush(), p3.flush()
        assert all((p2.pop(1)[k] == p3.pop(1)[k]).all() for k in ("tokens", "loss_mask"))


@pytest.mark.parametrize("line, words", [
    ('{"text": "x"}', "no key 'messages'"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('[1, 2]', "expected a JSON object"),
    ('{"messages": [{"role": "user"', "not valid JSON"),
])
def test_bad_chat_records(tiktoken_path, line, words):
    enc = ChatEncoder(load_tokenizer(tiktoken_path), "chat", template="llama3")
    with pytest.raises(BadRecord, match=words):
        encode_line(enc, line)


def test_template_without_assistant_output_is_an_error(hf_dir, tmp_path):
    silent = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    enc = ChatEncoder(load_tokenizer(str(folder_with_template(hf_dir, tmp_path, silent))), "chat")
    with pytest.raises(BadRecord, match="no trained tokens|renders no assistant"):
        enc({"messages": CONVERSATIONS[0]})
    never = GEN_TEMPLATE.replace("m['role'] == 'assistant'", "m['role'] == 'nobody'")
    enc = ChatEncoder(load_tokenizer(str(folder_with_template(hf_dir, tmp_path / "n", never))), "chat")
    with pytest.raises(BadRecord, match="no trained tokens|renders no assistant"):
        enc({"messages": CONVERSATIONS[0]})


def test_pipeline_batches_carry_the_masks_and_errors_name_file_line(tiktoken_path, tmp_path):
    from jaxllama.data.sources import make_source

    good = tmp_path / "chat.jsonl"
    good.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4))
    cfg = load_config(None, ["model.preset=tiny", f"data.source={good}", "data.format=chat",
                             f"data.tokenizer={tiktoken_path}", "data.seq_len=128", "data.global_batch=4",
                             "data.shuffle=false", "model.vocab_size=1024"])
    src = make_source(cfg)
    batch = next(src)
    enc = ChatEncoder(load_tokenizer(tiktoken_path), "chat")
    want = {tuple(ids[:-1].tolist()): mask[1:].tolist() for ids, mask in (enc({"messages": c}) for c in CONVERSATIONS)}
    segments = 0
    for r in range(batch["tokens"].shape[0]):  # every packed document is one conversation with its own mask
        for seg in set(batch["segment_ids"][r].tolist()) - {0}:
            at = batch["segment_ids"][r] == seg
            assert batch["loss_mask"][r][at].tolist() == want[tuple(batch["tokens"][r][at].tolist())]
            segments += 1
    assert segments >= 4
    assert "chat records in the llama3 chat format" in src.describe()
    src.close()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" + '{"messages": [{"role": "bot", "content": "x"}]}\n')
    cfg.data.source = str(bad)
    src = make_source(cfg)
    with pytest.raises(ConfigError, match=f"{bad}:2: messages\\[1\\]: unknown role 'bot'"):
        next(src)
    src.close()
    with pytest.raises(ConfigError, match="data.format=chat reads JSONL files"):
        load_config(None, ["data.format=chat"])


def test_data_inspect_cli_shows_the_mask(tiktoken_path, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    out = subprocess.run([sys.executable, "-m", "jaxllama.cli", "data", "inspect", f"data.source={path}",
                          "data.format=chat", f"data.tokenizer={tiktoken_path}", "model.vocab_size=1024"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[[4.<|eot_id|>]]" in out.stdout and f"{path}:1" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxllama.cli", "data", "inspect", f"data.source={path}",
                          "data.format=chat", "data.chat_template=llama2", f"data.tokenizer={tiktoken_path}",
                          "model.vocab_size=1024", "data.loss_on=nothing"], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert bad.returncode == 2 and "data.loss_on" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_packing_does_not_change_a_documents_masked_loss_under_the_model(tiktoken_path):
    """With the real decoder: each conversation's masked NLL alone equals its share of a packed row
    (segment ids keep attention inside a document, positions restart)."""
    import jax
    import jax.numpy as jnp

    from helpers import random_params
    from jaxllama.model.llama import Arch, Llama

    tok = load_tokenizer(tiktoken_path)
    enc = ChatEncoder(tok, "chat", template="llama3")
    docs = [enc({"messages": c}) for c in CONVERSATIONS]
    cfg = load_config(None, ["model.preset=debug", "model.vocab_size=1024", "data.seq_len=128"])
    a = Arch.from_config(cfg.model)
    model, params = Llama(a), jax.tree.map(jnp.asarray, random_params(a, seed=2))

    def nll(batch):
        logits = model.apply({"params": params}, jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                             jnp.asarray(batch["segment_ids"]))
        lp = jax.nn.log_softmax(logits, axis=-1)
        picked = -jnp.take_along_axis(lp, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
        return float(jnp.sum(picked * batch["loss_mask"]))

    alone = 0.0
    for ids, mask in docs:
        p = Packer(128, "pack", tok.pad_id)
        p.add(ids, mask)
        p.flush()
        alone += nll(p.pop(1))
    packer = Packer(128, "pack", tok.pad_id)
    for ids, mask in docs:
        packer.add(ids, mask)
    packer.flush()
    packed = packer.pop(len(packer.ready))
    assert packed["tokens"].shape[0] < len(docs)  # several documents share a row
    assert nll(packed) == pytest.approx(alone, rel=1e-5)


def test_a_runs_tokenizer_copy_keeps_a_model_files_chat_template(sp_path, tmp_path):
    """A SentencePiece ``tokenizer.model`` read from a folder with a template: the run's copy keeps the
    template (so ``generate RUN --chat`` renders as training did) and the BOS/EOS choices."""
    from jaxllama.data.tokenizers import copy_tokenizer

    src = tmp_path / "base"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(open(sp_path, "rb").read())
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "add_eos_token": True}))
    tok = load_tokenizer(str(src))
    copy_tokenizer(tok, tmp_path / "run" / "tokenizer")
    copied = load_tokenizer(str(tmp_path / "run" / "tokenizer"))
    assert copied.chat_template == CHAT_TEMPLATE and copied.add_eos and copied.add_bos == tok.add_bos
