"""Reading tool calls out of model text, and the grammar that forces one (no model needed)."""
import pytest

from edgeq.runtime.tool_calls import call_schema, forced_call_grammar, parse_tool_calls, tool_style

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_style_is_read_from_the_template():
    assert tool_style("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert tool_style("{% if tools %}<|python_tag|>{% endif %}") == "llama3"
    assert tool_style("{{ messages }}") is None
    assert tool_style(None) is None


def test_hermes_calls_parse_with_text_before_them():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                      ("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("text", [
    "no call here",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',          # cut off
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',              # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',               # arguments not an object
])
def test_malformed_calls_are_not_calls(text):
    assert parse_tool_calls(text, "hermes") is None


def test_llama3_calls():
    _, calls = parse_tool_calls('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', "llama3")
    assert calls[0].name == "get_weather" and calls[0].arguments == {"city": "Rome"}
    assert parse_tool_calls("The weather is fine.", "llama3") is None


@pytest.fixture(scope="module")
def vocab(smollm2_path):
    from edgeq.formats.gguf_file import GGUFFile
    from edgeq.runtime.grammar import GrammarVocab
    from edgeq.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(GGUFFile(smollm2_path))
    return tok, GrammarVocab(tok, tok.vocab_size)


def _accepts(vocab, grammar, text) -> bool:
    """Whether the constraint lets `text`'s tokens through, one by one, and then allows the end."""
    from edgeq.runtime.grammar import Constraint

    tok, v = vocab
    c = Constraint(v, grammar)
    for t in tok.encode(text, add_special=False, parse_special=False):
        if not c.allowed()[t]:
            return False
        c.consume(t)
    return c.accepting


def test_forced_grammar_admits_exactly_a_valid_call(vocab):
    from edgeq.runtime.grammar import lark_grammar

    assert call_schema([TOOL], "hermes")["properties"]["name"] == {"const": "get_weather"}
    g = lark_grammar(forced_call_grammar([TOOL], "hermes"))
    assert _accepts(vocab, g, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>')
    assert not _accepts(vocab, g, '<tool_call>\n{"name":"get_time","arguments":{"city":"Paris"}}\n</tool_call>')
    assert not _accepts(vocab, g, '<tool_call>\n{"name":"get_weather","arguments":{}}\n</tool_call>')
    assert not _accepts(vocab, g, 'Sure! <tool_call>')
    with pytest.raises(Exception):
        forced_call_grammar([], "hermes")


def test_json_schema_constraint(vocab):
    from edgeq.runtime.grammar import GrammarError, json_schema_grammar

    g = json_schema_grammar({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                             "additionalProperties": False})
    assert _accepts(vocab, g, '{"n":42}')
    assert not _accepts(vocab, g, '{"n":"x"}')
    assert not _accepts(vocab, g, '{"n":4')            # incomplete: not accepting yet
    with pytest.raises(GrammarError):
        json_schema_grammar({"type": "bogus"})
