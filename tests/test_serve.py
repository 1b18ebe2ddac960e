"""`edgeq serve` against the real clients (openai, ollama, httpx), on a free loopback port, SmolLM2-135M.

Generations are short (the machine is shared); every request loop is bounded in count and time."""
import json
import threading
import time

import pytest
from _signals import default_sigint  # noqa: E402


pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

NAME = "smollm2-135m-instruct"
CTX = 512
SLOTS = 8
NEAR_TIE = 0.5  # a greedy divergence between batched and one-at-a-time runs is accepted only at a near-tie
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0,
                                                                              "maximum": 120}}}


def _wait_healthy(url: str, timeout: float = 600.0) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return
            if r.json().get("status") == "error":
                raise RuntimeError(r.json()["message"])
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not become healthy")


@pytest.fixture(scope="module")
def server(smollm2_path):
    import edgeq
    from edgeq.serve import start_server

    model = edgeq.load(str(smollm2_path), n_ctx=CTX, threads=2)
    srv = start_server(model, n_slots=SLOTS, n_ctx=CTX, model_name=NAME, request_timeout=300)
    try:
        _wait_healthy(srv.url)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=300, max_retries=0)


def chat(client, text, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], **kw)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# ---------------------------------------------------------------- OpenAI API
def test_chat_stream_equals_non_stream_and_reports_usage(client):
    r = chat(client, "Name a fruit.")
    assert r.choices[0].finish_reason in ("stop", "length")
    text = r.choices[0].message.content
    assert text and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(chat(client, "Name a fruit.", stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_stop_string_cuts_the_text(client):
    full = client.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 10 and full.choices[0].finish_reason == "length"
    stop = text.strip()[2:5] if len(text.strip()) >= 5 else text.strip()[-1]
    cut = client.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    parts = list(client.completions.create(model=NAME, prompt="1, 2, 3, 4,", max_tokens=10, temperature=0,
                                           stop=[stop], stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == cut.choices[0].text


def test_same_seed_same_output(client):
    a = chat(client, "Write a word.", temperature=1.0, seed=1234, max_tokens=10).choices[0].message.content
    b = chat(client, "Write a word.", temperature=1.0, seed=1234, max_tokens=10).choices[0].message.content
    assert a == b


JSON_SYSTEM = 'Reply only with a JSON object like {"name": "Ann", "age": 30}.'


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_mode_and_json_schema_outputs_validate(client, temperature):
    """Constrained output parses (json_object) and validates (json_schema). The example in the system prompt keeps a
    135M model's free-form JSON short: unconstrained by a schema, it can also write keys until max_tokens runs out,
    which is reported as finish_reason "length" (seed 3 is one that finishes)."""
    msgs = [{"role": "system", "content": JSON_SYSTEM}, {"role": "user", "content": "Describe a person."}]
    r = client.chat.completions.create(model=NAME, messages=msgs, temperature=temperature, seed=3, max_tokens=60,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model=NAME, messages=msgs, temperature=temperature, seed=2, max_tokens=60,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "person", "schema": PERSON}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_logprobs(client):
    r = chat(client, "Say yes.", max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.token == t.top_logprobs[0].token  # greedy: the chosen token is the best one


def test_logit_bias_bans_and_forces_tokens(server, client):
    """OpenAI's logit_bias: -100 on the end-of-turn tokens runs a reply that stops by itself to max_tokens; +100 on
    one token makes it every greedy choice; logprobs still report the raw logits."""
    tok = server.sched.model.tokenizer
    free = chat(client, "Hi", max_tokens=40)
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 40
    ban = {str(i): -100 for i in tok.eog_ids}
    r = chat(client, "Hi", max_tokens=40, logit_bias=ban)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40
    assert r.choices[0].message.content.startswith(free.choices[0].message.content.rstrip())
    x = tok.encode("Hello")[-1]
    r = chat(client, "Say yes.", max_tokens=4, logit_bias={str(x): 100}, logprobs=True, top_logprobs=1)
    assert r.choices[0].message.content == tok.decode([x] * 4)
    assert all(t.logprob < 0 for t in r.choices[0].logprobs.content)  # the raw logits: "Hello" was no sure thing


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("edgeq_requests_total", "edgeq_generated_tokens_total", "edgeq_time_to_first_token_seconds_bucket",
                 "edgeq_time_per_output_token_seconds_bucket", "edgeq_queue_depth", "edgeq_slots_active",
                 "edgeq_kv_cache_tokens"):
        assert name in text


def test_engine_time_metrics_count_prefill_and_decode(server, client):
    # parsed by prometheus_client's own parser: the exposition must be valid, counters by phase
    from prometheus_client.parser import text_string_to_metric_families

    def read():
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
        assert fams["edgeq_engine_seconds"].type == "counter"
        busy = {x.labels["phase"]: x.value for x in fams["edgeq_engine_seconds"].samples}
        passes = {x.labels["phase"]: x.value for x in fams["edgeq_engine_passes"].samples}
        assert fams["edgeq_engine_passes"].type == "counter" and set(passes) == set(busy)
        return busy, fams["edgeq_decode_steps"].samples[0].value, fams["edgeq_decode_rows"].samples[0].value, passes

    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    chunk = fams["edgeq_prefill_chunk_tokens"].samples[0].value  # measured at warm-up (runtime/scheduler.chunk_for)
    assert fams["edgeq_prefill_chunk_tokens"].type == "gauge" and 32 <= chunk <= 256 and chunk % 32 == 0
    busy0, steps0, rows0, passes0 = read()
    r = chat(client, "Count from one to ten.", max_tokens=6)
    busy1, steps1, rows1, passes1 = read()
    n = r.usage.completion_tokens
    assert busy1["prefill"] > busy0["prefill"]
    assert n < 2 or busy1["decode"] > busy0["decode"]
    assert rows1 - rows0 >= n - 1 and rows1 - rows0 >= steps1 - steps0 >= (n - 1 > 0)
    # one request alone: its prompt in prompt-only passes, then one decode pass a token after the first (one more
    # when it ends on an end-of-generation token, which usage does not count); every pass that decodes is a step
    d = {k: passes1[k] - passes0[k] for k in passes1}
    assert d["prefill"] >= 1 and d["mixed"] == 0 and n - 1 <= d["decode"] <= n
    assert steps1 - steps0 == d["decode"] + d["mixed"]


def test_multi_turn_reuses_the_cached_prefix(client):
    first = [{"role": "user", "content": "Tell me about cats in one sentence."}]
    r1 = client.chat.completions.create(model=NAME, messages=first, max_tokens=8, temperature=0)
    turn2 = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "And dogs?"}]
    r2 = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=4, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1


def test_generation_stops_with_length_at_the_context_end(client):
    long = "word " * (CTX - 40)
    r = client.completions.create(model=NAME, prompt=long, temperature=0, max_tokens=CTX)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CTX


def test_eight_concurrent_greedy_streams_equal_one_at_a_time(client):
    prompts = ["Name a color.", "What is 2+2?", "Say hello.", "Name an animal.", "Count to three.",
               "What is the sky's color?", "Name a country.", "Give me a number."]

    def run(p):
        chunks = chat(client, p, max_tokens=10, stream=True, logprobs=True, top_logprobs=2)
        return [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]

    alone = [run(p) for p in prompts]
    together = [None] * len(prompts)

    def worker(i):
        together[i] = run(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for a, b in zip(alone, together):
        ta, tb = [t.token for t in a], [t.token for t in b]
        if ta == tb:
            continue
        k = next(i for i, (x, y) in enumerate(zip(ta, tb)) if x != y)
        top = a[k].top_logprobs
        assert top[0].logprob - top[1].logprob < NEAR_TIE, f"diverged at token {k} without a near-tie"


def test_disconnect_frees_the_slot_and_full_queue_is_503(server):
    sched = server.sched
    body = {"model": NAME, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400,
            "stream": True}
    clients = [httpx.Client(base_url=server.url, timeout=300) for _ in range(SLOTS)]
    streams = []
    saved = sched.max_queue
    try:
        for c in clients:
            cm = c.stream("POST", "/v1/chat/completions", json=body)
            resp = cm.__enter__()
            lines = resp.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the first event: the request is queued
            streams.append((cm, lines))
        t_end = time.monotonic() + 120
        while metric(server.url, "edgeq_slots_active") < SLOTS and time.monotonic() < t_end:
            time.sleep(0.2)
        assert metric(server.url, "edgeq_slots_active") == SLOTS
        sched.max_queue = 0
        busy = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60)
        assert busy.status_code == 503 and busy.headers.get("retry-after")
        assert busy.json()["error"]["code"] == "queue_full"
    finally:
        sched.max_queue = saved
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
    t_end = time.monotonic() + 60
    while metric(server.url, "edgeq_slots_active") > 0 and time.monotonic() < t_end:
        time.sleep(0.2)
    assert metric(server.url, "edgeq_slots_active") == 0


def test_a_failing_request_is_500_and_the_server_keeps_serving(server, client, monkeypatch):
    svc = server.app.state.service

    class Broken:
        def allowed(self):
            raise RuntimeError("boom")

    monkeypatch.setattr(svc, "constraint", lambda grammar: Broken())
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": NAME, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}})
    assert r.status_code == 500 and "RuntimeError" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert chat(client, "hi", max_tokens=2).choices[0].message.content


# ---------------------------------------------------------------- security and bad input
def test_auth_on_and_off(server):
    opts = server.app.state.service.opts
    msg = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert httpx.post(server.url + "/v1/chat/completions", json=msg, timeout=60).status_code == 200
    opts.api_key = "s3cret"
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json=msg, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(**msg).choices[0].message is not None
        assert ollama.Client(host=server.url, headers={"Authorization": "Bearer s3cret"}).list().models
    finally:
        opts.api_key = None


def _chat_body(**kw):
    return {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **kw}


@pytest.mark.parametrize("body, param", [
    (_chat_body(max_tokens=0), "max_tokens"),
    (_chat_body(max_tokens=-5), "max_tokens"),
    (_chat_body(max_tokens=CTX + 1), "max_tokens"),
    (_chat_body(max_tokens="12"), "max_tokens"),
    (_chat_body(temperature=-0.5), "temperature"),
    (_chat_body(top_p=0), "top_p"),
    (_chat_body(top_p=1.5), "top_p"),
    (_chat_body(n=2), "n"),
    (_chat_body(messages="hi"), "messages"),
    (_chat_body(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages"),
    (_chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    (_chat_body(logit_bias={"hello": 1}), "logit_bias"),
    (_chat_body(logit_bias={"12": 101}), "logit_bias"),
    (_chat_body(logit_bias={"12": "1"}), "logit_bias.12"),
    (_chat_body(logit_bias={"49152": 1}), "logit_bias"),
])
def test_bad_requests_are_400_with_an_openai_error_body(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b'{"model": "x", "messages": [], "temperature": NaN}', b"[1, 2]",
                                 b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}],'
                                 b' "temperature": Infinity}'])
def test_invalid_json_and_non_finite_numbers_are_400(server, raw):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_prompt_longer_than_the_context_is_400_not_truncated(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json=_chat_body(messages=[{"role": "user", "content": "word " * (CTX + 10)}]))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_model_404_big_body_413_foreign_host_403_no_cors(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=_chat_body(model="gpt-4"), timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    big = b'{"model": "x", "pad": "' + b"a" * (8 * 1024 * 1024) + b'"}'
    assert httpx.post(server.url + "/v1/completions", content=big, timeout=60).status_code == 413
    r = httpx.get(server.url + "/v1/models", headers={"Host": "evil.example:8080"})
    assert r.status_code == 403
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert httpx.get(server.url + "/nope").status_code == 404


# ---------------------------------------------------------------- ollama API
@pytest.fixture(scope="module")
def oclient(server):
    return ollama.Client(host=server.url, timeout=300)


def test_ollama_chat_and_generate(oclient):
    opts = {"temperature": 0, "num_predict": 8}
    r = oclient.chat(model=NAME, messages=[{"role": "user", "content": "Name a fruit."}], options=opts)
    assert r.done and r.message.content and r.eval_count >= 1
    parts = list(oclient.chat(model=NAME, messages=[{"role": "user", "content": "Name a fruit."}], options=opts,
                              stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content and parts[-1].done
    g = oclient.generate(model=NAME, prompt="Name a fruit.", options=opts)
    assert g.response == r.message.content  # generate wraps the prompt in the chat template as ollama does
    raw = "".join(p.response for p in oclient.generate(model=NAME, prompt="1, 2, 3,", raw=True, options=opts,
                                                       stream=True))
    assert raw


def test_ollama_seed_and_structured_output(oclient):
    opts = {"temperature": 1.0, "seed": 3, "num_predict": 8}
    a = oclient.chat(model=NAME, messages=[{"role": "user", "content": "A word?"}], options=opts).message.content
    b = oclient.chat(model=NAME, messages=[{"role": "user", "content": "A word?"}], options=opts).message.content
    assert a == b
    msgs = [{"role": "system", "content": JSON_SYSTEM}, {"role": "user", "content": "Describe a person."}]
    r = oclient.chat(model=NAME, messages=msgs, format="json", options={"temperature": 1.0, "seed": 3, "num_predict": 60})
    assert r.done_reason == "stop" and isinstance(json.loads(r.message.content), dict)
    r = oclient.generate(model=NAME, prompt="A person's name and age.", format=PERSON,
                         options={"temperature": 1.0, "seed": 2, "num_predict": 60})
    jsonschema.validate(json.loads(r.response), PERSON)


def test_ollama_tags_show_ps_version_and_errors(server, oclient):
    assert [m.model for m in oclient.list().models] == [NAME]
    show = oclient.show(NAME)
    assert show.details.format == "gguf" and show.modelinfo["general.architecture"] == "llama"
    assert [m.model for m in oclient.ps().models] == [NAME]
    assert httpx.get(server.url + "/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as e:
        oclient.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    r = httpx.post(server.url + "/api/chat", json={"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                                   "options": {"temperature": -1}})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


# ---------------------------------------------------------------- tools (a Qwen2.5-style template)
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 24},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}


@pytest.fixture(scope="module")
def tool_server(smollm2_path, server):
    """SmolLM2 given Qwen2.5's template (no real Qwen model here): shows the template path, the forced-call
    grammar and the parsing; says nothing about how well a model trained for tools picks them."""
    import edgeq
    from edgeq.runtime.chat_template import ChatTemplate
    from edgeq.serve import start_server

    model = edgeq.load(str(smollm2_path), n_ctx=CTX, threads=2)
    model.template = ChatTemplate(QWEN25_TEMPLATE)
    srv = start_server(model, n_slots=1, n_ctx=CTX, model_name=NAME)
    try:
        _wait_healthy(srv.url)
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_tool_call_arguments_validate(tool_server, temperature):
    c = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x", timeout=300, max_retries=0)
    r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                  temperature=temperature, seed=11, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the call goes back through the template as the next turn's history
    follow = c.chat.completions.create(
        model=NAME, tools=[WEATHER], max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": "Weather in Paris?"}, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "18 C"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_on_a_template_without_tools_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json=_chat_body(tools=[WEATHER]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_ollama_tool_call(tool_server):
    c = ollama.Client(host=tool_server.url, timeout=300)
    r = c.chat(model=NAME, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
               options={"temperature": 0, "num_predict": 60})
    # auto choice: SmolLM2 was not trained for tools, so either a parsed call or plain text comes back
    if r.message.tool_calls:
        assert r.message.tool_calls[0].function.name == "get_weather"
    else:
        assert r.message.content


def test_streamed_forced_tool_call_is_one_tool_calls_delta(tool_server):
    c = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x", timeout=300, max_retries=0)
    chunks = list(c.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=80,
        stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    # the call's text is held back and sent once, parsed: no raw <tool_call> markup reaches the client
    assert not any("<tool_call>" in (d.content or "") for d in deltas)
    (call,) = calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_ollama_streamed_tool_chat_equals_the_whole_reply(tool_server):
    c = ollama.Client(host=tool_server.url, timeout=300)
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
              options={"temperature": 0, "num_predict": 40})
    whole = c.chat(**kw)
    parts = list(c.chat(stream=True, **kw))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert [t.function.name for t in parts[-1].message.tool_calls or []] == \
        [t.function.name for t in whole.message.tool_calls or []]


# ---------------------------------------------------------------- the verb
def _edgeq(*args, timeout=120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edgeq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, needle", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--parallel", "0"], "--parallel must be in 1..64"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be in 1..4096"),
    (["/nonexistent/model.gguf"], "model.gguf"),
])
def test_serve_verb_bad_options_are_one_line(args, needle):
    p = _edgeq("serve", *args)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeq serve: ") and needle in lines[0], p.stderr


def test_exposure_warning():
    from edgeq.serve import exposure_warning, is_loopback

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "key") is None
    assert is_loopback("127.0.0.2") and not is_loopback("192.168.1.2")


@pytest.mark.parametrize("again_after", [None, 0.05])
def test_serve_verb_starts_answers_and_stops_on_ctrl_c(smollm2_path, again_after):
    """Ctrl-C stops the server without a traceback; so does a second Ctrl-C while it shuts down (uvicorn's lifespan
    task, which the app does not use, logged its cancellation as one)."""
    import re
    import signal
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "edgeq.cli", "serve", str(smollm2_path), "--port", "0", "--ctx", "256",
                          "--parallel", "1", "-t", "2"], stderr=subprocess.PIPE, text=True,
                         preexec_fn=default_sigint)
    try:
        line = p.stderr.readline()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert m, line
        _wait_healthy(m.group(1), timeout=600)
        assert httpx.get(m.group(1) + "/v1/models").json()["data"][0]["id"] == str(smollm2_path)
        p.send_signal(signal.SIGINT)
        if again_after is not None:
            time.sleep(again_after)
            p.send_signal(signal.SIGINT)
        assert p.wait(60) in (0, 130)
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
