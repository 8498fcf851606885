"""Anthropic params <-> chat completions: what is carried, what is refused, and how a
reply becomes a Message."""

from __future__ import annotations

import pytest

from minibatch.errors import Fail
from minibatch.translate import chat_body, message_of

PARAMS = {"model": "m", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}


def test_every_carried_parameter_reaches_the_chat_body():
    body = chat_body({**PARAMS, "system": [{"type": "text", "text": "be "},
                                           {"type": "text", "text": "brief"}],
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]},
                                   {"role": "assistant", "content": "c"},
                                   {"role": "user", "content": "d"}],
                      "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"],
                      "stream": False})
    assert body == {"model": "m", "max_tokens": 32, "temperature": 0.2, "top_p": 0.9,
                    "stop": ["END"],
                    "messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "ab"},
                                 {"role": "assistant", "content": "c"},
                                 {"role": "user", "content": "d"}]}


@pytest.mark.parametrize("params, named", [
    ({**PARAMS, "tools": []}, "tools"),
    ({**PARAMS, "top_k": 5}, "top_k"),
    ({**PARAMS, "stream": True}, "stream"),
    ({**PARAMS, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {}}]}]}, "'image' block"),
    ({**PARAMS, "messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"model": "m", "messages": []}, "max_tokens is required"),
    ("not an object", "object"),
])
def test_what_cannot_be_said_is_refused_naming_it(params, named):
    with pytest.raises(Fail) as refused:
        chat_body(params)
    assert refused.value.code == "invalid_request_error"
    assert named in str(refused.value)


@pytest.mark.parametrize("choice, stop_reason, stop_sequence", [
    ({"finish_reason": "stop"}, "end_turn", None),
    ({"finish_reason": "length"}, "max_tokens", None),
    ({"finish_reason": "stop", "stop_reason": "END"}, "stop_sequence", "END"),
    ({"finish_reason": "stop", "stop_reason": "OTHER"}, "end_turn", None),
])
def test_a_reply_becomes_a_message(choice, stop_reason, stop_sequence):
    completion = {"model": "served-name", "usage": {"prompt_tokens": 7, "completion_tokens": 3},
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "yo"},
                               **choice}]}
    message = message_of(completion, {**PARAMS, "stop_sequences": ["END"]})
    assert message["id"].startswith("msg_") and message["type"] == "message"
    assert message["role"] == "assistant" and message["model"] == "served-name"
    assert message["content"] == [{"type": "text", "text": "yo"}]
    assert (message["stop_reason"], message["stop_sequence"]) == (stop_reason, stop_sequence)
    assert message["usage"] == {"input_tokens": 7, "output_tokens": 3}


def test_an_answer_that_is_no_chat_completion_fails_the_request():
    with pytest.raises(Fail) as failed:
        message_of({"object": "list", "data": []}, PARAMS)
    assert failed.value.code == "api_error"
