"""BodySizeLimit: an oversized body gets 413, and the rest of it is read (up to a cap) so the client
sees the reason rather than a broken pipe."""
from __future__ import annotations

import asyncio
import json

from bridgevlm.serve.app import DISCARD_FACTOR, BodySizeLimit


async def _reads_everything(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _run(chunks: int, chunk_bytes: int, limit: int, declare: bool):
    pending = [{"type": "http.request", "body": b"x" * chunk_bytes, "more_body": i < chunks - 1} for i in range(chunks)]
    sent = []

    async def receive():
        return pending.pop(0)

    async def send(message):
        sent.append(message)

    headers = [(b"content-length", str(chunks * chunk_bytes).encode())] if declare else []
    asyncio.run(BodySizeLimit(_reads_everything, limit)({"type": "http", "headers": headers}, receive, send))
    status = sent[0]["status"]
    return status, json.loads(sent[1]["body"]), len(pending)


def test_declared_or_streamed_oversize_is_refused_after_the_body_is_read():
    for declare in (True, False):
        status, body, left = _run(chunks=8, chunk_bytes=100, limit=300, declare=declare)
        assert status == 413 and "larger than 300 bytes" in body["error"]["message"]
        assert left == 0  # every chunk was received, none left unread in the connection


def test_a_body_far_over_the_limit_is_not_read_to_its_end():
    status, _, left = _run(chunks=100, chunk_bytes=100, limit=100, declare=True)
    assert status == 413 and 0 < left < 100 - DISCARD_FACTOR


def test_a_body_within_the_limit_reaches_the_app():
    status, body, left = _run(chunks=3, chunk_bytes=100, limit=300, declare=True)
    assert (status, body, left) == (200, {}, 0)
