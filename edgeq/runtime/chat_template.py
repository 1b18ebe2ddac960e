"""Chat templates (`tokenizer.chat_template`): Jinja2 in a sandbox, with Hugging Face's semantics.

A template comes with the model file, so it is untrusted code: it runs in jinja2's
ImmutableSandboxedEnvironment, sees only plain JSON-like data, and any attempt to reach Python internals
(`''.__class__`, `cycler.__init__.__globals__`...) ends in ChatTemplateError. The environment matches what
`transformers` gives templates (trim_blocks, lstrip_blocks, loopcontrols, raise_exception, strftime_now,
a tojson that keeps non-ASCII text), so a template renders here as it does in `apply_chat_template`.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from edgeq.errors import EdgeqError


class ChatTemplateError(EdgeqError):
    """The chat template is broken, unsafe, or refused the conversation (raise_exception)."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


class _TemplateRaised(Exception):
    """What raise_exception() throws inside the template; becomes ChatTemplateError with the same text."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters and forces ASCII; templates expect plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """A copy of `value` made of plain JSON types only, so the template cannot call methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # no underscore attributes on namespaces: no way to store or reach dunders through them
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            # jinja's sandbox quietly renders a forbidden attribute as undefined; a template that tries one is
            # hostile or broken either way, so stop it
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} is not allowed")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = Namespace
    return env


class ChatTemplate:
    """A model's chat template: `render(messages)` gives the prompt text (special tokens written as text)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        import jinja2

        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "ChatTemplate | None":
        """The template in GGUF metadata (`tokenizer.chat_template`), or None when the file has none."""
        source = meta.get("tokenizer.chat_template")
        if not source:
            return None
        tokens = meta.get("tokenizer.ggml.tokens") or ()

        def text(key):
            i = meta.get(key)
            return tokens[i] if i is not None and 0 <= int(i) < len(tokens) else ""

        return cls(source, text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"))

    @classmethod
    def from_gguf(cls, gf) -> "ChatTemplate | None":
        return cls.from_metadata(gf.metadata)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The conversation as the template writes it; `extra` (tools, documents...) are template variables."""
        import jinja2

        variables = {"tools": None, "documents": None, "bos_token": self.bos_token, "eos_token": self.eos_token}
        variables.update(_plain(extra))
        variables["messages"] = _plain(list(messages))
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return self._template.render(**variables)
        except _TemplateRaised as e:
            raise ChatTemplateError(f"chat template refused the conversation: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
