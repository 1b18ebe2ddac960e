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
    with pytest.raises(ChatTemplateError, match="syntax error"):
        ChatTemplate("{% for m in messages %}{{ m }")
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% if x %}never closed")


def test_rich_objects_reach_the_template_as_plain_data():
    class Rich(str):
        def danger(self):
            raise AssertionError("called")

    out = ChatTemplate("{{ messages[0].content }}|{{ messages[0].content.danger is defined }}|{{ obj }}").render(
        [{"role": "user", "content": Rich("hi")}], obj=object())
    assert out == "hi|False|<object>"
