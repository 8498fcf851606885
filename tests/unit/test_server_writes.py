"""CoalescedWrites: the writes of one turn of the event loop leave as one, in order.

The transport under it is a recorder: what is tested is how writes are grouped, which a
real socket's reads cannot show (TCP may merge or split them either way). The HTTP
behaviour over real sockets is every integration test's."""

from __future__ import annotations

import asyncio

from minibatch.server import CoalescedWrites


class Recorder:
    """The part of an asyncio transport CoalescedWrites calls."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_a_turns_writes_leave_as_one_in_order_after_the_turn():
    async def main() -> None:
        raw = Recorder()
        out = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        out.write(b"HTTP/1.1 200 OK\r\n\r\n")
        out.write(b"body")
        assert raw.writes == []  # not before the turn ends
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        out.write(b"next")
        await asyncio.sleep(0)
        assert raw.writes[1:] == [b"next"]
        assert out.get_extra_info("peername") == "info:peername"  # the rest is the transport's

    asyncio.run(main())


def test_a_big_write_goes_at_once_so_flow_control_still_sees_it():
    async def main() -> None:
        raw = Recorder()
        out = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        out.write(b"head")
        out.write(b"x" * CoalescedWrites.FLUSH_AT)
        assert raw.writes == [b"head" + b"x" * CoalescedWrites.FLUSH_AT]
        out.write(b"tail")
        await asyncio.sleep(0)
        assert raw.writes[1:] == [b"tail"]

    asyncio.run(main())


def test_close_sends_what_is_pending_first_and_a_closed_transport_gets_nothing():
    async def main() -> None:
        raw = Recorder()
        out = CoalescedWrites(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        out.write(b"431 answer")
        out.close()
        assert (raw.writes, raw.closed) == ([b"431 answer"], True)
        out.write(b"late")  # the peer is gone: dropped, no error at the turn's end
        await asyncio.sleep(0)
        assert raw.writes == [b"431 answer"]

    asyncio.run(main())
