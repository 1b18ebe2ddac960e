"""The wire protocols as data: OpenAI's and ollama's request bodies (pydantic), checked before any work starts.

Strict types (a string is not a number), finite numbers only, bounds as the APIs document them. Unknown
fields are ignored, as OpenAI's own server does, so newer clients keep working.
"""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_BIAS = 1024  # logit_bias entries (OpenAI documents none; llama-server none)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------- OpenAI
class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier reply's thinking (templates decide whether to show it)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type in ("text", "input_text"))


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: dict[str, str]


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by chat and text completions."""
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    top_k: int = Field(default=40, ge=0)  # llama-server's extension and default
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 64)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # token id (a decimal string: JSON object keys) -> a bias added to its logit before sampling, -100 (a ban) to 100
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v):
        if not v:
            return None
        if len(v) > MAX_BIAS:
            raise ValueError(f"at most {MAX_BIAS} entries")
        out = {}
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit()) or len(key) > 9:
                raise ValueError(f"keys must be token ids (decimal integers), not {key[:20]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be between -100 and 100 (got {bias} for token {key})")
            out[int(key)] = bias
        return out

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_LEN} characters")
        return [s for s in stops if s]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    # more chat template variables, as vLLM and llama-server take them: {"enable_thinking": false}
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    response_format: ResponseFormat | None = None


# ---------------------------------------------------------------- ollama
class OllamaOptions(_Body):
    num_ctx: int | None = Field(default=None, ge=1)
    num_predict: int | None = None          # -1: until the context is full
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, lt=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v and (len(v) > MAX_STOP or any(len(s) > MAX_STOP_LEN for s in v)):
            raise ValueError(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_LEN} characters")
        return v


class OllamaToolCallFn(_Body):
    name: str
    arguments: dict[str, Any] = {}


class OllamaToolCall(_Body):
    function: OllamaToolCallFn


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    thinking: str | None = None


class _OllamaBody(_Body):
    model: str = Field(min_length=1, max_length=256)
    stream: bool = True
    format: Union[Literal["", "json"], dict[str, Any], None] = None
    options: OllamaOptions | None = None
    keep_alive: Union[str, int, float, None] = None
    think: Union[bool, str, None] = None


class OllamaChatRequest(_OllamaBody):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Tool] | None = None


class OllamaGenerateRequest(_OllamaBody):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaShowRequest(_Body):
    model: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=256)  # older clients


