"""Request and response bodies of the service (pydantic), so the OpenAPI schema describes exactly
what is accepted and returned. OpenAI-compatible bodies follow vLLM's conventions: unknown fields
are ignored, RAG fields (`documents`, `doc_ids`, `retrieval`, `cache`) come in the body's extras."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chunkcache.engine import TEXT_CHAR, names_taking, spec_forms, spec_pattern


def _no_surrogates(value: Any) -> Any:
    """JSON may carry lone UTF-16 surrogates (\\ud800) that no tokenizer can encode: refuse them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text holds an unpaired UTF-16 surrogate; send valid Unicode") from None
    elif isinstance(value, dict):
        for item in value.values():
            _no_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            _no_surrogates(item)
    return value


@functools.cache
def _int_fields(model: type[BaseModel]) -> frozenset[str]:
    fields = set()
    for name, info in model.model_fields.items():
        kinds = set(get_args(info.annotation)) or {info.annotation}
        if int in kinds and float not in kinds:
            fields.add(name)
    return frozenset(fields)


class _Checked(BaseModel):
    # strict: a boolean is not a number, a string not a boolean (JSON's types as the schema says)
    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        """Valid Unicode only; and a whole float (64.0) where an integer is asked is that integer,
        as JSON Schema counts it (booleans and strings stay refused: strict mode)."""
        data = _no_surrogates(data)
        if isinstance(data, dict):
            ints = _int_fields(cls)
            data = {k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}
        return data


class _Strict(_Checked):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Lenient(_Checked):
    model_config = ConfigDict(extra="ignore", strict=True)  # OpenAI clients send fields we do not use


class DocumentIn(_Strict):
    id: str | None = Field(None, max_length=512, description="your id for it; default doc-N")
    text: str = Field(..., min_length=1, pattern=TEXT_CHAR,
                      description="one chunk: its KV cache is stored and reused as a unit")


STRATEGY_DOC = (f"fusion strategy spec NAME[:VALUE][:KEY=VALUE...]: {spec_forms()}, "
                "with parameters as in `cacheblend:0.15:spread_v=0.5`; "
                "`chunkcache strategies` lists them (default: the server's). The pattern states NAME[:VALUE]; "
                ":KEY=VALUE parameters are accepted beyond it, checked by the strategy")


RetrievalMode = Literal["dense", "lexical", "hybrid"]
MODE_DOC = ("dense (faiss), lexical (BM25) or hybrid (both, rank-fused); default: the server's "
            "setting retrieval")


class Retrieval(_Strict):
    top_k: int = Field(5, ge=1, le=100)
    mode: RetrievalMode | None = Field(None, description=MODE_DOC)


# recompute_ratio only beside a strategy that has it (or none: the server's default)
_RATIO_RULE = {"if": {"required": ["recompute_ratio"], "properties": {"recompute_ratio": {"type": "number"}}},
               "then": {"properties": {"strategy": {"anyOf": [
                   {"type": "null"}, {"type": "string", "pattern": "^(?:(?:" + "|".join(names_taking("recompute_ratio")) + ")(?::|$)|$)"}]}}}}


class CacheOptions(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_RATIO_RULE)

    strategy: str | None = Field(None, description=STRATEGY_DOC, json_schema_extra={"pattern": spec_pattern()})
    recompute_ratio: float | None = Field(None, ge=0.0, le=1.0)


_SOURCES = ("documents", "doc_ids", "retrieval")


class RagExtras(_Lenient):
    model_config = ConfigDict(json_schema_extra={"not": {"anyOf": [  # at most one source of chunks
        {"required": [a, b]} for i, a in enumerate(_SOURCES) for b in _SOURCES[i + 1 :]]}})

    documents: list[DocumentIn] | None = Field(None, description="chunks to answer from, in order")
    doc_ids: list[str] | None = Field(None, description="documents of the server's index to answer from")
    retrieval: Retrieval | None = Field(None, description="retrieve top_k chunks from the server's index")
    cache: CacheOptions | None = None

    @model_validator(mode="after")
    def _one_source(self) -> RagExtras:
        given = [n for n in _SOURCES if n in self.model_fields_set]  # present, even as null: as the schema says
        if len(given) > 1:
            raise ValueError(f"give one of documents, doc_ids or retrieval, not {' and '.join(given)}")
        return self


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


Stop = Annotated[str, Field(max_length=256)]
_REFUSED = ("logprobs", "top_logprobs", "tools", "logit_bias", "suffix", "echo")


class ResponseFormat(_Lenient):
    type: Literal["text"] = "text"


class _Sampling(RagExtras):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # any integer (taken modulo 2**63): bounds near 2**63 are not exact in JSON's doubles
    seed: int | None = Field(None, description="any integer; the same seed samples the same answer")
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = Field(
        None, description="up to 4 sequences of up to 256 characters")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI fields chunkcache does not offer: accepted only in their "off" form, so that a client
    # asking for them gets a clear refusal (see _supported) instead of an answer lacking them.
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    tools: list[Any] | None = Field(None, max_length=0)
    tool_choice: Literal["none"] | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0)
    frequency_penalty: float | None = Field(None, ge=0, le=0)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = Field(None, max_length=0)

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: Any) -> Any:
        """Name every unsupported feature asked for in one message (before the fields' own checks)."""
        if not isinstance(data, dict):
            return data
        for name, kind in (("logprobs", bool), ("echo", bool), ("top_logprobs", int)):
            value = data.get(name)
            if value is not None and type(value) is not kind:  # a Literal would take 0 for False
                raise ValueError(f"{name} takes {'true or false' if kind is bool else 'an integer'}")
        refused = [name for name in _REFUSED if data.get(name)]
        refused += [n for n in ("presence_penalty", "frequency_penalty") if data.get(n) not in (None, 0, 0.0)]
        if data.get("best_of") not in (None, 1):
            refused.append("best_of")
        if data.get("tool_choice") not in (None, "none"):
            refused.append("tool_choice")
        fmt = data.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
            refused.append("response_format")
        if refused:
            raise ValueError(f"not supported by chunkcache: {', '.join(refused)}")
        stop = data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if len(stops) > 4 or any(isinstance(x, str) and len(x) > 256 for x in stops):
            raise ValueError("stop takes at most 4 sequences of at most 256 characters")
        return data


_HAS_TEXT = TEXT_CHAR  # at least one character that is not white space
_QUESTION = {"contains": {  # some user message with text: the question (the last such one)
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"const": "user"}, "content": {"anyOf": [
        {"type": "string", "pattern": _HAS_TEXT},
        {"type": "array", "contains": {"type": "object", "required": ["text"],
                                       "properties": {"text": {"type": "string", "pattern": _HAS_TEXT}}}}]}}}}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, json_schema_extra=_QUESTION)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(pattern=_HAS_TEXT)] | Annotated[
        list[Annotated[str, Field(pattern=_HAS_TEXT)]], Field(min_length=1, max_length=1)] = Field(
        ..., description="the question (one prompt per request)")
    max_tokens: int | None = Field(16, ge=1)
    echo: Literal[False] = Field(False, description="not supported: the prompt is the question, not a text to continue")


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class Reference(BaseModel):
    doc_id: str
    chunk_id: str
    score: float | None = None
    text: str
    retrievers: dict[str, int] | None = Field(
        None, description="the retrievers (dense, lexical) that found the chunk, and its rank in each")


class CacheReport(BaseModel):
    hit_chunks: int
    miss_chunks: int
    reused_tokens: int
    recomputed_tokens: int
    tier_hits: dict[str, int]


class Timings(BaseModel):
    retrieve_s: float
    load_s: float
    blend_s: float
    ttft_s: float
    total_s: float


class RagInfo(BaseModel):
    references: list[Reference]
    cache: CacheReport
    timings: Timings
    strategy: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _Choice(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatChoice(_Choice):
    message: AssistantMessage


class CompletionChoice(_Choice):
    text: str


class _Reply(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage
    chunkcache: RagInfo


class ChatCompletion(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class Completion(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class RagAnswerRequest(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_RATIO_RULE)

    query: str = Field(..., min_length=1, pattern=_HAS_TEXT)
    documents: list[DocumentIn] | None = None
    top_k: int | None = Field(None, ge=1, le=100)
    retrieval: RetrievalMode | None = Field(None, description=MODE_DOC)
    strategy: str | None = Field(None, description=STRATEGY_DOC, json_schema_extra={"pattern": spec_pattern()})
    recompute_ratio: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False


class RagAnswer(BaseModel):
    answer: str
    references: list[Reference]
    usage: Usage
    cache: CacheReport
    timings: Timings
    strategy: str
    finish_reason: Literal["stop", "length"]


class RetrieveRequest(_Strict):
    query: str = Field(..., min_length=1, pattern=_HAS_TEXT)
    top_k: int = Field(5, ge=1, le=100)
    retrieval: RetrievalMode | None = Field(None, description=MODE_DOC)


class RetrieveResponse(BaseModel):
    results: list[Reference]


class DocumentsRequest(_Strict):
    documents: list[DocumentIn] = Field(..., min_length=1)
    precompute: bool = Field(True, description="also compute and store every new chunk's KV cache")


class Job(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    created: int
    result: dict[str, int] | None = None  # counts so far; final once done
    error: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chunkcache"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    queued: int
    index: bool


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


def state_limits(schema: dict[str, Any], max_tokens: int, max_documents: int, max_document_chars: int) -> None:
    """Write the server's configured limits into its OpenAPI ``schema`` (in place), so a request
    the schema allows is one the server accepts: new tokens, documents per request, characters
    per document."""
    bounds = {"max_tokens": ("maximum", max_tokens), "max_completion_tokens": ("maximum", max_tokens),
              "documents": ("maxItems", max_documents)}
    for name, component in schema.get("components", {}).get("schemas", {}).items():
        props = component.get("properties", {})
        for field, (key, value) in bounds.items():
            if field in props:
                for branch in props[field].get("anyOf", [props[field]]):
                    if branch.get("type") in ("integer", "array"):
                        branch[key] = value
        if name == "DocumentIn" and "text" in props:
            props["text"]["maxLength"] = max_document_chars
