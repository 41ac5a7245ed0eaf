"""KV events on the wire (pensieve/kv_events.py): the ZMQ frames and msgpack payload vllm-router
0.1.17 reads, the replay socket, and the render route whose token ids the router matches.
The tracker and the router itself: tests/test_kv_events.py."""

from __future__ import annotations

import contextlib

import pytest
from tiny_server import chat, serve_tiny

from pensieve.cluster import free_port
from pensieve.kv_events import HOST, KvEventPublisher
from pensieve.runtime import LoadedModel


def test_publisher_speaks_vllm_s_wire_format_and_replays() -> None:
    zmq = pytest.importorskip("zmq")
    msgpack = pytest.importorskip("msgpack")
    port, replay_port = free_port(), free_port()
    publisher = KvEventPublisher(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}")
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(f"tcp://127.0.0.1:{port}")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(f"tcp://127.0.0.1:{replay_port}")
    try:
        event = {"type": "BlockRemoved", "block_hashes": [5], "medium": HOST}
        frames = None
        for _ in range(50):  # a PUB drops what it sends before the subscription arrives
            publisher.publish([event])
            with contextlib.suppress(zmq.Again):
                frames = sub.recv_multipart()
                break
        assert frames is not None
        topic, seq, payload = frames
        ts, events, rank = msgpack.unpackb(payload)
        assert topic == b"" and len(seq) == 8 and events == [event] and rank == 0
        assert isinstance(ts, float)
        dealer.send_multipart([b"", int.from_bytes(seq, "big").to_bytes(8, "big")])
        assert dealer.recv_multipart() == [b"", topic, seq, payload]  # as vllm-router reads it
        while dealer.recv_multipart()[-2] != (-1).to_bytes(8, "big", signed=True):
            pass  # the batches after it, then the end marker
        publisher.close()
        last = None
        with contextlib.suppress(zmq.Again):
            while True:
                last = sub.recv_multipart()
        assert last is not None and msgpack.unpackb(last[2])[1] == [{"type": "AllBlocksCleared"}]
    finally:
        publisher.close()
        sub.close(linger=0)
        dealer.close(linger=0)


async def test_render_gives_the_prompt_the_engine_caches(tiny: LoadedModel) -> None:
    async with serve_tiny(tiny) as server:
        body = chat("How far is the moon?", model="tiny-random", max_tokens=2, temperature=0)
        status, rendered, _ = await server.post("/v1/chat/completions/render", body)
        assert status == 200
        assert rendered["token_ids"] == tiny.tokenizer.encode_chat(body["messages"])
        status, reply, _ = await server.post("/v1/chat/completions", body)
        assert reply["usage"]["prompt_tokens"] == len(rendered["token_ids"])
        text = {"prompt": "Once upon a time", "max_tokens": 2}
        status, rendered, _ = await server.post("/v1/completions/render", text)
        assert status == 200
        assert rendered[0]["token_ids"] == tiny.tokenizer.encode(text["prompt"], True)
        status, error, _ = await server.post("/v1/chat/completions/render", {"messages": 3})
        assert status == 400 and error["error"]["param"] == "messages"
