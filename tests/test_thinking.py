"""Qwen3's thinking mode: `enable_thinking` through the template, `<think>` blocks split from the answer while
streaming, and the server's reasoning fields (OpenAI `reasoning_content`, ollama `thinking`) seen by the real
clients. The model is tests/_thinking_model.py's tiny Qwen3 file, which carries Qwen3's real chat template and
answers "<think>hm</think>OK" greedily."""
import threading
import time

import jinja2
import pytest

from _thinking_model import CONTENT, REASONING, TEMPLATE, thinking_qwen3_gguf
from edgeq.runtime.reasoning import ThinkSplitter, prompt_opens_thinking, split_reasoning, template_thinks

REPLY = "<think>\nLet me count: 1, 2.\n</think>\n\nTwo <b>apples</b>."


# ---------------------------------------------------------------- the splitter
def _streamed(text: str, cuts: list[int], in_reasoning: bool = False) -> tuple[str, str]:
    s = ThinkSplitter(in_reasoning)
    r, c = "", ""
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        dr, dc = s.feed_pair(text[a:b])
        r, c = r + dr, c + dc
    dr, dc = s.flush_pair()
    return r + dr, c + dc


def test_split_whole_reply():
    assert split_reasoning(REPLY) == ("Let me count: 1, 2.", "Two <b>apples</b>.")


def test_split_is_the_same_however_the_stream_is_cut():
    """Tags cut anywhere ("<th" + "ink>", "</" + "think>"), one character at a time, and every two-piece cut."""
    want = split_reasoning(REPLY)
    assert _streamed(REPLY, list(range(1, len(REPLY)))) == want
    for i in range(1, len(REPLY)):
        assert _streamed(REPLY, [i]) == want, i


def test_no_think_block_is_all_answer_verbatim():
    for text in ("  Hello\n", "<b>bold</b>", "<thin", "Hi <think>x</think> there", "<"):
        assert split_reasoning(text) == ("", text), text
        assert _streamed(text, list(range(1, len(text)))) == ("", text), text


def test_reply_cut_inside_the_block_is_all_reasoning():
    assert split_reasoning("<think>\nstill going, step 3 of") == ("still going, step 3 of", "")
    assert _streamed("<think>a b </thi", [3, 9, 12]) == ("a b </thi", "")


def test_prompt_that_opens_the_block():
    """Templates that end the generation prompt with "<think>\\n" (DeepSeek-R1, Qwen3 thinking-2507): the reply
    starts inside the block and only closes it."""
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")
    assert _streamed("plan</think>\n\nanswer", [2, 6], in_reasoning=True) == ("plan", "answer")


def test_template_thinks():
    assert template_thinks(TEMPLATE)
    assert not template_thinks("{% for m in messages %}{{ m.content }}{% endfor %}") and not template_thinks(None)


# ---------------------------------------------------------------- the template
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
     {"role": "user", "content": "Bye"}],
]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("thinking", [None, True, False])
def test_rendering_matches_plain_jinja(conv, thinking):
    """edgeq's sandboxed template renders Qwen3's template as jinja2 itself (transformers' settings) does."""
    from edgeq.runtime.chat_template import ChatTemplate

    messages = CONVERSATIONS[conv]
    extra = {} if thinking is None else {"enable_thinking": thinking}
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    want = env.from_string(TEMPLATE).render(messages=messages, add_generation_prompt=True, tools=None, **extra)
    got = ChatTemplate(TEMPLATE).render(messages, add_generation_prompt=True, **extra)
    assert got == want
    assert got.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") == (thinking is False)


# ---------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return thinking_qwen3_gguf(tmp_path_factory.mktemp("thinking") / "qwen3-thinking.gguf")


@pytest.fixture(scope="module")
def model(model_path):
    import edgeq

    return edgeq.load(str(model_path), n_ctx=256, threads=1)


HI = [{"role": "user", "content": "Hi"}]
NO_THINK = {"enable_thinking": False}
EMPTY_BLOCK = 6  # <think> \n \n </think> \n \n: one token each in the tiny vocabulary


def test_engine_renders_and_generates_with_the_kwarg(model):
    assert model.thinks
    assert model.render_chat(HI, template_kwargs=NO_THINK).endswith("<think>\n\n</think>\n\n")
    assert len(model.chat_ids(HI, template_kwargs=NO_THINK)) == len(model.chat_ids(HI)) + EMPTY_BLOCK
    assert "".join(model.chat(HI, temperature=0)) == f"<think>{REASONING}</think>{CONTENT}"
    assert model.count_chat_tokens(HI, template_kwargs={"enable_thinking": True}) == len(model.chat_ids(HI))


def test_template_kwargs_cannot_replace_the_conversation(model):
    from edgeq.errors import EdgeqError

    with pytest.raises(EdgeqError, match="'messages' cannot be set"):
        model.render_chat(HI, template_kwargs={"messages": []})


def test_cli_think_flags(model_path, capsys):
    from edgeq.cli import main as cli

    evaluated = {}
    for flag in ("--think", "--no-think"):
        assert cli(["run", str(model_path), "--chat", "-p", "Hi", "--temp", "0", "-n", "8", "-t", "1", "--verbose",
                    flag]) == 0
        out, err = capsys.readouterr()
        assert out == f"<think>{REASONING}</think>{CONTENT}\n"
        evaluated[flag] = int(next(line for line in err.splitlines() if line.startswith("prompt eval:")).split()[2])
    assert evaluated["--no-think"] == evaluated["--think"] + EMPTY_BLOCK


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(model):
    from edgeq.serve import start_server

    srv = start_server(model, n_slots=1, n_ctx=256, model_name="qwen3-tiny", request_timeout=120)
    httpx = pytest.importorskip("httpx")
    t_end = time.monotonic() + 300
    while httpx.get(srv.url + "/health", timeout=5).status_code != 200:
        assert time.monotonic() < t_end, "server did not become healthy"
        time.sleep(0.2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def _chat(client, **kw):
    return client.chat.completions.create(model="qwen3-tiny", messages=HI, temperature=0, **kw)


def test_openai_reasoning_content(client):
    r = _chat(client, max_tokens=20)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content, r.choices[0].finish_reason) == (REASONING, CONTENT, "stop")
    chunks = list(_chat(client, max_tokens=20, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == REASONING
    assert "".join(d.content or "" for d in deltas) == CONTENT
    assert not any("<think>" in (d.content or "") or "think>" in (d.content or "") for d in deltas)


def test_openai_reply_cut_in_the_block_is_reasoning_with_finish_length(client):
    r = _chat(client, max_tokens=2)  # "<think>", "h"
    choice = r.choices[0]
    assert (choice.message.reasoning_content, choice.message.content, choice.finish_reason) == ("h", "", "length")
    chunks = list(_chat(client, max_tokens=2, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "h"
    assert "".join(d.content or "" for d in deltas) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_chat_template_kwargs(client):
    on = _chat(client, max_tokens=20)
    off = _chat(client, max_tokens=20, extra_body={"chat_template_kwargs": NO_THINK})
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + EMPTY_BLOCK
    # a reply's reasoning goes back to the template: Qwen3 writes it for turns after the last user query
    def prompt_tokens(**reasoning):
        turns = [*HI, {"role": "assistant", "content": CONTENT, **reasoning},
                 {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
        return client.chat.completions.create(model="qwen3-tiny", temperature=0, max_tokens=1,
                                              messages=turns).usage.prompt_tokens

    assert prompt_tokens(reasoning_content=REASONING) == prompt_tokens() + 8  # <think> \n h m \n </think> \n \n


def test_openai_template_kwargs_cannot_set_messages(server):
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "qwen3-tiny", "messages": HI, "chat_template_kwargs": {"messages": []}})
    assert r.status_code == 400 and "cannot be set" in r.json()["error"]["message"]


def test_ollama_thinking(server):
    ollama = pytest.importorskip("ollama")
    c = ollama.Client(host=server.url, timeout=120)
    r = c.chat(model="qwen3-tiny", messages=HI, think=True, options={"temperature": 0})
    assert (r.message.thinking, r.message.content) == (REASONING, CONTENT)
    parts = list(c.chat(model="qwen3-tiny", messages=HI, think=True, stream=True, options={"temperature": 0}))
    assert "".join(p.message.thinking or "" for p in parts) == REASONING
    assert "".join(p.message.content for p in parts) == CONTENT and parts[-1].done
    off = c.chat(model="qwen3-tiny", messages=HI, think=False, options={"temperature": 0})
    assert off.prompt_eval_count == r.prompt_eval_count + EMPTY_BLOCK
    cut = c.chat(model="qwen3-tiny", messages=HI, think=True, options={"temperature": 0, "num_predict": 2})
    assert (cut.message.thinking, cut.message.content, cut.done_reason) == ("h", "", "length")


def test_ollama_generate_thinking(server):
    """/api/generate through the chat template: the <think> block goes to `thinking`, as ollama's does."""
    ollama = pytest.importorskip("ollama")
    c = ollama.Client(host=server.url, timeout=120)
    r = c.generate(model="qwen3-tiny", prompt="Hi", think=True, options={"temperature": 0})
    assert (r.thinking, r.response) == (REASONING, CONTENT)
    parts = list(c.generate(model="qwen3-tiny", prompt="Hi", think=True, stream=True, options={"temperature": 0}))
    assert "".join(p.thinking or "" for p in parts) == REASONING
    assert "".join(p.response for p in parts) == CONTENT and parts[-1].done
    off = c.generate(model="qwen3-tiny", prompt="Hi", think=False, options={"temperature": 0})
    assert off.prompt_eval_count == r.prompt_eval_count + EMPTY_BLOCK
    raw = c.generate(model="qwen3-tiny", prompt="Hi", raw=True, options={"temperature": 0, "num_predict": 3})
    assert raw.thinking is None  # raw: no template, the text is the user's own business


def test_server_answers_while_another_request_streams_thinking(client):
    """Two clients at once on one slot: each gets its own split (the splitter is per request)."""
    results = []

    def ask():
        results.append(_chat(client, max_tokens=20).choices[0].message)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [(m.reasoning_content, m.content) for m in results] == [(REASONING, CONTENT)] * 2
