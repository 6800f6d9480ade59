"""Request bodies of the OpenAI-compatible API (pydantic), and the OpenAI error body.

Types are strict ("5" is not an integer) and NaN/inf are refused, so a wrongly typed field is a 400
naming it, never a surprise deeper down. Range checks that need the model (context length,
vocabulary) happen in the server and the engine.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from engine.request import MAX_TOP_LOGPROBS

MAX_N = 16  # samples per prompt
MAX_PROMPTS = 64  # prompts per completions call
MAX_DOCUMENTS = 1024  # texts to score or rerank per call



def _integral(value: Any) -> Any:
    """2.0 is the integer 2 (JSON does not tell them apart); "2", 2.5 and true stay wrong."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _int(**bounds) -> Any:
    """An integer field type with bounds (NOTE: Field before the validator, or the schema loses them)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


_Int32 = _int(ge=0, le=2**31 - 1)
_StopString = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[_Int32], Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="with include_usage: every chunk's usage counts the "
                                                            "tokens so far (vLLM's)")


class _SamplingFields(_Body):
    """Fields both endpoints share."""

    model: str
    temperature: float | None = Field(None, ge=0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: _int(ge=-1, le=2**31 - 1) | None = Field(None, description="0 or -1 = off")
    min_p: float | None = Field(None, ge=0, le=1)
    seed: _int(ge=-(2**63), le=2**64 - 1) | None = Field(None, description="with n > 1, sample i uses seed + i")
    stop: _StopString | list[_StopString] | None = None
    n: _int(ge=1, le=MAX_N) = 1
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[_Int32] | None = None
    priority: _int(ge=-(2**31), le=2**31 - 1) = Field(0, description="scheduler.policy priority: lower runs first (vLLM)")
    cache_salt: str | None = Field(None, description="requests with different salts never share cached pages; "
                                                      "an empty salt is no salt")
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100] added to its logit")
    min_tokens: _int(ge=0) | None = Field(None, description="no end token or stop id before this many tokens")
    truncate_prompt_tokens: Literal[-1] | _int(ge=1, le=2**31 - 1) | None = Field(
        None, description="keep only the prompt's last k tokens (vLLM's); -1: as many as fit before max_tokens")
    allowed_token_ids: TokenIds | None = Field(None, description="only these token ids may be sampled (vLLM's)")
    bad_words: list[Annotated[str, Field(pattern=r"\S")]] | None = Field(
        None, description="words never generated (vLLM's)")
    include_stop_str_in_output: bool = Field(False, description="the stop string that ends the output stays in it")
    skip_special_tokens: bool = Field(True, description="false: special tokens the model writes appear in the text")
    return_tokens_as_token_ids: bool = Field(False, description='logprobs name tokens "token_id:<id>" (vLLM\'s)')
    prompt_logprobs: _int(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(
        None, description="each prompt token's logprob and rank, and the k most likely tokens at each position "
                          "(vLLM's: completions in each choice, chat on the response); not with stream")
    return_token_ids: bool = Field(False, description="choices carry their generated token ids, and the response "
                                                      "(completions: each choice) the prompt's (vLLM's)")
    return_hidden_states: bool = Field(False, description="choices (stream chunks) carry each generated token's final "
                                                          "hidden state, [tokens][hidden] (SGLang's)")
    # Structured outputs (one at most): OpenAI's response_format, or vLLM's guided_* fields.
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
    guided_json: dict[str, Any] | str | None = Field(None, description="a JSON schema the output follows")
    guided_regex: str | None = Field(None, description="a regular expression the whole output matches")
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = Field(None, description="the output is one of these")
    guided_grammar: str | None = Field(None, description="a Lark grammar (llguidance's dialect) the output follows")


class CompletionRequest(_SamplingFields):
    prompt: Union[str, TokenIds, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)], None] = None
    prompt_embeds: Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)], None] = Field(
        None, description="in place of prompt (vLLM's; needs model.enable_prompt_embeds): a [tokens, hidden] array of "
                          "input embeddings per prompt, base64 of a safetensors file of one tensor or of a .npy file")
    max_tokens: _int(ge=0) | None = Field(16, description="0 only with echo: the prompt and its logprobs, nothing generated")
    logprobs: _int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    echo: bool = Field(False, description="the prompt before the completion (with logprobs: the prompt's too)")
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str = Field(description="a data: URL (base64), or an http(s) URL the server fetches")
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image is prepared at the model's one size


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # templates may read extra keys (name, tool_calls)

    role: str
    content: str | list[TextPart | ImagePart] | None = None


class FunctionSpec(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of the arguments")


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"auto" when tools are given; a named function or "required" forces valid calls')
    max_tokens: _int(ge=1) | None = Field(None, description="default: the rest of the context")
    max_completion_tokens: _int(ge=1) | None = None
    logprobs: bool = False
    top_logprobs: _int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='variables for the chat template, e.g. {"enable_thinking": false} (Qwen3)')
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="the chat template's `reasoning_effort` (gpt-oss's system message says it); templates "
                          "that do not read it ignore it")
    add_generation_prompt: bool = Field(True, description="end the prompt with the assistant's turn opened")
    continue_final_message: bool = Field(False, description="the last message, an assistant's, is the start of the "
                                                            "reply: the model continues it (no generation prompt)")


class EmbeddingRequest(_Body):
    """POST /v1/embeddings (OpenAI's): last-token pooling of the served model (SamplingParams.embed)."""
    model: str
    input: Union[str, TokenIds, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)],
                 Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: _int(ge=1) | None = Field(None, description="keep the first this many dimensions, normalized again "
                                                            "(Matryoshka-trained models)")
    user: str | None = None
    priority: _int(ge=-(2**31), le=2**31 - 1) = 0
    cache_salt: str | None = None


class ClassifyRequest(_Body):
    """POST /classify (vLLM's): a sequence classifier's (LlamaConfig.num_labels) classes of each input."""
    model: str
    input: Union[str, TokenIds, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)],
                 Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    user: str | None = None
    priority: _int(ge=-(2**31), le=2**31 - 1) = 0
    cache_salt: str | None = None


_Text = Annotated[str, Field(min_length=1)]


class ScoreRequest(_Body):
    """POST /v1/score (vLLM's): each pair's score (engine.scoring: a cross-encoder's relevance, else the cosine
    similarity of the embeddings): one text_1 against each text_2, or text_1[i] against text_2[i]."""
    model: str
    text_1: _Text | Annotated[list[_Text], Field(min_length=1, max_length=MAX_DOCUMENTS)]
    text_2: _Text | Annotated[list[_Text], Field(min_length=1, max_length=MAX_DOCUMENTS)]
    priority: _int(ge=-(2**31), le=2**31 - 1) = 0
    cache_salt: str | None = None


class RerankRequest(_Body):
    """POST /v1/rerank (Jina's and Cohere's, as vLLM serves it): documents by their score against the query (as
    /v1/score's), most relevant first."""
    model: str
    query: _Text
    documents: Annotated[list[_Text], Field(min_length=1, max_length=MAX_DOCUMENTS)]
    top_n: _int(ge=1) | None = Field(None, description="return this many (default: all)")
    return_documents: bool = True
    priority: _int(ge=-(2**31), le=2**31 - 1) = 0
    cache_salt: str | None = None


class TokenizeRequest(_Body):
    """POST /tokenize (vLLM's and SGLang's): a prompt, or chat messages through the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = Field(True, description="with prompt: BOS/EOS as the tokenizer adds them")
    add_generation_prompt: bool = Field(True, description="with messages: end with the assistant's turn opening")
    continue_final_message: bool = Field(False, description="with messages: end inside the last (assistant's) message")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="with messages: variables for the template")
    tools: list[ToolSpec] | None = Field(None, description="with messages: the tools the chat template lists")


class UpdateWeightsRequest(_Body):
    """POST /update_weights_from_disk (SGLang's): serve the weights at `model_path` from now on."""
    model_path: Annotated[str, Field(min_length=1)] = Field(description="a checkpoint of the served architecture: a "
                                                                        "GGUF file, HF safetensors or Orbax directory")
    abort_all_requests: bool = Field(False, description="abort the requests in flight instead of letting them finish")


class LoadAdapterRequest(_Body):
    """POST /v1/load_lora_adapter (vLLM's)."""
    lora_name: Annotated[str, Field(min_length=1)]
    lora_path: Annotated[str, Field(min_length=1)] = Field(description="a PEFT LoRA directory on the server's machine")


class UnloadAdapterRequest(_Body):
    lora_name: Annotated[str, Field(min_length=1)]


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[_Int32]


class ResponsesRequest(_Body):
    """POST /v1/responses (OpenAI's Responses API), run as a chat request (engine/openai_responses.py checks and
    translates `input`, `tools`, `tool_choice` and `text`, refusing what it does not support by name)."""
    model: str
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)] = Field(
        description='a string (one user message), or items: {"role", "content"} messages, function_call and '
                    'function_call_output items')
    instructions: str | None = Field(None, description="a system message before the conversation (not carried over "
                                                       "by previous_response_id)")
    previous_response_id: str | None = Field(None, description="continue this stored response's conversation")
    max_output_tokens: _int(ge=1) | None = Field(None, description="default: the rest of the context")
    temperature: float | None = Field(None, ge=0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    tools: list[dict[str, Any]] | None = Field(None, description='function tools: {"type": "function", "name", '
                                                                 '"description", "parameters"}')
    tool_choice: str | dict[str, Any] | None = Field(None, description='"none", "auto", "required" or {"type": '
                                                                       '"function", "name": ...}')
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = Field(None, description='{"format": {"type": "text" | "json_object" | "json_schema", '
                                                          '...}}')
    store: bool = Field(True, description="keep the response for GET /v1/responses/{id} and previous_response_id")
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = Field(None, description='{"effort": ...}: the chat template\'s reasoning_effort '
                                                               "(as chat's reasoning_effort); echoed")
    background: bool = Field(False, description="made with no client waiting: returned in_progress, polled with GET "
                                                "/v1/responses/{id}, cancelled with POST .../cancel; needs store")
    truncation: Literal["disabled", "auto"] | None = Field(
        None, description='"auto": the oldest turns of a conversation too long for the context are dropped')
    conversation: str | dict[str, Any] | None = None  # refused (previous_response_id keeps conversations here)
    prompt: dict[str, Any] | None = None  # refused (stored prompt templates)
    priority: _int(ge=-(2**31), le=2**31 - 1) = 0
    cache_salt: str | None = None
    include: list[str] | None = Field(None, description='"message.output_text.logprobs": the answer\'s token '
                                                        'logprobs; other values are accepted and ignored')
    top_logprobs: _int(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(None, description="most likely tokens at each "
                                                                            "position of the answer, with logprobs")


class ApiError(Exception):
    """An error answer of the API: an HTTP status and the OpenAI error body's fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers  # of the response (Retry-After)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_UNION_HINTS = {
    "tool_choice": '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
    "prompt": "a non-empty string, a non-empty list of token ids, or a list of those",
    "prompt_embeds": "a base64 string (safetensors or .npy) or a non-empty list of them",
    "stop": "a string or a list of strings",
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
    "input": "a string or a non-empty list of input items",
}


def _is_union_tag(x) -> bool:
    """pydantic names union branches in `loc` ("str", "constrained-str", "list[str]", "TextPart"); fields are snake_case."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x or "-" in x or x[:1].isupper())


def describe_validation_error(errors) -> tuple[str, str | None]:
    """First pydantic error -> ("field.path: what is wrong", top-level field)."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [x for x in e.get("loc", ()) if x not in ("body", "query")]
    tag = next((i for i, x in enumerate(loc) if _is_union_tag(x)), None)
    if tag is not None:  # a value no branch of a union accepted: say what the field takes
        path = loc[:tag]
        field = next((x for x in reversed(path) if isinstance(x, str)), "")
        where = ".".join(map(str, path))
        return f"{where}: expected {_UNION_HINTS.get(field, 'a value of another type')}", (path[0] if path else None)
    where = ".".join(map(str, loc))
    if not loc and e.get("type") in ("missing", "model_attributes_type", "dict_type"):
        return "request body must be a JSON object", None
    msg = "required field is missing" if e.get("type") == "missing" else e.get("msg", "invalid value")
    return (f"{where}: {msg}" if where else msg), (str(loc[0]) if loc else None)


def sse_event(event: dict) -> str:
    """One server-sent event named by its `type` (the Responses and Anthropic Messages streams)."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


def chat_template_call(body: ChatCompletionRequest | TokenizeRequest) -> tuple[list[dict], dict[str, Any]]:
    """(messages, keyword arguments) of the chat template call that renders a chat request's prompt: its messages as
    templates read them, its tools, `reasoning_effort`, `chat_template_kwargs` and how the prompt ends. The server
    renders with these, and the router (engine/router/forward.py) hashes the same tokens."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    effort = getattr(body, "reasoning_effort", None)
    kwargs = {**({"reasoning_effort": effort} if effort else {}), **(body.chat_template_kwargs or {}),
              **({"tools": tools} if tools else {}), **_generation_prompt(body)}
    return template_messages(body.messages), kwargs


def _generation_prompt(body) -> dict:
    """How a request's chat prompt ends, as encode_chat's arguments: the assistant's turn opened, or with
    `continue_final_message` the last message left open (add_generation_prompt then defaults to false)."""
    if not body.continue_final_message:
        return {"add_generation_prompt": body.add_generation_prompt}
    explicit = "add_generation_prompt" in body.model_fields_set
    return {"continue_final_message": True, **({"add_generation_prompt": body.add_generation_prompt} if explicit else {})}


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Chat messages as the chat template reads them: text parts joined (where no image part is among them:
    LLMEngine.encode_chat reads those), content never missing, an assistant's tool
    calls' `arguments` as the object their JSON text holds (as vLLM hands them over: templates that write
    `arguments | tojson`, Llama 3.1's and gpt-oss's among them, would otherwise quote the text again), and its
    `reasoning_content` (or `reasoning`) also as `thinking`."""
    out = []
    for m in messages:
        msg = m.model_dump(exclude_none=True)
        if isinstance(m.content, list) and all(part.type == "text" for part in m.content):
            msg["content"] = "".join(part.text for part in m.content)
        msg.setdefault("content", "")  # templates read it even where it may be null (assistant tool calls)
        if isinstance(msg.get("tool_calls"), list):
            msg["tool_calls"] = [_parsed_arguments(call) for call in msg["tool_calls"]]
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        if msg.get("role") == "assistant" and isinstance(reasoning, str) and reasoning and "thinking" not in msg:
            msg["thinking"] = reasoning  # the field gpt-oss's template reads (it keeps the thinking of tool-call turns)
        out.append(msg)
    return out


def _parsed_arguments(call):
    """A tool call whose function's `arguments` is JSON text of an object, with that object instead (else as is)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}} if isinstance(arguments, dict) else call
