"""app/sockets.py: a socket's outbound side (no network: a stand-in socket object)."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st
from starlette.websockets import WebSocketState
from websockets.frames import Frame, Opcode

from dragoman.app.sockets import Link, _holding, text_frame


class StuckSocket:
    """A peer that never reads: every send blocks forever."""

    application_state = WebSocketState.CONNECTED

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed_with: int | None = None

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        await asyncio.Event().wait()

    async def close(self, code: int = 1000) -> None:
        self.closed_with = code


class FastSocket(StuckSocket):
    async def send_text(self, text: str) -> None:
        self.sent.append(text)


async def test_a_peer_too_slow_is_cut_off_and_no_writer_task_outlives_the_close() -> None:
    """Loss path 12: after an overflow, closing the link ends its writer task (it used to wait forever)."""
    ws = StuckSocket()
    link = Link(ws, "slow", max_backlog=3)  # type: ignore[arg-type]
    assert link.send("first")
    await asyncio.sleep(0)  # the writer takes it and is stuck sending it
    assert all(link.send(str(i)) for i in range(3))  # the queue is full
    assert not link.send("overflow") and link.overflowed and link.closed
    await asyncio.wait_for(link.close(timeout=0.1), 2)
    assert link._task is not None and link._task.done()
    assert ws.closed_with == 1000


async def test_what_was_queued_is_sent_before_the_close() -> None:
    ws = FastSocket()
    link = Link(ws, "fast")  # type: ignore[arg-type]
    for text in ("a", "b", "c"):
        link.send(text)
    await link.close(code=4000)
    assert ws.sent == ["a", "b", "c"] and ws.closed_with == 4000
    assert not link.send("late")


async def test_a_frame_sent_soon_leaves_with_the_next_frame_in_order_or_on_its_own_shortly() -> None:
    ws = FastSocket()
    link = Link(ws, "soon")  # type: ignore[arg-type]
    assert link.send_soon("dispatched")
    await asyncio.sleep(0)
    assert ws.sent == []  # held for company
    link.send("result")
    await asyncio.sleep(0)
    assert ws.sent == ["dispatched", "result"]  # together, in order
    link.send_soon("alone")
    other = Link(FastSocket(), "other")  # type: ignore[arg-type]
    other.send_soon("too")  # (links hold frames together: one timer releases them all)
    timer = _holding(asyncio.get_running_loop()).timer
    assert timer is not None
    await asyncio.wait_for(_fired(timer), 2)
    assert ws.sent[-1:] == ["alone"] and other.ws.sent == ["too"]  # nobody came: they left anyway
    link.send_soon("last")
    await link.close()
    assert ws.sent[-1] == "last"  # a close sends what was held first


async def _fired(timer: asyncio.TimerHandle) -> None:
    """Until the loop has run ``timer`` (a future scheduled just after it completes then)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_at(timer.when(), lambda: loop.call_soon(done.set_result, None))
    await done


@given(st.one_of(st.text(), st.text(min_size=60, max_size=70).map(lambda t: t * 1100)))
def test_a_text_frame_is_the_frame_websockets_would_send(text: str) -> None:
    """Any UTF-8 text, short (7-bit length) or over 64 kB (64-bit length); the next test has each
    boundary of the three header forms."""
    assert text_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


def test_text_frames_of_every_header_length_match_websockets() -> None:
    for n in (0, 125, 126, 65535, 65536):
        text = "x" * n
        assert text_frame(text) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
