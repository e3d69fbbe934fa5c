"""`jaxllama serve` end to end: the server runs as a subprocess on a loopback port, and the `openai`
client, raw HTTP and concurrent clients talk to it. References: Hugging Face transformers on the same
folder (greedy tokens, log-probabilities, top alternatives) and the same prompt served alone."""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxllama.data.chat_format import chat_prompt
from jaxllama.data.tokenizers import load_tokenizer
from serve_helpers import make_hf_model, running_server

PROMPTS = ["the quick brown fox", "hello world", "lazy dog is a", "this is a test of", "model of text the",
           "jumps over", "fox fox fox", "world hello test", "a", "quick quick brown", "the the lazy", "text model",
           "over the lazy dog and the quick brown fox jumps", "is this", "dog", "hello"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(hf_dir):
    """8 slots (so 16 concurrent requests queue and reuse slots), prompt chunks of 8 (several per prompt)."""
    with running_server(hf_dir, "--slots", "8", "--max-len", "96", "--chunk", "8", name="tiny") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(hf_dir):
    return load_tokenizer(str(hf_dir))


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        x = torch.tensor([ids])
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=2,
                          pad_token_id=0)
    return [t for t in out[0, len(ids):].tolist() if t != 0][: n]


def text_after(tok, prompt: list[int], new: list[int]) -> str:
    """The text ``new`` adds after ``prompt`` (vLLM's completion text; EOS and after left out)."""
    new = new[:new.index(2)] if 2 in new else new
    return tok.decode(prompt + new)[len(tok.decode(prompt)):]


def test_completions_equal_transformers_greedy(client, hf, tok):
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        want = hf_greedy(hf, tok.encode(prompt), 12)
        c = r.choices[0]
        assert c.text == text_after(tok, tok.encode(prompt), want)
        assert c.finish_reason == ("stop" if 2 in want else "length")
        assert r.usage.prompt_tokens == len(tok.encode(prompt))
        assert r.usage.completion_tokens == (want.index(2) + 1 if 2 in want else len(want))  # EOS counted
    # token-id prompts (as lm-eval sends them), several in one request: one choice each, in order
    ids = [tok.encode(p) for p in PROMPTS[3:5]]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for c, p in zip(r.choices, ids):
        assert c.text == text_after(tok, p, hf_greedy(hf, p, 6))


def test_streaming_completions_and_chat(client, tok, hf):
    full = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it streamed in pieces
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # chat: the model's chat template (Llama 2 format for this SentencePiece tokenizer), greedy = transformers
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    ids = tok.encode(chat_prompt(messages, tok), bos=False, special=True)
    want = text_after(tok, ids, hf_greedy(hf, ids, 10))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in stream)
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    assert stream[-1].choices[0].finish_reason in ("stop", "length")


def test_echo_logprobs_equal_transformers(client, hf, tok):
    ids = tok.encode(PROMPTS[12])
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    want = [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, atol=1e-4)
    for j in range(1, len(ids)):
        top = torch.topk(ref[j - 1], 3)
        got = lp.top_logprobs[j]
        assert np.isclose(max(got.values()), float(top.values[0]), atol=1e-4)  # what lm-eval's is_greedy reads
        for i, v in zip(top.indices.tolist(), top.values.tolist()):
            text = tok.decode([i])
            key = tok.piece(i) if not text or "\ufffd" in text else text  # a lone UTF-8 byte goes by its piece
            assert key in got and got[key] >= v - 1e-4  # (where two tokens share a text, the likelier one's)
    # the generated token: transformers' argmax after the prompt, with its log-probability
    assert np.isclose(lp.token_logprobs[-1], float(ref[-1].max()), atol=1e-4)
    assert "".join(lp.tokens) == r.choices[0].text == tok.decode(ids + [int(ref[-1].argmax())])


def test_sixteen_concurrent_prompts_equal_each_alone(server):
    """16 different prompts at once (8 slots: half wait, slots are reused) give the text each gives alone."""
    def ask(prompt):
        r = httpx.post(f"{server}/v1/completions", json=dict(prompt=prompt, max_tokens=24, temperature=0,
                                                             ignore_eos=True), timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = [ask(p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, PROMPTS))
    assert together == alone
    assert len(set(alone)) > 8  # different prompts, different texts: the check can fail


def test_sampling_seed_n_and_penalties(client):
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(n=3, **kw)
    b = client.completions.create(n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) > 1  # the n choices differ
    assert client.completions.create(n=1, **{**kw, "seed": 8}).choices[0].text != a.choices[0].text
    extra = dict(top_k=5, min_p=0.05, repetition_penalty=1.3)
    r = client.completions.create(extra_body=extra, presence_penalty=0.5, frequency_penalty=0.5, **kw)
    assert r.choices[0].finish_reason in ("stop", "length")
    # a strong frequency penalty stops greedy decoding from repeating tokens as much
    plain = client.completions.create(model="tiny", prompt="fox fox fox", max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True})
    penal = client.completions.create(model="tiny", prompt="fox fox fox", max_tokens=24, temperature=0,
                                      frequency_penalty=2.0, extra_body={"ignore_eos": True})
    assert len(set(penal.choices[0].text.split())) >= len(set(plain.choices[0].text.split()))
    assert penal.choices[0].text != plain.choices[0].text


def test_stop_strings_and_finish_reason(client):
    full = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert full.finish_reason == "length"
    text = full.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2] not in text[:i + 1])
    cut = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut.text


BAD = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps(dict(prompt="hi", max_tokens=-1)).encode(), "max_tokens"),
    (json.dumps(dict(prompt="hi", n=0)).encode(), "n:"),
    (json.dumps(dict(prompt="hi", model="gpt-4")).encode(), "model: 'gpt-4' is not served"),
    (json.dumps(dict(prompt="hi", temperature="hot")).encode(), "temperature"),
    (json.dumps(dict(prompt="hi", max_tokens="5")).encode(), "max_tokens"),
    (json.dumps(dict(prompt="hi", stream="yes")).encode(), "stream"),
    (json.dumps(dict(prompt=[])).encode(), "prompt"),
    (json.dumps(dict(prompt=[5, 100000])).encode(), "outside the vocabulary"),
    (json.dumps(dict(prompt="hello " * 200)).encode(), "the server's context is 96"),
    (json.dumps(dict(max_tokens=3)).encode(), "prompt: Field required"),
    (json.dumps(dict(prompt="hi", logprobs=50)).encode(), "logprobs"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m for _, m in BAD])
def test_bad_requests_are_400_and_the_server_keeps_serving(server, body, message):
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error" and "\n" not in err["message"]
    ok = httpx.post(f"{server}/v1/completions", json=dict(prompt="hi", max_tokens=2), timeout=30)
    assert ok.status_code == 200


def test_bad_chat_requests(server):
    for body, message in ((dict(messages=[]), "messages"), (dict(messages=[{"role": "wizard", "content": "x"}]), "role"),
                          (dict(messages=[{"role": "user", "content": "x"}], top_logprobs=99), "top_logprobs")):
        r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_models_health_and_metrics(server):
    models = httpx.get(f"{server}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == 96
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    text = httpx.get(f"{server}/metrics").text
    for name in ("requests_total", "queue_depth", "batch_occupancy", "kv_cache_usage", "generation_tokens_per_second",
                 "generation_tokens_total"):
        assert f"# TYPE jaxllama_{name} " in text
    generated = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith("jaxllama_generation_tokens_total")))
    assert generated > 0


def test_queue_limit_429_and_disconnect_frees_the_slot(hf_dir):
    """One slot, a queue of one: a third concurrent request is 429. A client that leaves mid-stream
    frees the slot at once (the next request does not wait for its 80 tokens)."""
    with running_server(hf_dir, "--slots", "1", "--max-queue", "1", "--max-len", "96") as url:
        body = dict(prompt="hello", max_tokens=80, temperature=0, ignore_eos=True)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = sorted(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code,
                                    range(4)))
        assert codes[0] == 200 and 429 in codes, codes
        r = httpx.post(f"{url}/v1/completions", json=dict(prompt="hi", max_tokens=1), timeout=60)
        assert r.status_code == 200
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as s:
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 30
        while "jaxllama_sequences_cancelled_total 1" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the closed stream was never cancelled"
        r = httpx.post(f"{url}/v1/completions", json=dict(prompt="hi", max_tokens=2), timeout=10)
        assert r.status_code == 200


def test_two_processes_serve_like_one(hf_dir, server):
    """Process 0 serves HTTP; both processes step the engine on a mesh over their 2 devices."""
    launch = [sys.executable, "-m", "jaxllama.launch.local", "2", "--devices-per-process", "1", "--"]
    body = dict(prompt=PROMPTS[12], max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    one = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]
    with running_server(hf_dir, "--mesh", "data=1,tensor=2", "--slots", "2", "--max-len", "96", "--chunk", "8",
                        launch=launch) as url:
        two = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]
        streamed = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=120).text
    assert two["text"] == one["text"]
    np.testing.assert_allclose(two["logprobs"]["token_logprobs"], one["logprobs"]["token_logprobs"], atol=1e-4)
    assert streamed.rstrip().endswith("data: [DONE]")
