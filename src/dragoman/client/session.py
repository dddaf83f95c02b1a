"""``SessionClient``: stream audio to a Dragoman scheduler and read results, as a live client would.

    async with SessionClient.connect("ws://127.0.0.1:8700/ws/session", src_lang="en",
                                     tgt_langs=["zh", "de"], audio_format="pcm16") as s:
        await s.send_audio(pcm_bytes)          # one audio_chunk
        await s.finish()                        # empty is_final chunk
        async for msg in s.results():           # translation_result / missing_result / error
            ...
        await s.close()                         # session_close, waits for session_close_ack

Messages are decoded into the wire structs of ``dragoman.wire``. The transport is injectable (any
object with async ``send(str)``, ``recv() -> str`` and ``close()``), so tests can run it in memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from dragoman.wire import (
    AudioChunk,
    ErrorMessage,
    MissingResult,
    SessionClose,
    SessionCloseAck,
    SessionInit,
    SessionInitAck,
    TranslationResult,
    decode_session_outbound,
    encode,
)

OUTCOMES = (TranslationResult, MissingResult, ErrorMessage)


class Transport(Protocol):
    async def send(self, text: str) -> None: ...
    async def recv(self) -> str | bytes: ...
    async def close(self) -> None: ...


class SessionError(Exception):
    pass


class SessionClient:
    def __init__(self, transport: Transport, init: SessionInit) -> None:
        self.transport = transport
        self.init = init
        self.session_id = ""
        self.trace_id = ""
        self.seq = 0
        self.all: list[Any] = []  # every message received, in order
        self._cursor = 0  # how far next_message() has read
        self._arrived = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, *, src_lang: str, tgt_langs: list[str], audio_format: str = "pcm16",
                      sample_rate: int = 16000, api_key: str | None = None, timeout: float = 10.0,
                      **init_fields: Any) -> AsyncIterator[SessionClient]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        async with ws_connect(url, additional_headers=headers, max_size=16 * 1024 * 1024) as ws:
            init = SessionInit(src_lang=src_lang, tgt_lang=tgt_langs[0], tgt_langs=tgt_langs,
                               audio_format=audio_format, sample_rate=sample_rate, client_version="dragoman-py/0.1",
                               platform="python", **init_fields)
            client = cls(ws, init)
            await client.start(timeout)
            try:
                yield client
            finally:
                await client.stop()

    async def start(self, timeout: float = 10.0) -> SessionInitAck:
        await self.transport.send(encode(self.init))
        first = decode_session_outbound(await asyncio.wait_for(self.transport.recv(), timeout))
        if not isinstance(first, SessionInitAck):
            raise SessionError(f"session_init refused: {first}")
        self.session_id, self.trace_id = first.session_id, first.trace_id
        self._reader = asyncio.create_task(self._read())
        return first

    async def _read(self) -> None:
        try:
            while True:
                msg = decode_session_outbound(await self.transport.recv())
                async with self._arrived:
                    self.all.append(msg)
                    self._arrived.notify_all()
        except (ConnectionClosed, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()
            with contextlib.suppress(RuntimeError):
                async with self._arrived:
                    self._arrived.notify_all()

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def send(self, msg: Any) -> None:
        await self.transport.send(encode(msg))

    async def send_audio(self, payload: bytes, is_final: bool = False) -> None:
        await self.send(AudioChunk(session_id=self.session_id, seq=self.seq, is_final=is_final,
                                   payload=base64.b64encode(payload).decode()))
        self.seq += 1

    async def finish(self) -> None:
        """The web client's finalize frame: an empty chunk with is_final."""
        await self.send_audio(b"", is_final=True)

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
        connection closes."""
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
        await self.send(SessionClose(session_id=self.session_id, reason="done"))
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(
                lambda: any(isinstance(m, SessionCloseAck) for m in self.all[start:]) or self.closed.is_set()), timeout)
        if not any(isinstance(m, SessionCloseAck) for m in self.all[start:]):
            raise SessionError("connection closed before session_close_ack")
        return [m for m in self.all[start:] if isinstance(m, OUTCOMES)]
