"""Chat templates (`tokenizer.chat_template`): Jinja2 in a sandbox, with Hugging Face's semantics.

A template comes with the model file, so it is untrusted code: it runs in jinja2's
ImmutableSandboxedEnvironment, sees only plain JSON-like data, and any attempt to reach Python internals
(`''.__class__`, `cycler.__init__.__globals__`...) ends in ChatTemplateError. The environment matches what
`transformers` gives templates (trim_blocks, lstrip_blocks, loopcontrols, raise_exception, strftime_now,
a tojson that keeps non-ASCII text), so a template renders here as it does in `apply_chat_template`.

It is also bounded: the template is compiled on first render (Jinja folds constants while compiling, so a
hostile `{{ 10**(10**9) }}` must not run at model load), powers, repeats and concatenations that would build
huge numbers or strings are refused before they are computed, every loop and call checks a render deadline,
and the output has a size cap. Each of these ends in one ChatTemplateError line.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from typing import Any

from edgeq.errors import EdgeqError

MAX_SOURCE_CHARS = 1 << 20   # real templates are a few KB; tool-calling ones reach ~50 KB
MAX_TEXT_CHARS = 8 << 20     # any string or list the template builds, and the rendered output
MAX_INT_BITS = 1 << 16       # integers beyond this are no use to a chat template
MAX_RANGE = 100_000          # jinja's own sandbox limit for range()
TIME_LIMIT_S = 5.0           # one render; real templates take milliseconds
_CHECK_EVERY = 256           # loop iterations between deadline checks


class ChatTemplateError(EdgeqError):
    """The chat template is broken, unsafe, or refused the conversation (raise_exception)."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


class _TemplateRaised(Exception):
    """What raise_exception() throws inside the template; becomes ChatTemplateError with the same text."""


class _TemplateLimit(Exception):
    """A template went past a size or time limit; becomes ChatTemplateError with the same text."""


def _size(x: Any, limit: int = MAX_TEXT_CHARS) -> int:
    """Characters and items in a value, nested lists and dicts counted in full (the same string repeated by
    reference counts each time, as it would when printed); stops counting past `limit`."""
    total, stack = 0, [x]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            total += 1
    return total


def _check_size(n: int, what: str) -> None:
    if n > MAX_TEXT_CHARS:
        raise _TemplateLimit(f"{what} would make {n:,} characters or items (limit {MAX_TEXT_CHARS:,})")


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int):
        _check_size(width, what)


def _range(*args):
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:  # more items than a C ssize_t
        n = MAX_RANGE + 1
    if n > MAX_RANGE:
        raise _TemplateLimit(f"range() of more than {MAX_RANGE:,} items")
    return r


_PERCENT_SPEC = None


def _check_format_string(fmt: str, args, kwargs) -> None:
    """Widths and precisions written in a format string ('%9999999s', '{:>9999999}') or passed as '*'."""
    import re

    global _PERCENT_SPEC
    if _PERCENT_SPEC is None:
        _PERCENT_SPEC = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?|\{[^{}]*:[^{}]*?(\d+)")
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*":
                raise _TemplateLimit("'*' widths are not allowed in format strings")
            if g is not None and len(g) > 7:
                raise _TemplateLimit("format width too large")
            if g is not None:
                _check_width(int(g), "a format width")
    for v in (*args, *kwargs.values()):  # nested '{:{}}' widths come from the arguments
        if "{" in fmt:
            _check_width(v, "a format width")


def _check_str_method(s: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Refuse str methods whose result would be huge; the (possibly materialized) arguments to call with."""
    if name in ("center", "ljust", "rjust", "zfill"):
        _check_width(args[0] if args else kwargs.get("width", 0), f"str.{name}")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _check_size(len(s) * max(size, 1), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = s.count(args[0]) if args[0] else len(s) + 1
        _check_size(len(s) + hits * len(args[1]), "str.replace")
    elif name == "join" and args:
        items = list(args[0]) if not isinstance(args[0], (str, dict)) else args[0]
        _check_size(_size(items) + len(s) * len(items), "str.join")
        args = (items, *args[1:])
    elif name in ("format", "format_map"):
        _check_format_string(s, args, kwargs)
    elif name in ("translate", "maketrans"):
        raise _TemplateLimit(f"str.{name} is not allowed")
    return args


def _bounded_filters(filters: dict) -> None:
    """Wrap jinja's filters that can make an output far larger than their input, checking before they run."""

    def wrap(name, check):
        orig = filters[name]

        def bounded(*args, **kwargs):
            k = 1 if hasattr(orig, "jinja_pass_arg") else 0  # eval_ctx/context comes first
            args = args[:k] + check(*args[k:], **kwargs)
            return orig(*args, **kwargs)

        if hasattr(orig, "jinja_pass_arg"):
            bounded.jinja_pass_arg = orig.jinja_pass_arg
        filters[name] = bounded

    def center(value, width=80, *rest, **kw):
        _check_width(width, "center")
        return (value, width, *rest)

    def indent(s, width=4, *rest, **kw):
        per_line = width if isinstance(width, int) else len(str(width))
        _check_size(len(str(s)) + (str(s).count("\n") + 1) * max(per_line, 0), "indent")
        return (s, width, *rest)

    def format_(value, *args, **kwargs):
        _check_format_string(str(value), args, kwargs)
        return (value, *args)

    def join(value, *rest, **kw):
        items = list(value) if not isinstance(value, (str, dict)) else value
        sep = rest[0] if rest else kw.get("d", "")
        _check_size(_size(items) + len(str(sep)) * len(items), "join")
        return (items, *rest)

    def replace(s, old="", new="", *rest, **kw):
        s_, old_, new_ = str(s), str(old), str(new)
        hits = s_.count(old_) if old_ else len(s_) + 1
        _check_size(len(s_) + hits * len(new_), "replace")
        return (s, old, new, *rest)

    def batch_or_slice(value, n=1, *rest, **kw):
        _check_width(n, "batch/slice")
        return (value, n, *rest)

    for name, check in (("center", center), ("indent", indent), ("format", format_), ("join", join),
                        ("replace", replace), ("batch", batch_or_slice), ("slice", batch_or_slice)):
        wrap(name, check)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters and forces ASCII; templates expect plain json.dumps
    _check_width(indent, "tojson indent")
    _check_size(_size(x) * (1 + (len(indent) if isinstance(indent, str) else indent or 0)), "tojson")
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
        # jinja never folds an intercepted operator at compile time (it calls call_binop when rendering), and
        # folds a filter only if the filter returns: so nothing below runs unchecked while compiling
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self, **kw):
            super().__init__(**kw)
            self._local = threading.local()

        def unsafe_undefined(self, obj, attribute):
            # jinja's sandbox quietly renders a forbidden attribute as undefined; a template that tries one is
            # hostile or broken either way, so stop it
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} is not allowed")

        # -- time
        def start_clock(self, seconds: float) -> None:
            self._local.deadline = time.monotonic() + seconds

        def check_deadline(self) -> None:
            deadline = getattr(self._local, "deadline", None)  # None while compiling: nothing runs then
            if deadline is not None and time.monotonic() > deadline:
                raise _TemplateLimit("rendering took too long")

        def guard_iter(self, iterable):
            """Every for loop iterates through this (see _parse), so nested loops cannot run forever."""
            for i, x in enumerate(iterable):
                if i % _CHECK_EVERY == 0:
                    self.check_deadline()
                yield x

        # -- size
        def call_binop(self, context, operator, left, right):
            if operator == "**" and type(left) is int and type(right) is int and right > 0 and abs(left) > 1:
                if (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
                    raise _TemplateLimit(f"{left} ** {right} is too large")
            elif operator == "*":
                if type(left) is int and type(right) is int:
                    if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                        raise _TemplateLimit("product is too large")
                elif isinstance(left, int) or isinstance(right, int):
                    seq, n = (right, left) if isinstance(left, int) else (left, right)
                    _check_size(_size(seq) * max(int(n), 0), "a repeat")
            elif operator == "+":
                _check_size(_size(left) + _size(right), "a concatenation")
            elif operator == "%" and isinstance(left, str):
                _check_format_string(left, right if isinstance(right, tuple) else (right,), {})
            return super().call_binop(context, operator, left, right)

        def bounded_concat(self, *parts):
            """`a ~ b` (see _parse): the parts' total size is checked before the string is built."""
            strs = [p if isinstance(p, str) else str(p) for p in parts]
            _check_size(sum(map(len, strs)), "a concatenation")
            return "".join(strs)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            __self.check_deadline()
            # the sandbox hands out str.format as a wrapper around the bound method
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(owner, str):  # str methods that can make a string far larger than their inputs
                args = _check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        # -- every for loop and every `~` go through the guards above
        def _parse(self, source, name, filename):
            return _Guard().visit(super()._parse(source, name, filename))

    class _Guard(jinja2.visitor.NodeTransformer):
        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = _call("guard_iter", [node.iter], node.lineno)
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return _call("concat", node.nodes, node.lineno)

    class Limits(jinja2.ext.Extension):
        """Holds the guards that the rewritten loops and `~` call (no name a template could reach)."""

        def guard_iter(self, iterable):
            return self.environment.guard_iter(iterable)

        def concat(self, *parts):
            return self.environment.bounded_concat(*parts)

    def _call(method, args, lineno):
        fn = jinja2.nodes.ExtensionAttribute(Limits.identifier, method)
        return jinja2.nodes.Call(fn, list(args), [], None, None).set_lineno(lineno)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, Limits, jinja2.ext.loopcontrols])
    env.globals["range"] = _range
    _bounded_filters(env.filters)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = Namespace
    return env


class ChatTemplate:
    """A model's chat template: `render(messages)` gives the prompt text (special tokens written as text).

    The source is compiled on the first render, so a broken or hostile template costs nothing at model load
    and only fails (one ChatTemplateError line) where a chat is rendered."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", time_limit: float = TIME_LIMIT_S):
        if not isinstance(source, str):
            raise ChatTemplateError(f"tokenizer.chat_template must be a string, not {_kind(source)}")
        if len(source) > MAX_SOURCE_CHARS:
            raise ChatTemplateError(f"chat template of {len(source):,} characters is too long "
                                    f"(limit {MAX_SOURCE_CHARS:,})")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.time_limit = time_limit
        self._env = None
        self._template = None
        self._lock = threading.Lock()

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "ChatTemplate | None":
        """The template in GGUF metadata (`tokenizer.chat_template`), or None when the file has none."""
        from edgeq.runtime.tokenizer import special_token_id, token_list

        source = meta.get("tokenizer.chat_template")
        if source is None or (isinstance(source, str) and not source):
            return None
        tokens = token_list(meta) if "tokenizer.ggml.tokens" in meta else []

        def text(key):
            i = special_token_id(meta, key, len(tokens))
            return tokens[i] if i is not None else ""

        return cls(source, text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"))

    @classmethod
    def from_gguf(cls, gf) -> "ChatTemplate | None":
        return cls.from_metadata(gf.metadata)

    def _compiled(self):
        import jinja2

        with self._lock:
            if self._template is None:
                env = _environment()
                try:
                    self._template = env.from_string(self.source)
                except jinja2.TemplateSyntaxError as e:
                    raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {_short(e.message)}") \
                        from None
                except jinja2.TemplateError as e:
                    raise ChatTemplateError(f"chat template error: {_short(e)}") from None
                except (RecursionError, MemoryError):
                    raise ChatTemplateError("chat template is too deeply nested to compile") from None
                self._env = env
            return self._env, self._template

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The conversation as the template writes it; `extra` (tools, documents...) are template variables."""
        import jinja2

        env, template = self._compiled()
        variables = {"tools": None, "documents": None, "bos_token": self.bos_token, "eos_token": self.eos_token}
        variables.update(_plain(extra))
        variables["messages"] = _plain(list(messages))
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        env.start_clock(self.time_limit)
        try:
            out, size = [], 0
            for piece in template.generate(**variables):  # streamed, so the size cap holds on the output too
                size += len(piece)
                _check_size(size, "the rendered prompt")
                env.check_deadline()
                out.append(piece)
            return "".join(out)
        except _TemplateRaised as e:
            raise ChatTemplateError(f"chat template refused the conversation: {_short(e)}") from None
        except _TemplateLimit as e:
            raise ChatTemplateError(f"chat template stopped: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"chat template tried an unsafe operation: {_short(e)}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {_short(e)}") from None
        except RecursionError:
            raise ChatTemplateError("chat template stopped: recursion too deep") from None
        except MemoryError:
            raise ChatTemplateError("chat template stopped: out of memory") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {_short(e)}") from None
        finally:
            env.start_clock(float("inf"))


def _short(e: Any, limit: int = 200) -> str:
    """An error's text on one line, cut: hostile templates choose their own messages."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else "an array" if hasattr(value, "dtype") else type(value).__name__
