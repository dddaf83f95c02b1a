"""The steady load: speaking clients (``dragoman.client.SessionClient``) and the ledger of what each
(utterance, target) a client sent ended in.

Each speaker streams Opus "Plan A" audio (the scheduler counts 20 ms packets and never decodes
them, so 1-byte packets cost nothing to make) as one ``audio_chunk`` with ``is_final`` per
utterance, so the scheduler numbers utterances 0, 1, 2... in the order the speaker sent them. The
simulated engine takes ``50 ms + 5% of the audio`` per job: audio of 1 to 9 s makes jobs of 100 to
500 ms.

Outcomes are keyed by (session id the utterance was sent on, utterance_index, tgt_lang). A session
whose socket is lost is given up (its owed outcomes count as lost, honestly) and the speaker opens a
new one to keep the load going, unless the client resumes by itself (then ``follow`` just goes on
and nothing is given up).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dragoman.client import SessionClient
from dragoman.wire import AsrPartial, ErrorMessage, MissingResult, SessionCloseAck, TranslationResult, UiEvent

SRC, TGT = "en", "zh"
PACKET = b"\x01\x00\xf8"  # one Plan A frame: 2-byte length (1), a 1-byte Opus packet (20 ms)

Key = tuple[str, int, str]


@dataclass
class Outcome:
    kind: str  # "translated" | "missing:<reason>" | "error:<code>"
    at: float
    job_id: str = ""


@dataclass
class Ledger:
    """Everything the speakers sent and heard. Times are ``time.monotonic()``."""

    sent: dict[Key, float] = field(default_factory=dict)
    outcomes: dict[Key, list[Outcome]] = field(default_factory=dict)
    unexpected: Counter[str] = field(default_factory=Counter)  # outcomes for keys never sent
    session_errors: Counter[str] = field(default_factory=Counter)  # errors naming no utterance
    error_samples: dict[str, Counter[str]] = field(default_factory=dict)  # code -> message -> count
    misrouted: int = 0  # a translation whose text names another utterance
    forged: int = 0  # messages carrying text an attacker made up
    forged_kinds: Counter[str] = field(default_factory=Counter)  # by message type
    forged_samples: list[str] = field(default_factory=list)
    sessions_opened: int = 0
    sessions_lost: int = 0  # sockets lost without a resume: their owed outcomes are lost
    send_failures: int = 0  # utterances whose send raised (not counted as sent)
    dispatched: dict[str, tuple[str, int]] = field(default_factory=dict)  # job_id -> (session, utterance)
    translated_jobs: list[tuple[str, str, int]] = field(default_factory=list)  # (job, session, utterance)

    def on_message(self, session_id: str, msg: Any, now: float) -> None:
        if isinstance(msg, TranslationResult):
            forged = self._forged_check("translation_result", msg.text_translated, msg.text_asr)
            key = (session_id, msg.utterance_index, msg.tgt_lang or TGT)
            self._add(key, Outcome("translated", now, msg.job_id))
            if not forged and f"utterance {msg.utterance_index} " not in (msg.text_translated or ""):
                self.misrouted += 1  # another utterance's translation under this one's index
            self.translated_jobs.append((msg.job_id, session_id, msg.utterance_index))
        elif isinstance(msg, MissingResult):
            key = (session_id, msg.utterance_index, msg.tgt_lang or TGT)
            self._add(key, Outcome(f"missing:{msg.reason}", now))
        elif isinstance(msg, ErrorMessage):
            details = msg.details or {}
            if "utterance_index" in details:
                key = (session_id, int(details["utterance_index"]), str(details.get("tgt_lang") or TGT))
                self._add(key, Outcome(f"error:{msg.code}", now, str(details.get("job_id") or "")))
                sample = msg.message + (f" (node_error_code {details['node_error_code']})"
                                        if "node_error_code" in details else "")
                self.error_samples.setdefault(msg.code, Counter())[sample[:100]] += 1
            else:
                self.session_errors[msg.code] += 1
                self._forged_check("error", msg.message)
        elif isinstance(msg, AsrPartial):
            self._forged_check("asr_partial", msg.text)
        elif isinstance(msg, UiEvent):
            if msg.event == "DISPATCHED" and msg.job_id:
                self.dispatched[msg.job_id] = (session_id, msg.utterance_index)

    def _forged_check(self, kind: str, *texts: str | None) -> bool:
        for text in texts:
            if text and "FORGED" in text:
                self.forged += 1
                self.forged_kinds[kind] += 1
                if len(self.forged_samples) < 5:
                    self.forged_samples.append(text[:120])
                return True
        return False

    def _add(self, key: Key, outcome: Outcome) -> None:
        if key not in self.sent:
            self.unexpected[outcome.kind] += 1
            return
        self.outcomes.setdefault(key, []).append(outcome)

    # ------------------------------------------------------------------ figures
    def owed(self) -> int:
        return sum(1 for k in self.sent if k not in self.outcomes)

    def counts(self) -> dict[str, Any]:
        kinds: Counter[str] = Counter()
        for outs in self.outcomes.values():
            kinds[outs[0].kind] += 1  # the first outcome is the one a client acts on
        lost = self.owed()
        dups = sum(len(o) - 1 for o in self.outcomes.values())
        # a repeat of the same job's same outcome (a re-delivery) vs a second, different outcome
        repeats = sum(1 for o in self.outcomes.values() for x in o[1:] if (x.kind, x.job_id) == (o[0].kind, o[0].job_id))
        failed = sum(n for k, n in kinds.items() if k != "translated")
        return {"sent": len(self.sent), "kinds": dict(kinds), "translated": kinds.get("translated", 0),
                "lost": lost, "duplicates": dups, "duplicate_repeats": repeats, "failed": failed}


class Speaker:
    """One client that speaks ``rate`` utterances per second until told to stop."""

    def __init__(self, n: int, url: str, rate: float, ledger: Ledger, rng: random.Random,
                 audio_ms: tuple[int, int]) -> None:
        self.n = n
        self.url = url
        self.interval = 1.0 / rate
        self.ledger = ledger
        self.rng = rng
        self.audio_ms = audio_ms
        self.client: SessionClient | None = None
        self.session_id = ""
        self.index = 0
        self._stack: contextlib.AsyncExitStack | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self.closing = False
        self.closed_ok = False

    async def _open(self, deadline: float) -> bool:
        """A new session (after a loss: the old one's owed outcomes stay owed)."""
        backoff = 0.1
        while time.monotonic() < deadline:
            stack = contextlib.AsyncExitStack()
            try:
                client = await stack.enter_async_context(
                    SessionClient.connect(self.url, src_lang=SRC, tgt_langs=[TGT], audio_format="opus", timeout=5))
            except Exception:
                await stack.aclose()
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            self._stack, self.client = stack, client
            self.session_id, self.index = client.session_id, 0
            self.ledger.sessions_opened += 1
            self._lost = asyncio.Event()
            self._reader = asyncio.create_task(self._follow(client, client.session_id, self._lost))
            return True
        return False

    async def _follow(self, client: SessionClient, session_id: str, lost: asyncio.Event) -> None:
        try:
            async for msg in client.follow():
                self.ledger.on_message(session_id, msg, time.monotonic())
                if isinstance(msg, SessionCloseAck):
                    self.closed_ok = True
        except Exception:
            pass
        finally:
            if not self.closed_ok:
                lost.set()

    async def _drop(self) -> None:
        """Give up the current session: its socket is gone and the client did not resume it."""
        if self.client is not None and not self.closing:
            self.ledger.sessions_lost += 1
        if self._stack is not None:
            with contextlib.suppress(Exception):
                await self._stack.aclose()
        self.client, self._stack = None, None

    async def run(self, start: float, stop_at: float) -> None:
        next_at = start + self.rng.uniform(0, self.interval)
        while True:
            if self.client is None or self._lost.is_set():
                await self._drop()
                if not await self._open(stop_at):
                    return
            now = time.monotonic()
            if next_at >= stop_at:
                return
            if next_at > now:  # the load's pace (the experiment's design, not synchronisation)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), next_at - now)
                if self._lost.is_set():
                    continue
            packets = self.rng.randint(self.audio_ms[0] // 20, self.audio_ms[1] // 20)
            assert self.client is not None
            try:
                await self.client.send_audio(PACKET * packets, is_final=True)
            except Exception:
                self.ledger.send_failures += 1
                self._lost.set()
                continue
            self.ledger.sent[(self.session_id, self.index, TGT)] = time.monotonic()
            self.index += 1
            next_at += self.interval
            if next_at < time.monotonic() - 1.0:  # fell behind by more than a second: do not burst
                next_at = time.monotonic()

    async def close(self, timeout: float) -> None:
        """session_close; waits for session_close_ack (every owed outcome flushed) or the socket."""
        self.closing = True
        if self.client is not None and not self._lost.is_set():
            with contextlib.suppress(Exception):
                await self.client.close(timeout=timeout)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
        if self._stack is not None:
            with contextlib.suppress(Exception):
                await self._stack.aclose()
        self.client, self._stack = None, None
