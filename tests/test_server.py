"""``qcompile serve`` as clients see it: the official ``openai`` client (sync and async) and raw HTTP
against a server subprocess on 127.0.0.1, checked against ``LLM.generate`` and the eager model:
completions and chat, streamed and not, ``n``, seeds, log-probs, echo, usage, prefix-cache hits,
concurrency, abort on disconnect with every block back, bad input as 4xx, a fuzz, SIGTERM."""
import asyncio
import time

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler import LLM, SamplingParams
from qcompiler.compiler import compile_model
from qcompiler.models import load_source
from qcompiler.targets import Float
from server_util import ServerProcess
from tests_paths import FIXTURES

KEY = "test-key"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory):
    src = load_source(str(FIXTURES / "chat_lm.py"))
    out = tmp_path_factory.mktemp("serve") / "chat-lm"
    compile_model(src, Float(), out, verify=False)
    return out, src


@pytest.fixture(scope="module")
def server(chat_artifact):
    s = ServerProcess(chat_artifact[0], "--api-key", KEY, "--served-model-name", "tiny", "--max-body-bytes", "65536")
    yield s
    code, log = s.stop()
    assert code == 0, log  # SIGTERM: a clean exit


@pytest.fixture(scope="module")
def offline(chat_artifact):
    return LLM(chat_artifact[0])


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(max_tokens=8, **kw):
    return dict(model="tiny", max_tokens=max_tokens, temperature=0.0, **kw)


def test_completions_equal_llm_generate(client, offline):
    r = client.completions.create(prompt=PROMPT, **greedy())
    ref = offline.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.model == "tiny" and r.object == "text_completion" and r.id.startswith("cmpl-")
    streamed = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                              **greedy()))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens == len(ref.token_ids)
    batch = client.completions.create(prompt=[PROMPT, "Hello"], n=2, **greedy(4))  # 2 prompts x n=2: index i*n+j
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in batch.choices}
    assert by_index[0] == by_index[1] == offline.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0))[0].text


def test_chat_streamed_and_not(client, offline, chat_artifact):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    tok = chat_artifact[1].tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    ref = offline.generate([tok(text, add_special_tokens=False)["input_ids"]], SamplingParams(max_tokens=6, temperature=0.0))[0]
    ref_text = tok.decode(ref.token_ids, skip_special_tokens=True)
    r = client.chat.completions.create(messages=msgs, **greedy(6))
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref_text
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, **greedy(6)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref_text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    lp = client.chat.completions.create(messages=msgs, logprobs=True, top_logprobs=3, max_completion_tokens=3,
                                        model="tiny", temperature=0.0)
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)


def test_seeds_repeat_and_n_differs(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=1234)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # the n completions are different draws


def test_beam_search_equals_llm_beam_search(client, offline):
    """vLLM's extension: ``use_beam_search`` with ``n`` as the width, the hypotheses best first as
    the choices, streamed (all at the end) or not; chat through the template."""
    from qcompiler import BeamSearchParams
    ref = offline.beam_search(PROMPT, BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.7))[0]
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=6, n=3, temperature=0.0,
              extra_body={"use_beam_search": True, "length_penalty": 0.7})
    r = client.completions.create(**kw)
    assert [c.text for c in r.choices] == [s.text for s in ref.sequences] and len(set(s.text for s in ref.sequences)) > 1
    assert [c.finish_reason for c in r.choices] == [s.finish_reason for s in ref.sequences]
    assert r.usage.completion_tokens == sum(len(s.token_ids) for s in ref.sequences)
    streamed = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [s.text for s in ref.sequences]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          n=2, extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and chat.choices[0].message.content != chat.choices[1].message.content


def eager_logprobs(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids)[None], position_ids=torch.arange(len(ids))[None])
    return torch.log_softmax(out[0].float(), -1)


def test_echo_logprobs_are_the_models(client, chat_artifact):
    """lm-eval's local-completions loglikelihood request: the prompt's own log-probs, nothing generated."""
    src = chat_artifact[1]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0.0)
    c = r.choices[0]
    ids = src.tokenizer(PROMPT)["input_ids"]
    ref = eager_logprobs(src.model, ids)
    assert c.text == PROMPT and len(c.logprobs.token_logprobs) == len(ids) and c.logprobs.token_logprobs[0] is None
    got = torch.tensor(c.logprobs.token_logprobs[1:])
    want = torch.tensor([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))])
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert "".join(c.logprobs.tokens) == PROMPT and c.logprobs.text_offset[:2] == [0, len(c.logprobs.tokens[0])]


def test_a_repeated_prefix_is_served_from_the_cache(client):
    long = "All the world's a stage, and all the men and women merely players. " * 2
    client.completions.create(prompt=long, **greedy(2))
    r = client.completions.create(prompt=long, **greedy(2))
    assert r.usage.prompt_tokens_details.cached_tokens >= 16 * ((r.usage.prompt_tokens - 1) // 16)


def test_32_concurrent_greedy_requests_equal_llm_generate(server, offline):
    prompts = [f"{i} little pigs went to" for i in range(32)]
    refs = offline.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0))

    async def run():
        ac = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*[ac.completions.create(prompt=p, **greedy(10)) for p in prompts])
        finally:
            await ac.close()
    outs = asyncio.run(run())
    assert [o.choices[0].text for o in outs] == [r.text for r in refs]


def wait_idle(server, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["qcompiler:num_requests_running"] == m["qcompiler:num_requests_waiting"] == 0 \
                and m["qcompiler:kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


def test_disconnected_streams_are_aborted_and_their_blocks_return(server):
    """vLLM's pattern: three long streams, cancelled; /metrics shows them aborted and nothing held."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4000, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    aborted = 'qcompiler:request_success_total{finished_reason="abort"}'
    before = server.metrics()
    with httpx.Client(timeout=30) as h:
        streams = [h.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) for _ in range(3)]
        for s in streams:
            lines = s.__enter__().iter_lines()
            assert next(lines).startswith("data: {")  # tokens are flowing
        for s in streams:
            s.__exit__(None, None, None)
    m = wait_idle(server)
    assert m[aborted] - before[aborted] == 3
    assert m["qcompiler:generation_tokens_total"] - before["qcompiler:generation_tokens_total"] < 3 * 4000
    # a non-streamed request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=0.5)
    assert wait_idle(server)[aborted] - before[aborted] == 4


BAD = [  # (body or raw bytes, status, words the message must hold)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -0.5}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p"),
    ({"prompt": PROMPT, "n": 0}, 400, "n"),
    ({"prompt": PROMPT, "n": 1000}, 400, "n"),
    ({"prompt": PROMPT, "logprobs": 21}, 400, "logprobs"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": []}, 400, "empty"),
    ({"prompt": [5, 100000]}, 400, "outside the vocabulary"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "maximum context length is 4096"),
    ({"prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": PROMPT, "best_of": 3}, 400, "best_of"),
    ({"prompt": PROMPT, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"prompt": PROMPT, "min_tokens": 10, "max_tokens": 5}, 400, "min_tokens"),
    ({"prompt": PROMPT, "use_beam_search": True, "temperature": 0.8}, 400, "temperature does not apply to beam"),
    ({"prompt": PROMPT, "use_beam_search": True, "logprobs": 2}, 400, "logprobs does not apply to beam"),
    ({"model": "gpt-9", "prompt": PROMPT}, 404, "does not exist"),
    ({"prompt": PROMPT, "max_tokens": 2, "x": "y" * 70000}, 413, "limit"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_a_4xx_with_an_openai_error(server, body, status, words):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_chat_bad_input_and_auth(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/chat/completions"
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    for body, words in [(image, "image_url"), ({"messages": []}, "messages"),
                        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role")]:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    for h in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]}, headers=h, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    assert httpx.get(f"{server.url}/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"


FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "echo", "stream",
          "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "repetition_penalty", "min_tokens",
          "stop_token_ids", "ignore_eos", "model", "user", "suffix"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(-3, 3, allow_nan=False),
                   st.text(max_size=8), st.lists(st.integers(-3, 300), max_size=4),
                   st.dictionaries(st.text(max_size=3), st.integers(-200, 200), max_size=2))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8))
def test_fuzzed_bodies_never_break_the_server(server, body):
    body = {**body, "max_tokens": body.get("max_tokens") if isinstance(body.get("max_tokens"), int) and
            abs(body.get("max_tokens")) < 40 else 4}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_after_the_fuzz_the_server_is_healthy_and_right(server, client, offline):
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = client.completions.create(prompt=PROMPT, **greedy())
    assert r.choices[0].text == offline.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0].text
    wait_idle(server)


def test_token_prompts_and_a_full_queue_without_a_tokenizer(tmp_path):
    src = load_source(str(FIXTURES / "plain_lm.py"))
    art = tmp_path / "plain"
    compile_model(src, Float(), art, verify=False)
    s = ServerProcess(art, "--max-num-seqs", "1", "--max-waiting", "1", "--grace", "1")
    try:
        url = f"{s.url}/v1/completions"
        r = httpx.post(url, json={"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}, timeout=30)
        ref = LLM(art).generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))[0]
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == len(ref.token_ids)
        r = httpx.post(url, json={"prompt": "words"}, timeout=30)
        assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]

        async def flood():
            async with httpx.AsyncClient(timeout=60) as ac:
                body = {"prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": True, "temperature": 0}
                return await asyncio.gather(*[ac.post(url, json=body) for _ in range(6)])
        codes = [r.status_code for r in asyncio.run(flood())]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        busy = next(r for r in asyncio.run(flood()) if r.status_code == 503)
        assert busy.headers["retry-after"] and "capacity" in busy.json()["error"]["message"]
        # SIGTERM with a long request in flight: it is aborted after the grace period, the exit is clean
        long = {"prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url, json=long, timeout=60) as r:
            assert next(r.iter_lines()).startswith("data: {")
            t0 = time.monotonic()
            code, log = s.stop()
            assert time.monotonic() - t0 < 10
    finally:
        code, log = s.stop()
    assert code == 0, log
