"""``SessionClient``: stream audio to a Dragoman scheduler and read results, as a live client would.

    async with SessionClient.connect("ws://127.0.0.1:8700/ws/session", src_lang="en",
                                     tgt_langs=["zh", "de"], audio_format="pcm16") as s:
        await s.send_audio(pcm_bytes)          # one audio_chunk
        await s.finish()                        # empty is_final chunk
        async for msg in s.follow():            # translation_result / missing_result / error ...
            ...
        await s.close()                         # session_close, waits for session_close_ack

Messages are decoded into the wire structs of ``dragoman.wire``. The transport is injectable (any
object with async ``send(str)``, ``recv() -> str`` and ``close()``), so tests can run it in memory.

Losing the socket does not lose the session. When the connection drops (the scheduler process died,
the network blinked) the client connects again, by itself, with ``session_init.resume_session_id``;
the scheduler answers with the same session and every outcome still owed, and says from which
``audio_chunk.seq`` (or utterance) it needs the audio again: the client keeps what it sent recently
and sends that again. Every (utterance, target) outcome reaches the caller once: one delivered again
after a resume is dropped here and counted in ``repeated``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import msgspec
import structlog
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from dragoman.errors import ProtocolError
from dragoman.wire import (
    AudioChunk,
    ErrorMessage,
    MissingResult,
    SessionClose,
    SessionCloseAck,
    SessionInit,
    SessionInitAck,
    TranslationResult,
    Utterance,
    decode_session_outbound,
    encode,
)

OUTCOMES = (TranslationResult, MissingResult, ErrorMessage)
log = structlog.get_logger(__name__)


class Transport(Protocol):
    async def send(self, text: str) -> None: ...
    async def recv(self) -> str | bytes: ...
    async def close(self) -> None: ...


Opener = Callable[[], Awaitable[Transport]]


class SessionError(Exception):
    pass


def outcome_key(msg: Any) -> tuple[int, str] | None:
    """(utterance_index, tgt_lang) of an outcome; None for an error that names no utterance."""
    if isinstance(msg, ErrorMessage):
        details = msg.details or {}
        if "utterance_index" not in details:
            return None
        return int(details["utterance_index"]), str(details.get("tgt_lang", ""))
    return int(msg.utterance_index), msg.tgt_lang or ""


class SessionClient:
    def __init__(self, transport: Transport, init: SessionInit, *, opener: Opener | None = None,
                 resume_for_s: float = 30.0, history: int = 512) -> None:
        self.transport = transport
        self.init = init
        self.opener = opener  # how to connect again (None: no resume)
        self.resume_for_s = resume_for_s
        self.session_id = ""
        self.trace_id = ""
        self.resume_token: str | None = None
        self.seq = 0
        self.all: list[Any] = []  # every message received, in order (repeats after a resume left out)
        self.resumes = 0  # times the session was taken up again on a new connection
        self.repeated = 0  # outcomes delivered again after a resume (dropped here)
        self._seen: set[tuple[int, str]] = set()
        self._sent: deque[tuple[int, str]] = deque(maxlen=history)  # (seq or utterance index, frame)
        self._cursor = 0  # how far next_message() has read
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self._usable = asyncio.Event()
        self._closing = False
        self._stopping = False
        self._utterances = False  # whole utterances (numbered by us) rather than streamed chunks
        self.closed = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str | Sequence[str], *, src_lang: str, tgt_langs: list[str],
                      audio_format: str = "pcm16", sample_rate: int = 16000, api_key: str | None = None,
                      timeout: float = 10.0, resume: bool = True, **init_fields: Any) -> AsyncIterator[SessionClient]:
        """``url``: the scheduler's session endpoint, or several (any scheduler process of one
        network): each connection, first or resumed, tries them in turn from the last that worked."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        urls = [url] if isinstance(url, str) else list(url)
        current = 0

        async def opener() -> Transport:
            nonlocal current
            error: Exception | None = None
            for i in range(len(urls)):
                candidate = (current + i) % len(urls)
                try:
                    ws = await ws_connect(urls[candidate], additional_headers=headers, max_size=16 * 1024 * 1024,
                                          compression=None, open_timeout=timeout, ping_interval=5, ping_timeout=10)
                except (OSError, TimeoutError, InvalidHandshake) as exc:
                    error = exc
                    continue
                current = candidate
                return ws
            assert error is not None
            raise error

        init = SessionInit(src_lang=src_lang, tgt_lang=tgt_langs[0], tgt_langs=tgt_langs, audio_format=audio_format,
                           sample_rate=sample_rate, client_version="dragoman-py/0.1", platform="python", **init_fields)
        client = cls(await opener(), init, opener=opener if resume else None)
        try:
            await client.start(timeout)
            yield client
        finally:
            await client.stop()

    async def start(self, timeout: float = 10.0) -> SessionInitAck:
        await self.transport.send(encode(self.init))
        first = decode_session_outbound(await asyncio.wait_for(self.transport.recv(), timeout))
        if not isinstance(first, SessionInitAck):
            raise SessionError(f"session_init refused: {first}")
        self.session_id, self.trace_id = first.session_id, first.trace_id
        self.resume_token = first.resume_token
        self._usable.set()
        self._reader = asyncio.create_task(self._read())
        return first

    async def stop(self) -> None:
        self._stopping = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(Exception):
            await self.transport.close()

    # ------------------------------------------------------------------ receiving
    async def _read(self) -> None:
        try:
            while True:
                try:
                    raw = await self.transport.recv()
                except ConnectionClosed:
                    if self._stopping or not await self._resume():
                        return
                    continue
                try:
                    msg = decode_session_outbound(raw)
                except ProtocolError as exc:  # a newer scheduler's message: not ours to understand
                    log.info("client.unknown_message", error=exc.message)
                    continue
                if isinstance(msg, SessionCloseAck):
                    self._stopping = True  # the session is over: a close that follows is not a loss
                elif isinstance(msg, OUTCOMES):
                    key = outcome_key(msg)
                    if key is not None:
                        if key in self._seen:
                            self.repeated += 1
                            continue
                        self._seen.add(key)
                await self._arrive(msg)
        except asyncio.CancelledError:
            pass
        finally:
            self.closed.set()
            self._usable.set()  # wake senders: they find the session closed
            with contextlib.suppress(RuntimeError):
                async with self._arrived:
                    self._arrived.notify_all()

    async def _arrive(self, msg: Any) -> None:
        async with self._arrived:
            self.all.append(msg)
            self._arrived.notify_all()

    async def _resume(self) -> bool:
        """Connect again and take the session up where it was; False when that is not possible."""
        if self.opener is None or not self.session_id or not self.resume_token:
            return False
        self._usable.clear()
        with contextlib.suppress(Exception):
            await self.transport.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.resume_for_s
        pause = 0.1
        init = msgspec.structs.replace(self.init, resume_session_id=self.session_id, resume_token=self.resume_token)
        while loop.time() < deadline:
            try:
                transport = await self.opener()
                await transport.send(encode(init))
                first = decode_session_outbound(await asyncio.wait_for(transport.recv(), 10))
            except (OSError, ConnectionClosed, TimeoutError, InvalidHandshake, ProtocolError) as exc:
                log.info("client.resume_failed", session=self.session_id, error=str(exc), retry_in_s=round(pause, 2))
                await asyncio.sleep(pause * (0.5 + random.random()))
                pause = min(2.0, pause * 2)
                continue
            if not (isinstance(first, SessionInitAck) and first.resumed):
                log.warning("client.resume_refused", session=self.session_id, answer=str(first))
                with contextlib.suppress(Exception):
                    await transport.close()
                return False
            self.transport = transport
            self.resumes += 1
            await self._arrive(first)
            await self._send_again(first)
            self._usable.set()
            log.info("client.resumed", session=self.session_id, from_seq=first.resume_from_seq)
            return True
        return False

    async def _send_again(self, ack: SessionInitAck) -> None:
        """What the scheduler had not yet made into jobs, from the point it names, then a close that
        may have been lost with the old connection."""
        since = (ack.resume_from_utterance_index if self._utterances else ack.resume_from_seq) or 0
        frames = [frame for number, frame in self._sent if number >= since]
        if self._sent and self._sent[0][0] > since:
            log.warning("client.resume_gap", session=self.session_id, needed_from=since, kept_from=self._sent[0][0])
        for frame in frames:
            await self.transport.send(frame)
        if self._closing:
            await self.transport.send(encode(SessionClose(session_id=self.session_id, reason="done")))

    # ------------------------------------------------------------------ sending
    async def send(self, msg: Any) -> None:
        """Send a frame; while the connection is being taken up again, wait for it. Audio sent into a
        dropped connection is sent again after the resume (the scheduler says from where)."""
        await self._usable.wait()
        if self.closed.is_set():
            raise SessionError("the session is closed")
        frame = encode(msg)
        if isinstance(msg, AudioChunk):
            self._sent.append((msg.seq, frame))
        elif isinstance(msg, Utterance):
            self._utterances = True
            self._sent.append((msg.utterance_index, frame))
        with contextlib.suppress(ConnectionClosed):
            await self.transport.send(frame)

    async def send_audio(self, payload: bytes, is_final: bool = False) -> None:
        await self.send(AudioChunk(session_id=self.session_id, seq=self.seq, is_final=is_final,
                                   payload=base64.b64encode(payload).decode()))
        self.seq += 1

    async def finish(self) -> None:
        """The web client's finalize frame: an empty chunk with is_final."""
        await self.send_audio(b"", is_final=True)

    # ------------------------------------------------------------------ reading
    async def _message_at(self, index: int, timeout: float) -> Any:
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.all) > index or self.closed.is_set()), timeout)
            if len(self.all) <= index:
                raise SessionError("connection closed")
            return self.all[index]

    async def next_message(self, timeout: float = 10.0) -> Any:
        msg = await self._message_at(self._cursor, timeout)
        self._cursor += 1
        return msg

    async def wait_for(self, kinds: tuple[type, ...], timeout: float = 10.0) -> Any:
        """The next message of these kinds after the ones already read by next_message/wait_for."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            msg = await self.next_message(max(0.01, deadline - asyncio.get_running_loop().time()))
            if isinstance(msg, kinds):
                return msg

    async def follow(self, timeout: float = 3600.0) -> AsyncIterator[Any]:
        """Every message from the first, independently of next_message's position; ends when the
        connection closes for good (a lost connection that is resumed does not end it)."""
        index = 0
        while True:
            try:
                msg = await self._message_at(index, timeout)
            except SessionError:
                return
            index += 1
            yield msg

    async def results(self, count: int, timeout: float = 30.0) -> list[Any]:
        """The next ``count`` outcomes (translation_result, missing_result, error)."""
        out = []
        while len(out) < count:
            out.append(await self.wait_for(OUTCOMES, timeout))
        return out

    async def close(self, timeout: float = 30.0) -> list[Any]:
        """session_close; returns every outcome that arrived before session_close_ack."""
        start = len(self.all)
        self._closing = True
        await self.send(SessionClose(session_id=self.session_id, reason="done"))
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(
                lambda: any(isinstance(m, SessionCloseAck) for m in self.all[start:]) or self.closed.is_set()), timeout)
        if not any(isinstance(m, SessionCloseAck) for m in self.all[start:]):
            raise SessionError("connection closed before session_close_ack")
        self._stopping = True
        return [m for m in self.all[start:] if isinstance(m, OUTCOMES)]
