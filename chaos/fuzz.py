"""Hostile frames for both WebSocket endpoints, generated with Hypothesis, sent while the load runs.

Generation: one ``@given`` run whose examples each draw a batch of frames (``st.data()``-free: the
batch strategy is the argument), appended to a list; ``database=None`` and a fixed seed make a run
reproducible. Frames are valid-shaped messages of every type of the endpoint (and of the other
endpoint), shapes with fields missing or of the wrong type, truncated and malformed JSON, duplicate
keys, NaN, deeply nested arrays, binary frames (random bytes, and valid JSON sent as binary), and
oversized frames; numbers include 100000000000000, 2**63, 2**64, 1e308 and -1e308. Ids are drawn
from placeholders filled in at send time with live ids: other sessions' (``@@SESSION@@``), the
legitimate nodes' (``@@NODE@@``), jobs seen dispatched (``@@JOB@@``), or the attacker's own
(``@@OWN@@``). Frames arrive in whatever order they were drawn, on connections that may or may not
have registered or opened a session first: results before registration, audio after close,
``session_init`` twice... Every text an attacker makes up contains ``FORGED``.

Node registrations by attackers use languages nobody else serves (``fz``, ``fy``...), so an attacker
never joins the legitimate pools under its own id (a silent node is a different fault); an attacker
*can* try to take a legitimate node's id, which I11 forbids.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

OVERSIZED = "@@OVERSIZED@@"
PLACEHOLDERS = ("@@SESSION@@", "@@NODE@@", "@@JOB@@", "@@OWN@@")
HUGE = (0, 1, -1, 2, 100000000000000, 2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**30, 1e308, -1e308,
        5e-324, 0.5, 1e14)
ATTACKER_LANGS = ("fz", "fy", "xx", "", "auto", "q" * 17, "zz-ZZ")
SESSION_LANGS = ("en", "zh", "fz", "auto", "", "q" * 17)
BATCH = 10

ids = st.one_of(st.sampled_from(PLACEHOLDERS), st.sampled_from(PLACEHOLDERS), st.text(max_size=20), st.just(""),
                st.text(alphabet="ab-{}: ", min_size=129, max_size=200))
nums = st.one_of(st.sampled_from(HUGE), st.integers(), st.floats(allow_nan=False, allow_infinity=False))
forged_text = st.text(max_size=30).map(lambda t: "FORGED " + t)
scalars = st.one_of(st.none(), st.booleans(), nums, st.text(max_size=20), ids)
anything = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=6)
b64ish = st.one_of(st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode()),
                   st.text(max_size=40), st.just("AQD4AQD4"))


def f(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right type, sometimes anything at all."""
    return st.one_of(strategy, strategy, strategy, anything)


def message(kind: str, fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A message of ``kind``: all fields (valid-shaped) or any subset of them (broken shape)."""
    typed = {"type": st.just(kind)}
    full = st.fixed_dictionaries({**typed, **{k: f(v) for k, v in fields.items()}})
    partial = st.fixed_dictionaries(typed, optional={k: f(v) for k, v in fields.items()})
    extra = st.dictionaries(st.text(max_size=8), anything, max_size=2)
    return st.one_of(full, full, partial, st.tuples(full, extra).map(lambda p: {**p[1], **p[0]}))


pair = st.tuples(st.sampled_from(ATTACKER_LANGS), st.sampled_from(ATTACKER_LANGS)).map(list)

NODE_MESSAGES = st.one_of(
    message("node_register", {
        "node_id": st.one_of(st.just("@@OWN@@"), st.just("@@OWN@@"), st.just("@@NODE@@"), st.none(), ids),
        "version": st.text(max_size=10), "platform": st.text(max_size=10),
        "hardware": st.fixed_dictionaries({"cpu_cores": nums, "memory_gb": nums}),
        "installed_models": st.lists(anything, max_size=2), "capability_by_type": st.just([]),
        "features_supported": st.just({}), "accept_public_jobs": st.booleans(),
        "language_pairs": st.lists(pair, min_size=1, max_size=3),
        "max_concurrency": st.one_of(st.integers(1, 8), nums)}),
    message("node_heartbeat", {
        "node_id": ids, "timestamp": nums, "draining": st.booleans(),
        "resource_usage": st.fixed_dictionaries({"cpu_percent": nums, "mem_percent": nums, "running_jobs": nums}),
        "language_capabilities": st.fixed_dictionaries({"asr_languages": st.lists(st.sampled_from(ATTACKER_LANGS))})}),
    message("job_ack", {"job_id": ids, "attempt_id": nums, "node_id": ids, "session_id": ids, "trace_id": ids}),
    message("job_started", {"job_id": ids, "attempt_id": nums, "node_id": ids, "session_id": ids}),
    message("asr_partial", {"job_id": ids, "node_id": ids, "session_id": ids, "utterance_index": nums,
                            "text": forged_text, "is_final": st.booleans(), "trace_id": ids}),
    message("job_result", {
        "job_id": ids, "attempt_id": nums, "node_id": ids, "session_id": ids, "utterance_index": nums,
        "trace_id": ids, "success": st.booleans(), "text_asr": forged_text, "text_translated": forged_text,
        "tts_audio": b64ish, "tts_format": st.sampled_from(["wav", "", "mp3"]),
        "extra": st.fixed_dictionaries({}, optional={"reason": st.sampled_from(["ASR_EMPTY", "NO_TEXT_ASSIGNED", "x"])}),
        "error": st.fixed_dictionaries({"code": st.text(max_size=20), "message": forged_text}),
        "processing_time_ms": nums}),
    message("node_error", {"node_id": ids, "code": st.text(max_size=20), "message": forged_text}),
)

SESSION_MESSAGES = st.one_of(
    message("session_init", {
        "src_lang": st.sampled_from(SESSION_LANGS), "tgt_lang": st.sampled_from(SESSION_LANGS),
        "tgt_langs": st.lists(st.sampled_from(SESSION_LANGS), max_size=10),
        "audio_format": st.sampled_from(["opus", "pcm16", "mp3", ""]), "sample_rate": st.one_of(st.just(16000), nums),
        "mode": st.sampled_from(["one_way", "two_way_auto", "x"]), "lang_a": st.sampled_from(SESSION_LANGS),
        "lang_b": st.sampled_from(SESSION_LANGS), "trace_id": ids, "client_version": st.text(max_size=8),
        "resume_session_id": ids}),
    message("audio_chunk", {"session_id": ids, "seq": nums, "is_final": st.booleans(), "payload": b64ish,
                            "client_timestamp_ms": nums}),
    message("utterance", {"session_id": ids, "utterance_index": nums, "manual_cut": st.booleans(),
                          "src_lang": st.sampled_from(SESSION_LANGS), "tgt_lang": st.sampled_from(SESSION_LANGS),
                          "audio": b64ish, "audio_format": st.sampled_from(["opus", "pcm16", "x"]),
                          "sample_rate": nums}),
    message("client_heartbeat", {"session_id": ids, "timestamp": nums}),
    message("tts_started", {"session_id": ids, "trace_id": ids, "group_id": ids, "ts_start_ms": nums}),
    message("tts_play_ended", {"session_id": ids, "trace_id": ids, "group_id": ids, "ts_end_ms": nums}),
    message("session_close", {"session_id": ids, "reason": forged_text}),
    message("room_create", {"client_ts": nums, "display_name": forged_text, "preferred_lang": st.sampled_from(SESSION_LANGS)}),
    message("room_join", {"room_code": st.one_of(st.text(max_size=8), nums), "display_name": forged_text}),
    message("webrtc_offer", {"room_code": st.text(max_size=8), "to": ids, "sdp": forged_text}),
)

OTHER = st.one_of(st.fixed_dictionaries({"type": st.text(max_size=20)}), anything)


def categories(messages: st.SearchStrategy[dict[str, Any]],
               others: st.SearchStrategy[Any]) -> dict[str, tuple[float, st.SearchStrategy[str | bytes]]]:
    """Frame categories with their share of the frames: ``str`` is a text frame, ``bytes`` binary."""
    anymsg = st.one_of(messages, messages, messages, others)
    as_json = anymsg.map(json.dumps)
    return {
        "valid-shaped": (0.40, messages.map(json.dumps)),
        "other type": (0.08, others.map(json.dumps)),
        "wrapped in array": (0.03, anymsg.map(lambda m: json.dumps([m]))),
        "truncated JSON": (0.10, st.tuples(as_json, st.floats(0.05, 0.95)).map(
            lambda p: p[0][: max(1, int(len(p[0]) * p[1]))])),
        "duplicate keys": (0.05, messages.map(lambda m: json.dumps(m)[:-1] + ', "type": "job_result"}')),
        "NaN/Infinity": (0.05, messages.map(
            lambda m: json.dumps({**m, "attempt_id": float("nan"), "seq": float("inf")}))),
        "deeply nested": (0.02, st.sampled_from([100, 1000, 100_000]).map(lambda d: "[" * d + "]" * d)),
        "random text": (0.08, st.text(max_size=200)),
        "binary": (0.09, st.binary(max_size=512)),
        "JSON as binary frame": (0.10, as_json.map(str.encode)),
    }


def draw(strategy: st.SearchStrategy[Any], count: int, seed: int) -> list[Any]:
    """``count`` values of ``strategy``, drawn by Hypothesis in one ``@given`` run (batches of
    ``BATCH`` per example: fewer examples, less overhead per value)."""
    out: list[Any] = []

    @hypothesis_seed(seed)
    @settings(max_examples=(count + BATCH - 1) // BATCH, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(strategy, min_size=BATCH, max_size=BATCH))
    def collect(batch: list[Any]) -> None:
        out.extend(batch)

    while len(out) < count:  # Hypothesis stops early when it believes it has seen every value
        before = len(out)
        collect()
        if len(out) == before:
            break
    while out and len(out) < count:  # a tiny space (e.g. three nesting depths): repeat it
        out.extend(out[: count - len(out)])
    return out[:count]


def generate(endpoint: str, count: int, seed: int = 0) -> tuple[list[str | bytes], Counter[str]]:
    """``count`` frames for ``"node"`` or ``"session"``, in a random order, and their categories."""
    own, other = (NODE_MESSAGES, SESSION_MESSAGES) if endpoint == "node" else (SESSION_MESSAGES, NODE_MESSAGES)
    oversized = min(4, 1 + count // 400)  # 4 MiB each and a reconnect: a few per endpoint
    cats = categories(own, st.one_of(OTHER, other))
    rest = count - oversized
    sizes = {name: int(rest * share) for name, (share, _) in cats.items()}
    sizes["valid-shaped"] += rest - sum(sizes.values())
    tagged: list[tuple[str, str | bytes]] = [("oversized", OVERSIZED)] * oversized
    for i, (name, (_, strategy)) in enumerate(cats.items()):
        tagged += [(name, frame) for frame in draw(strategy, sizes[name], seed * 100 + i)]
    random.Random(seed).shuffle(tagged)
    return [frame for _, frame in tagged], Counter(name for name, _ in tagged)


_PLACEHOLDER = re.compile("@@(SESSION|NODE|JOB|OWN)@@")


@dataclass
class Targets:
    """Live ids to put in the placeholders."""

    sessions: Callable[[], list[str]]
    nodes: Callable[[], list[str]]
    jobs: Callable[[], list[str]]


@dataclass
class AttackStats:
    frames: int = 0
    oversized: int = 0
    connections: int = 0
    connect_failures: int = 0
    unsendable: int = 0
    replies: Counter[str] = field(default_factory=Counter)  # error codes (and other types) received
    closes: Counter[str] = field(default_factory=Counter)  # close codes of the server


def fill(frame: str, own: str, targets: Targets, rng: random.Random) -> str:
    def one(m: re.Match[str]) -> str:
        kind = m.group(1)
        pool = {"SESSION": targets.sessions, "NODE": targets.nodes, "JOB": targets.jobs}.get(kind)
        if pool is None:
            return own
        values = pool()
        return rng.choice(values) if values else own
    return _PLACEHOLDER.sub(one, frame)


class Attacker:
    """One hostile peer: sends its share of frames to one scheduler, reconnecting whenever the
    scheduler closes it, while a reader counts what comes back."""

    def __init__(self, name: str, url: str, frames: list[str | bytes], targets: Targets, stats: AttackStats,
                 max_frame_bytes: int, seed: int) -> None:
        self.name, self.url, self.frames, self.targets, self.stats = name, url, frames, targets, stats
        self.max_frame_bytes = max_frame_bytes
        self.rng = random.Random(seed)
        self.conn_no = 0

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                    self.stats.replies[str(msg.get("code") or msg.get("type"))] += 1
                except Exception:
                    self.stats.replies["undecodable"] += 1

    async def run(self, duration: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        per_frame = duration / max(1, len(self.frames))
        i = 0
        while i < len(self.frames) and loop.time() < start + duration + 10:
            self.conn_no += 1
            own = f"{self.name}-{self.conn_no}"
            try:
                ws = await connect(self.url, max_size=None, compression=None, open_timeout=5, close_timeout=1)
            except Exception:
                self.stats.connect_failures += 1
                await asyncio.sleep(0.2)
                continue
            self.stats.connections += 1
            reader = asyncio.create_task(self._read(ws))
            try:
                while i < len(self.frames):
                    due = start + i * per_frame
                    if due > loop.time():  # spread the frames over the attack window
                        await asyncio.sleep(due - loop.time())
                    frame = self.frames[i]
                    oversized = frame == OVERSIZED
                    if oversized:
                        frame = '{"type":"audio_chunk","seq":1,"is_final":false,"payload":"' + \
                            "A" * self.max_frame_bytes + '"}'
                    elif isinstance(frame, str):
                        frame = fill(frame, own, self.targets, self.rng)
                    await ws.send(frame)  # raises when the scheduler closed us: sent again on the next one
                    i += 1
                    self.stats.frames += 1
                    self.stats.oversized += oversized
            except Exception:  # closed by the scheduler: reconnect and go on with the next frame
                code = ws.close_code
                self.stats.closes[str(code) if code is not None else "none"] += 1
                if i < len(self.frames) and self.frames[i] == OVERSIZED:
                    # the scheduler closes (1009) while the frame is still being written: it was sent
                    self.stats.frames += 1
                    self.stats.oversized += 1
                    i += 1
                elif code is None:  # not a closed socket: this frame cannot be sent at all
                    self.stats.unsendable += 1
                    i += 1
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 1)
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
