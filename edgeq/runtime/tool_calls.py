"""Tool calls in the two text conventions chat templates teach models, read back into structured calls.

- "hermes" (Qwen2.5, Qwen3, Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per
  call, after optional text.
- "llama3" (Llama 3.1-3.3): the whole reply is one JSON object `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`.

The style is read from the template source (what it tells the model to write). A reply that does not parse is
left as text: the caller returns it as content, never drops it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edgeq.errors import EdgeqError

_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)


@dataclass
class ToolCall:
    name: str
    arguments: dict


def tool_style(template_source: str | None) -> str | None:
    """"hermes", "llama3", or None when the template does not render tools."""
    if not template_source or "tools" not in template_source:
        return None
    if "<tool_call>" in template_source:
        return "hermes"
    if "<|python_tag|>" in template_source or "ipython" in template_source or '"parameters"' in template_source:
        return "llama3"
    return None


def parse_tool_calls(text: str, style: str) -> tuple[str, list[ToolCall]] | None:
    """(text before the calls, the calls), or None when `text` holds no well-formed call."""
    if style == "hermes":
        i = text.find("<tool_call>")
        if i < 0:
            return None
        calls = []
        for body in _HERMES_BLOCK.findall(text[i:]):
            call = _call(body, "arguments")
            if call is None:
                return None
            calls.append(call)
        return (text[:i].strip(), calls) if calls else None
    if style == "llama3":
        body = text.strip()
        if body.startswith("<|python_tag|>"):
            body = body[len("<|python_tag|>"):]
        call = _call(body, "parameters") or _call(body, "arguments")
        return ("", [call]) if call else None
    return None


def _call(body: str, args_key: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def call_schema(tools: list[dict], style: str) -> dict:
    """The JSON schema of one call to any of `tools` (OpenAI function tools), in the style's key names."""
    key = "parameters" if style == "llama3" else "arguments"
    options = []
    for t in tools:
        f = t.get("function", t)
        params = f.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": f["name"]}, key: params},
                        "required": ["name", key], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def forced_call_grammar(tools: list[dict], style: str) -> str:
    """A Lark grammar (for runtime.grammar) that admits exactly one well-formed call to one of `tools`."""
    if not tools:
        raise EdgeqError("tool_choice forces a call but no tools were given")
    schema = json.dumps(call_schema(tools, style))
    if style == "hermes":
        return f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {schema}\n'
    return f"start: call\ncall: %json {schema}\n"
