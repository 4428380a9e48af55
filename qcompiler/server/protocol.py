"""The OpenAI request bodies the server takes, validated into engine ``SamplingParams``.

Fields follow OpenAI's completions and chat completions APIs plus vLLM's extensions (``top_k``,
``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens``; ``use_beam_search`` with
``n`` as the beam width, ``length_penalty``, ``early_stopping``). A field outside them
is accepted only at its default (None, false, 0, empty: clients send defaults for many fields);
any other value is a 400 that names it."""
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qcompiler.runtime.beam_search import BeamSearchParams
from qcompiler.runtime.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 16


class APIError(Exception):
    """An error the client caused (or a 5xx the server owns), as OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _at_default(v: Any) -> bool:
    return v is None or v is False or v == 0 or v in ("", [], {}, "auto", "none", "text") or v == {"type": "text"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extensions
    top_k: Optional[int] = Field(None, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    min_tokens: int = Field(0, ge=0)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False

    @model_validator(mode="after")
    def _unsupported(self):
        for name, value in (self.model_extra or {}).items():
            if not _at_default(value):
                raise ValueError(f"field {name!r} is not supported (only its default is accepted)")
        return self

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v):
        if v is not None and set(v) - {"include_usage", "continuous_usage_stats"}:
            raise ValueError(f"stream_options takes include_usage; got {sorted(v)}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))

    def sampling_params(self, max_tokens: int, logprobs: Optional[int], prompt_logprobs: Optional[int] = None,
                        vocab_size: Optional[int] = None) -> Union[SamplingParams, BeamSearchParams]:
        if self.use_beam_search:
            return self.beam_search_params(max_tokens, logprobs, prompt_logprobs)
        bias = {}
        for k, v in (self.logit_bias or {}).items():
            try:
                t = int(k)
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {k!r}", param="logit_bias")
            if vocab_size is not None and not 0 <= t < vocab_size:
                raise APIError(400, f"logit_bias token id {t} outside the vocabulary [0, {vocab_size})",
                               param="logit_bias")
            if not -100 <= v <= 100:
                raise APIError(400, f"logit_bias values must be in [-100, 100], got {v}", param="logit_bias")
            bias[t] = v
        if self.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({self.min_tokens}) must be at most max_tokens ({max_tokens})",
                           param="min_tokens")
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(0, self.top_k or 0), top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
            stop=tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, n=self.n,
            min_tokens=self.min_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=bias, logprobs=logprobs, prompt_logprobs=prompt_logprobs)


    def beam_search_params(self, max_tokens: int, logprobs: Optional[int],
                           prompt_logprobs: Optional[int]) -> BeamSearchParams:
        """Beam search is deterministic and keeps no per-token log-probs: sampling fields must stay
        at their defaults."""
        sampling = {"temperature": self.temperature or 0, "top_p": (self.top_p or 1) != 1, "top_k": self.top_k or 0,
                    "seed": self.seed is not None, "presence_penalty": self.presence_penalty,
                    "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty != 1,
                    "logit_bias": self.logit_bias, "min_tokens": self.min_tokens,
                    "logprobs": logprobs is not None or prompt_logprobs is not None}
        for name, value in sampling.items():
            if value and value != -1:
                raise APIError(400, f"{name} does not apply to beam search (use_beam_search)", param=name)
        return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, length_penalty=self.length_penalty,
                                early_stopping=self.early_stopping, ignore_eos=self.ignore_eos,
                                stop=tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()),
                                stop_token_ids=tuple(self.stop_token_ids or ()))


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if (isinstance(v, str) and not v) or (isinstance(v, list) and (not v or any(
                isinstance(p, (str, list)) and not p for p in v))):
            raise ValueError("prompt is empty")
        return v

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIError(400, f"content part of type {part.get('type')!r} is not supported: text only",
                               param="messages")
            parts.append(TextPart(**part).text)
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self
