"""Anthropic Messages requests run on an OpenAI-compatible server: `params` translated to
a `/chat/completions` body, and the reply mapped back to a Message.

Carried: `model`, `system` (a string or text blocks), `messages` (user and assistant
turns, string content or text blocks), `max_tokens`, `temperature`, `top_p`,
`stop_sequences` (as `stop`). Anything else is refused for that request, with a message
naming it, rather than dropped: a request that asked for tools or an image and got plain
text back would look like a success.
"""

from __future__ import annotations

import secrets
from typing import Any

from .errors import Fail

CARRIED = ("model", "system", "messages", "max_tokens", "temperature", "top_p",
           "stop_sequences")
# `stream: false` asks for nothing, so it is no reason to refuse.
HARMLESS = {"stream": False}
STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


def refuse(message: str) -> Fail:
    return Fail(f"not translated to chat completions: {message}",
                code="invalid_request_error")


def chat_body(params: Any) -> dict[str, Any]:
    """The `/chat/completions` body for Anthropic `params`; Fail if it cannot say it."""
    if not isinstance(params, dict):
        raise refuse("params must be an object")
    extra = sorted(k for k in params
                   if k not in CARRIED and not (k in HARMLESS and params[k] == HARMLESS[k]))
    if extra:
        raise refuse(f"unsupported parameter(s) {', '.join(extra)}")
    for required in ("model", "messages", "max_tokens"):
        if required not in params:
            raise refuse(f"{required} is required")
    messages = []
    if params.get("system") is not None:
        messages.append({"role": "system", "content": _text(params["system"], "system")})
    if not isinstance(params["messages"], list):
        raise refuse("messages must be a list")
    for n, turn in enumerate(params["messages"]):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            raise refuse(f"messages[{n}] must have role user or assistant")
        messages.append({"role": turn["role"],
                         "content": _text(turn.get("content"), f"messages[{n}].content")})
    body: dict[str, Any] = {"model": params["model"], "messages": messages,
                            "max_tokens": params["max_tokens"]}
    for name in ("temperature", "top_p"):
        if name in params:
            body[name] = params[name]
    if params.get("stop_sequences"):
        body["stop"] = params["stop_sequences"]
    return body


def _text(content: Any, where: str) -> str:
    """A string, or a list of text blocks joined; any other block is refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise refuse(f"{where} must be a string or a list of text blocks")
    parts = []
    for block in content:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(
                block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise refuse(f"{where} has a {kind!r} block; only text blocks are carried")
        parts.append(block["text"])
    return "".join(parts)


def message_of(completion: Any, params: dict[str, Any]) -> dict[str, Any]:
    """A chat completion as an Anthropic Message."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Fail("the upstream's answer is not a chat completion", code="api_error")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    stop_reason = STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn")
    stop_sequence = None
    matched = choice.get("stop_reason")  # vLLM names the stop string it met
    if isinstance(matched, str) and matched in (params.get("stop_sequences") or ()):
        stop_reason, stop_sequence = "stop_sequence", matched
    usage = completion.get("usage") or {}
    return {"id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant",
            "model": completion.get("model", params.get("model")),
            "content": [{"type": "text", "text": text}], "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {"input_tokens": usage.get("prompt_tokens", 0),
                      "output_tokens": usage.get("completion_tokens", 0)}}
