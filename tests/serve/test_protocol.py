"""OpenAI chat requests as bridgevlm conversations and generation settings."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from bridgevlm.serve.config import ServeConfig
from bridgevlm.serve.protocol import BadRequest, ChatCompletionRequest, conversation, validation_message


def _request(messages, **fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **fields})


def test_messages_become_a_conversation_with_image_tags_where_the_images_stood():
    request = _request([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:a"}},
                                     {"type": "text", "text": "What is it? <image>"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                     {"type": "image_url", "image_url": {"url": "data:b", "detail": "low"}}]},
    ], some_unknown_field=1)
    messages, images, system = conversation(request)
    assert system == "Be brief."
    assert messages == [{"from": "human", "value": "<image>\nWhat is it? "}, {"from": "gpt", "value": "a cat"},
                        {"from": "human", "value": "And this?\n<image>"}]  # a typed tag is text, not an image
    assert images == [("data:a", "messages[1].content[0]"), ("data:b", "messages[3].content[1]")]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "hi"}], "end with a user message"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}, {"role": "user", "content": "x"}],
     "system message must come before"),
    ([{"role": "user", "content": [{"type": "text"}]}], "needs `text`"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "needs `image_url.url`"),
])
def test_conversations_that_cannot_be_answered(messages, match):
    with pytest.raises(BadRequest, match=match):
        conversation(_request(messages))


def test_generation_settings():
    cfg = ServeConfig(default_max_tokens=77)
    greedy = _request([{"role": "user", "content": "hi"}], temperature=0, stop="END").generation(cfg)
    assert not greedy.do_sample and greedy.max_new_tokens == 77 and greedy.stop == ["END"]
    sampled = _request([{"role": "user", "content": "hi"}], max_tokens=5, max_completion_tokens=9, top_p=0.5,
                       seed=3, n=2)
    second = sampled.generation(cfg, choice=1)
    assert second.do_sample and second.temperature == 1.0 and second.top_p == 0.5
    assert second.max_new_tokens == 9 and second.seed == 4


def test_validation_errors_name_the_field_and_never_echo_the_input():
    secret = "data:image/png;base64,SECRETSECRET"
    with pytest.raises(ValidationError) as error:
        _request([{"role": "robot", "content": [{"type": "image_url", "image_url": {"url": secret}}]}])
    message, param = validation_message(error.value)
    assert param == "messages.0.role" and message.startswith("messages.0.role: ")
    assert "SECRET" not in message
