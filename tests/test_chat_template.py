"""Chat templates: the real ones render as Hugging Face renders them; hostile ones fail cleanly."""
import os
from pathlib import Path

import pytest

from edgeq.runtime.chat_template import ChatTemplate, ChatTemplateError

CONVERSATION = [
    {"role": "system", "content": "You are terse. Réponds en français si besoin 🙂."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And <b>3+3</b>?\nThanks"},
]


def gguf_metadata(path) -> dict:
    try:
        from edgeq.formats.gguf_file import GGUFFile
    except ImportError:
        import gguf

        reader = gguf.GGUFReader(str(path))
        return {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general."))}
    with GGUFFile(path) as gf:
        return dict(gf.metadata)


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_path):
    return gguf_metadata(smollm2_path)


def test_smollm2_template_matches_huggingface(smollm2_path, smollm2_meta):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    path = Path(smollm2_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    template = ChatTemplate.from_metadata(smollm2_meta)
    assert template is not None
    assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]):
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert template.render(messages, add_generation_prompt=gen) == want
    got = template.render(CONVERSATION)
    assert got.startswith("<|im_start|>system\nYou are terse.") and got.endswith("<|im_start|>assistant\n")


def test_gemma3_base_file_has_no_template(gemma3_path):
    meta = gguf_metadata(gemma3_path)
    assert "tokenizer.chat_template" not in meta
    assert ChatTemplate.from_metadata(meta) is None


def test_from_gguf_uses_metadata():
    class FakeFile:
        metadata = {"tokenizer.chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
                    "tokenizer.ggml.tokens": ["<pad>", "<s>", "</s>"],
                    "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}

    assert ChatTemplate.from_gguf(FakeFile()).render([{"role": "user", "content": "hi"}]) == "<s>hi</s>"
    FakeFile.metadata = {}
    assert ChatTemplate.from_gguf(FakeFile()) is None


def test_huggingface_environment():
    src = ("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
           "{{ m | tojson }}|{{ m | tojson(indent=2) }}{% break %}{% endfor %}\n"
           "  {% if add_generation_prompt %}GEN{% endif %}|{{ strftime_now('%Y') | length }}|{{ tools }}|{{ extra }}")
    out = ChatTemplate(src).render([{"role": "a", "content": "x"}, {"role": "b", "content": "é<>"}],
                                   add_generation_prompt=True, extra="E")
    assert out == ('{"role": "b", "content": "é<>"}|{\n  "role": "b",\n  "content": "é<>"\n}'
                   "GEN|4|None|E")  # trim_blocks eats the newline after a block, lstrip_blocks the indent


def test_namespace_and_generation_tag():
    src = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
           "{% generation %}{{ ns.n }}{% endgeneration %}")
    assert ChatTemplate(src).render([{"role": "user", "content": "a"}] * 3) == "3"


def test_raise_exception_message_reaches_the_caller():
    src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    t = ChatTemplate(src)
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="Conversation must start with user"):
        t.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("src", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ namespace(_x=1) }}",
])
def test_sandbox_escapes_fail(src):
    with pytest.raises(ChatTemplateError, match="unsafe|not allowed"):
        ChatTemplate(src).render([{"role": "user", "content": "x"}])


def test_syntax_error_is_a_chat_template_error():
    # compiled on first render, not when the model loads
    t = ChatTemplate("{% for m in messages %}{{ m }")
    with pytest.raises(ChatTemplateError, match="syntax error"):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% if x %}never closed").render([])


def test_rich_objects_reach_the_template_as_plain_data():
    class Rich(str):
        def danger(self):
            raise AssertionError("called")

    out = ChatTemplate("{{ messages[0].content }}|{{ messages[0].content.danger is defined }}|{{ obj }}").render(
        [{"role": "user", "content": Rich("hi")}], obj=object())
    assert out == "hi|False|<object>"


# --------------------------------------------------------------------------- hostile templates: bounded
# Each case runs in a child process with 2 GB of address space and a time limit, so that a template that
# hangs or allocates without bound fails the test instead of taking the machine with it.

HOSTILE = {
    "huge power (folded at compile time)": "{{ 10**(10**9) }}",
    "huge string repeat": "{{ ('a'*3*10**9)|length }}",
    "nested long loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over strings": "{% for a in 'x'*100000 %}{% for b in 'y'*100000 %}{% endfor %}{% endfor %}",
    "huge range": "{{ range(10**12)|length }}",
    "recursive macro": "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
    "doubling with ~": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "squaring ints": "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
                     "{% endfor %}{{ ns.n > 0 }}",
    "center filter": "{{ 'a'|center(10**9) }}",
    "str.ljust": "{{ 'a'.ljust(10**9) }}",
    "percent format width": "{{ '%999999999s'|format(1) }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "replace blow-up": "{{ ('x'*1000000)|replace('x', 'y'*1000) }}",
    "join of repeated refs": "{{ (['a'*1000000]*1000)|join('') }}",
    "batch padding": "{{ [1]|batch(10**9, 'x')|list|length }}",
    "output flood": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "float overflow": "{{ 10.0**400 }}",
    "percent operator width": "{{ '%999999999s' % 1 }}",
}

_CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from edgeq.runtime.chat_template import ChatTemplate, ChatTemplateError
for name, src in json.loads(sys.stdin.read()).items():
    t0 = time.monotonic()
    try:
        t = ChatTemplate(src, time_limit=2.0)
        load_s = time.monotonic() - t0
        t.render([{"role": "user", "content": "hi"}])
        result = "rendered"
    except ChatTemplateError as e:
        load_s, result = locals().get("load_s"), "error: " + str(e)
    except BaseException as e:
        load_s, result = locals().get("load_s"), f"raw {type(e).__name__}"
    print(json.dumps([name, result, load_s]), flush=True)
"""


def test_hostile_templates_end_in_one_line_quickly():
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(HOSTILE), capture_output=True, text=True,
                       timeout=240)
    results = {name: (result, load_s) for name, result, load_s in map(json.loads, p.stdout.splitlines())}
    assert set(results) == set(HOSTILE), p.stderr[-2000:]
    for name, (result, load_s) in results.items():
        assert result.startswith("error: chat template"), (name, result)
        assert "\n" not in result
        assert load_s is not None and load_s < 1.0, (name, load_s)  # nothing compiled at load


def test_time_limit_stops_a_render_and_the_template_stays_usable():
    t = ChatTemplate("{% if messages[0].content == 'spin' %}{% for i in range(100000) %}{% for j in range(100000) %}"
                     "{% endfor %}{% endfor %}{% endif %}ok", time_limit=0.5)
    with pytest.raises(ChatTemplateError, match="too long"):
        t.render([{"role": "user", "content": "spin"}])
    assert t.render([{"role": "user", "content": "x"}]) == "ok"  # the next render gets a fresh deadline


def test_compiling_folds_nothing_the_limits_must_see():
    # Jinja folds constant expressions while compiling: a folded `10**(10**9)` would run at compile time, out of
    # reach of any render-time check. Intercepted operators are never folded, and a filter that refuses is left
    # to render time.
    t = ChatTemplate("{{ 2**3 }}{{ 'ab'*2 }}{{ '%3d' % 7 }}{{ 'a' + 'b' }}{{ 'a'|center(1000000000) }}")
    env, _ = t._compiled()
    code = env.compile(t.source, raw=True)
    assert code.count("environment.call_binop(") == 4
    assert "center" in code
    with pytest.raises(ChatTemplateError, match="center"):
        t.render([])
    assert ChatTemplate("{{ 2**3 }}{{ 'ab'*2 }}{{ '%3d' % 7 }}{{ 'a' + 'b' }}").render([]) == "8abab  7ab"


def test_bounded_operations_still_work_at_normal_sizes():
    src = ("{{ 2**10 }}|{{ 'ab'*3 }}|{{ [1, 2] + [3] }}|{{ 'a' ~ 1 }}|{{ 'x'|center(5) }}|{{ 'a-b'|replace('-', '+') }}"
           "|{{ ['a', 'b']|join(',') }}|{{ '%3d'|format(7) }}|{{ '{:>3}'.format(7) }}|{{ ', '.join(['p', 'q']) }}"
           "|{% for i in range(3) %}{{ loop.index }}/{{ loop.length }}{% endfor %}|{{ [1, 2, 3]|batch(2)|list }}"
           "|{{ 'a\tb'.expandtabs(2) }}|{{ messages|tojson(indent=1)|length > 0 }}")
    assert ChatTemplate(src).render([{"role": "user", "content": "x"}]) == (
        "1024|ababab|[1, 2, 3]|a1|  x  |a+b|a,b|  7|  7|p, q|1/32/33/3|[[1, 2], [3]]|a b|True")


@pytest.mark.parametrize("value", [5, ["{{ x }}"], 2.5])
def test_chat_template_that_is_not_a_string(value):
    with pytest.raises(ChatTemplateError, match="must be a string"):
        ChatTemplate.from_metadata({"tokenizer.chat_template": value})


@pytest.mark.parametrize("bos", ["1", 1.5, [1]])
def test_bos_id_of_the_wrong_type(bos):
    from edgeq.errors import ModelError

    meta = {"tokenizer.chat_template": "{{ bos_token }}", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.bos_token_id": bos}
    with pytest.raises(ModelError, match="bos_token_id must be an integer"):
        ChatTemplate.from_metadata(meta)


def test_bos_id_out_of_range_is_ignored():
    meta = {"tokenizer.chat_template": "[{{ bos_token }}]", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.bos_token_id": 7}
    assert ChatTemplate.from_metadata(meta).render([]) == "[]"
