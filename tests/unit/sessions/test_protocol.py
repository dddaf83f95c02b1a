"""The session plane's rules, driven with bare events: no socket, no Redis, no sleep (the time is an
argument). Each test feeds ``SessionProtocol`` what the shell would and checks the actions it asks for."""

from __future__ import annotations

import base64
import json
import random

import msgspec
import pytest

from dragoman.core.audio import pcm16_silence
from dragoman.sessions.protocol import (
    Ack,
    CancelJob,
    CheckJobs,
    CloseSocket,
    Count,
    Detach,
    Dispatch,
    DispatchResult,
    End,
    Outcome,
    Reopen,
    ResumeState,
    RoomAnswer,
    RoomCall,
    RoomNews,
    Send,
    SessionProtocol,
    Settled,
)
from dragoman.sessions.spec import SessionConfig, SessionSpec
from dragoman.store.replies import JobState, JobStatus, RoomMemberRecord
from dragoman.wire import (
    AudioChunk,
    Backpressure,
    ErrorInfo,
    ErrorMessage,
    JobAssign,
    JobResult,
    MissingResult,
    RoomCreate,
    RoomCreateAck,
    RoomError,
    RoomExpired,
    RoomJoin,
    RoomLeave,
    RoomMembers,
    RoomRawVoicePreference,
    SessionClose,
    SessionCloseAck,
    SessionInit,
    SessionInitAck,
    TranslationResult,
    UiEvent,
    Utterance,
    WebrtcIce,
    WebrtcOffer,
    assign_frame,
    encode,
)

CONFIG = SessionConfig(outcome_check_ms=5_000, job_timeout_ms=60_000, pending_timeout_ms=10_000, max_attempts=3,
                       ack_interval_ms=1_000)


def spec(**init: object) -> SessionSpec:
    fields = {"src_lang": "zh", "tgt_lang": "en", "audio_format": "pcm16"} | init
    return SessionSpec.from_init(msgspec.convert({"type": "session_init", **fields}, SessionInit),
                                 session_id="s1", resume_token="tok")


def proto(**init: object) -> SessionProtocol:
    return SessionProtocol(spec(**init), CONFIG, now=0, wall_offset_ms=1_000_000, resume_token="tok")


def chunk(seq: int, ms: int = 500, final: bool = True) -> AudioChunk:
    return AudioChunk(seq=seq, is_final=final, payload=base64.b64encode(pcm16_silence(ms)).decode())


def sent(actions: list) -> list:
    return [a.message for a in actions if isinstance(a, Send)]


def dispatches(actions: list) -> list:
    return [a.request for a in actions if isinstance(a, Dispatch)]


def result(job: str, text: str = "hi", **extra: object) -> JobResult:
    return JobResult(job_id=job, attempt_id=1, node_id="n1", success=True, text_asr="asr", text_translated=text,
                     tts_audio="", tts_format="wav", **extra)  # type: ignore[arg-type]


def assigned(p: SessionProtocol, request, job: str, now: int, node: str = "n1") -> list:  # type: ignore[no-untyped-def]
    return p.dispatched(request, DispatchResult("assigned", job, node), now)


class TestStart:
    def test_a_new_session_is_acknowledged_with_its_resume_token(self) -> None:
        [ack] = sent(proto().start(0))
        assert isinstance(ack, SessionInitAck)
        assert (ack.session_id, ack.resume_token, ack.resumed, ack.protocol_version) == ("s1", "tok", None, "1.0")


class TestDispatch:
    def test_one_job_per_target_one_at_a_time_each_avoiding_the_nodes_before(self) -> None:
        p = proto(tgt_langs=["en", "de"])
        [first] = dispatches(p.receive(chunk(0), 10))
        assert (first.utt, first.tgt, first.pool, first.avoid, first.commit) == (0, "en", "zh>en", (), None)
        body = msgspec.json.decode(assign_frame(first.body, "c0.x", 1), type=JobAssign)
        assert (body.session_id, body.utterance_index, body.tgt_lang, body.is_manual_cut) == ("s1", 0, "en", True)
        assert len(base64.b64decode(body.audio)) == 2 * 16 * 500
        actions = assigned(p, first, "c0.a", 11, node="n1")
        [ui] = sent(actions)
        assert isinstance(ui, UiEvent) and (ui.event, ui.job_id) == ("DISPATCHED", "c0.a")
        [second] = dispatches(actions)
        assert (second.tgt, second.avoid) == ("de", ("n1",))
        assert second.commit == (1, 1, 0, -1)  # once every target is a job, the cut is committed

    def test_a_full_queue_says_busy_and_the_outcome_follows_from_redis(self) -> None:
        p = proto()
        [req] = dispatches(p.receive(chunk(0), 0))
        actions = p.dispatched(req, DispatchResult("failed", "c0.a", "", "NODE_OVERLOADED"), 1)
        assert [type(m) for m in sent(actions)] == [Backpressure]
        out = sent(p.outcome(Outcome("c0.a", "failed", "NODE_OVERLOADED"), 2))
        assert isinstance(out[0], ErrorMessage) and out[0].code == "NODE_OVERLOADED"
        assert out[0].details == {"session_id": "s1", "utterance_index": 0, "tgt_lang": "en",
                                  "trace_id": p.spec.trace_id, "job_id": "c0.a"}

    def test_the_store_out_of_reach_answers_that_utterance(self) -> None:
        p = proto()
        [req] = dispatches(p.receive(chunk(0), 0))
        [err, ui] = sent(p.dispatched(req, DispatchResult("error", message="Redis unreachable"), 1))
        assert isinstance(err, ErrorMessage) and err.code == "SCHEDULER_DEPENDENCY_DOWN"
        assert isinstance(ui, UiEvent) and ui.event == "ERROR"
        assert p.owed() == 0

    def test_a_session_taken_over_elsewhere_stops_speaking_for_it(self) -> None:
        p = proto()
        [req] = dispatches(p.receive(chunk(0), 0))
        actions = p.dispatched(req, DispatchResult("superseded"), 1)
        assert isinstance(sent(actions)[0], ErrorMessage) and actions[-1] == CloseSocket(4000)
        assert p.finished


class TestOutcomes:
    def test_results_are_released_in_utterance_order_each_once(self) -> None:
        p = proto()
        reqs = []
        for i in range(3):
            reqs += dispatches(p.receive(chunk(i), 10 * i))
            for r in reqs[-1:]:
                assigned(p, r, f"c0.{i}", 10 * i + 1)
        assert sent(p.outcome(Outcome("c0.2", "completed", result=result("c0.2", "two")), 100)) == []
        assert sent(p.outcome(Outcome("c0.1", "completed", result=result("c0.1", "one")), 101)) == []
        out = sent(p.outcome(Outcome("c0.0", "completed", result=result("c0.0", "zero")), 102))
        assert [(m.utterance_index, m.text_translated) for m in out] == [(0, "zero"), (1, "one"), (2, "two")]
        assert sent(p.outcome(Outcome("c0.1", "completed", result=result("c0.1", "again")), 103)) == []
        assert p.late_outcomes == 1

    def test_each_outcome_kind_becomes_its_client_message(self) -> None:
        p = proto()
        for i in range(3):
            [r] = dispatches(p.receive(chunk(i), i))
            assigned(p, r, f"c0.{i}", i)
        payload = encode(result("c0.0", "text", extra={"service_timings": {"asr": 5}}))
        [t] = sent(p.outcome(Outcome("c0.0", "completed", payload=payload), 5))
        assert isinstance(t, TranslationResult) and (t.text_translated, t.service_timings, t.tgt_lang) == (
            "text", {"asr": 5}, "en")
        assert t.scheduler_sent_at_ms == 1_000_005
        empty = result("c0.1", "", extra={"reason": "NO_TEXT_ASSIGNED"})
        [m] = sent(p.outcome(Outcome("c0.1", "completed_empty", result=empty), 6))
        assert isinstance(m, MissingResult) and m.reason == "no_text_assigned"
        failed = JobResult(job_id="c0.2", attempt_id=1, node_id="n1", success=False,
                           error=ErrorInfo(code="ASR_FAILED", message="boom"))
        [err, ui] = sent(p.outcome(Outcome("c0.2", "failed", "PROCESSING_ERROR", result=failed), 7))
        assert isinstance(err, ErrorMessage) and (err.code, err.message) == ("PROCESSING_ERROR", "boom")
        assert (err.details["utterance_index"], err.details["node_error_code"]) == (2, "ASR_FAILED")
        assert isinstance(ui, UiEvent) and (ui.event, ui.error_code) == ("ERROR", "PROCESSING_ERROR")

    def test_a_taken_outcome_is_counted_once_and_acknowledged_after_it_was_sent(self) -> None:
        p = proto()
        [r] = dispatches(p.receive(chunk(0), 0))
        assigned(p, r, "c0.a", 1)
        actions = p.outcome(Outcome("c0.a", "completed", result=result("c0.a")), 2)
        assert Settled("completed", "") in actions
        assert not [a for a in actions if isinstance(a, Ack)]  # acknowledgements are batched
        assert p.next_deadline() == 2 + CONFIG.ack_interval_ms
        # (its outcome came from Redis: an ended job of its own, forgotten without a read)
        assert Ack((), ("c0.a",)) in p.tick(2 + CONFIG.ack_interval_ms)


class TestDeadlines:
    def test_a_job_waited_on_is_checked_and_a_lost_outcome_is_recovered(self) -> None:
        p = proto()
        [r] = dispatches(p.receive(chunk(0), 0))
        assigned(p, r, "c0.a", 0)
        assert p.next_deadline() == CONFIG.outcome_check_ms
        [check] = [a for a in p.tick(CONFIG.outcome_check_ms) if isinstance(a, CheckJobs)]
        assert check.job_ids == ("c0.a",)
        kept = JobStatus(job="c0.a", state=JobState.COMPLETED, result=encode(result("c0.a", "kept")))
        [t] = sent(p.checked({"c0.a": kept}, CONFIG.outcome_check_ms + 1))
        assert t.text_translated == "kept"

    def test_a_job_still_running_is_waited_for_and_checked_again(self) -> None:
        p = proto()
        [r] = dispatches(p.receive(chunk(0), 0))
        assigned(p, r, "c0.a", 0)
        p.tick(5_000)
        assert sent(p.checked({"c0.a": JobStatus(job="c0.a", state=JobState.RUNNING)}, 5_001)) == []
        assert p.next_deadline() == 10_001 and p.owed() == 1

    def test_a_job_redis_lost_is_dispatched_again_once_then_answered(self) -> None:
        p = proto()
        [r] = dispatches(p.receive(chunk(0), 0))
        assigned(p, r, "c0.a", 0)
        p.tick(5_000)
        actions = p.checked({"c0.a": JobStatus(job="c0.a", state=JobState.MISSING)}, 5_001)
        [again] = dispatches(actions)
        assert Count("lost_job_rerun") in actions
        assert (again.utt, again.tgt, again.body) == (0, "en", r.body) and again.unique != r.unique
        assigned(p, again, "c0.b", 5_002)
        p.tick(10_002)
        actions = p.checked({"c0.b": JobStatus(job="c0.b", state=JobState.MISSING)}, 10_003)
        [err, _] = sent(actions)
        assert isinstance(err, ErrorMessage) and err.code == "JOB_TIMEOUT" and "lost" in err.message
        assert Count("lost_job_failed") in actions
        assert p.owed() == 0

    def test_past_its_bound_a_job_is_answered_and_cancelled(self) -> None:
        p = proto()
        [r] = dispatches(p.receive(chunk(0), 0))
        assigned(p, r, "c0.a", 0)
        actions = p.tick(CONFIG.job_bound_ms)
        assert CancelJob("c0.a", "JOB_TIMEOUT") in actions
        assert [m.code for m in sent(actions) if isinstance(m, ErrorMessage)] == ["JOB_TIMEOUT"]
        # the job may still run (the cancel is on its way): its ack reads it first, never forgets it unread
        assert Ack(("c0.a",), ()) in p.tick(CONFIG.job_bound_ms + CONFIG.ack_interval_ms)

    def test_after_redis_lost_its_data_the_record_is_reopened_and_every_job_checked(self) -> None:
        p = proto()
        for i in range(2):
            [r] = dispatches(p.receive(chunk(i), i))
            assigned(p, r, f"c0.{i}", i)
        actions = p.redis_reset(10)
        assert actions == [Reopen(), CheckJobs(("c0.0", "c0.1"))]


class TestEnd:
    def test_session_close_flushes_what_is_owed_then_acknowledges(self) -> None:
        p = proto()
        p.receive(chunk(0, final=False), 0)  # buffered: the close cuts it
        [r] = dispatches(p.receive(SessionClose(reason="bye"), 1))
        actions = assigned(p, r, "c0.a", 2)
        assert not [a for a in actions if isinstance(a, End)]
        actions = p.outcome(Outcome("c0.a", "completed", result=result("c0.a")), 3)
        msgs = sent(actions)
        assert isinstance(msgs[0], TranslationResult) and isinstance(msgs[-1], SessionCloseAck)
        assert End() in actions and CloseSocket() in actions and p.finished

    def test_a_lost_socket_detaches_the_session_for_a_resume(self) -> None:
        p = proto()
        [r] = dispatches(p.receive(chunk(0), 0))
        assigned(p, r, "c0.a", 0)
        p.outcome(Outcome("c0.a", "completed", result=result("c0.a")), 1)
        assert p.socket_lost(2) == [Ack((), ("c0.a",)), Detach()]
        assert p.socket_lost(3) == []


class TestResume:
    def resumed(self) -> SessionProtocol:
        jobs = (
            JobStatus(job="c0.0", state=JobState.COMPLETED, utt=0, tgt="en", result=encode(result("c0.0", "zero"))),
            JobStatus(job="c0.1", state=JobState.RUNNING, utt=1, tgt="en"),
            JobStatus(job="c0.2", state=JobState.MISSING, utt=2, tgt="en"),
            JobStatus(job="c0.3", state=JobState.ASSIGNED, utt=3, tgt="en"),  # past the resume point
        )
        return SessionProtocol(spec(), CONFIG, now=0, resume=ResumeState(epoch=2, next_utt=3, seq=5, skip=0, jobs=jobs))

    def test_a_resumed_session_gets_what_it_is_owed_and_redoes_what_was_not_committed(self) -> None:
        p = self.resumed()
        actions = p.start(0)
        msgs = sent(actions)
        ack = msgs[0]
        assert isinstance(ack, SessionInitAck) and (ack.resumed, ack.resume_from_seq, ack.resume_from_utterance_index) \
            == (True, 5, 3)
        assert isinstance(msgs[1], TranslationResult) and msgs[1].text_translated == "zero"
        assert CancelJob("c0.3", "SESSION_CLOSED") in actions  # the client sends that audio again
        assert p.epoch == 2 and p.owed() == 2  # 1 running, 2 lost (answered once 1 is)
        out = sent(p.outcome(Outcome("c0.1", "completed", result=result("c0.1", "one")), 1))
        assert [(type(m).__name__, m.utterance_index if not isinstance(m, ErrorMessage) else m.details["utterance_index"])
                for m in out if not isinstance(m, UiEvent)] == [("TranslationResult", 1), ("ErrorMessage", 2)]

    def test_audio_sent_again_continues_the_numbering_and_old_chunks_are_ignored(self) -> None:
        p = self.resumed()
        p.start(0)
        assert dispatches(p.receive(chunk(4), 1)) == []  # already made into jobs
        [r] = dispatches(p.receive(chunk(5), 2))
        assert r.utt == 3 and r.commit == (4, 6, 0, -1)


class TestClientRules:
    def test_streaming_and_whole_utterances_do_not_mix(self) -> None:
        p = proto()
        p.receive(chunk(0), 0)
        [err] = sent(p.receive(Utterance(utterance_index=1, src_lang="zh", tgt_lang="en", audio="AAAA",
                                         audio_format="pcm16"), 1))
        assert isinstance(err, ErrorMessage) and "do not mix" in err.message

    def test_client_numbered_utterances_must_increase(self) -> None:
        p = proto()
        u = Utterance(utterance_index=4, src_lang="zh", tgt_lang="en", audio="AAAA", audio_format="pcm16")
        [r] = dispatches(p.receive(u, 0))
        assert (r.utt, r.commit) == (4, (5, 0, 0, -1))
        [err] = sent(p.receive(u, 1))
        assert "must increase" in err.message

    def test_two_way_jobs_carry_the_pair_and_auto(self) -> None:
        p = proto(src_lang="auto", mode="two_way_auto", lang_a="zh", lang_b="en")
        [r] = dispatches(p.receive(chunk(0), 0))
        body = json.loads(r.body)
        assert r.pool == "en<>zh"
        assert (body["src_lang"], body["lang_a"], body["lang_b"], body["auto_langs"], body["mode"]) == (
            "auto", "zh", "en", ["zh", "en"], "two_way_auto")

    @pytest.mark.parametrize("bad", ["@@@", "no base64!"])
    def test_bad_audio_is_refused_and_changes_nothing(self, bad: str) -> None:
        p = proto()
        [err] = sent(p.receive(AudioChunk(seq=0, is_final=True, payload=bad), 0))
        assert isinstance(err, ErrorMessage) and "base64" in err.message and p.owed() == 0


class TestRooms:
    def in_room(self, lang: str = "en") -> SessionProtocol:
        p = SessionProtocol(spec(tgt_lang=lang), CONFIG, now=0, rng=random.Random(7))
        p.start(0)
        [call] = [a for a in p.receive(RoomCreate(client_ts=1), 0) if isinstance(a, RoomCall)]
        p.room_answered(call, RoomAnswer("created", room_id="r1"), 1)
        return p

    def test_create_answers_its_code_and_a_code_in_use_is_retried(self) -> None:
        p = SessionProtocol(spec(), CONFIG, now=0, rng=random.Random(7))
        [call] = [a for a in p.receive(RoomCreate(client_ts=1, display_name="Ann"), 0) if isinstance(a, RoomCall)]
        assert call.op == "create" and len(call.code) == 6 and call.code.isdigit()
        assert json.loads(call.arg5) == {"display_name": "Ann", "preferred_lang": None, "lang": "en"}
        [retry] = [a for a in p.room_answered(call, RoomAnswer("collision"), 1) if isinstance(a, RoomCall)]
        assert retry.op == "create" and retry.code != call.code
        [ack] = sent(p.room_answered(retry, RoomAnswer("created", room_id="r1"), 2))
        assert ack == RoomCreateAck(room_code=retry.code, room_id="r1") and p.room == retry.code

    def test_join_refusals(self) -> None:
        p = SessionProtocol(spec(), CONFIG, now=0)
        [err] = sent(p.receive(RoomJoin(room_code="12ab56"), 0))
        assert err == RoomError(code="INVALID_ROOM_CODE", message="a room code is 6 digits")
        [call] = [a for a in p.receive(RoomJoin(room_code="123456"), 1) if isinstance(a, RoomCall)]
        [full] = sent(p.room_answered(call, RoomAnswer("error", code="ROOM_FULL"), 2))
        assert full.code == "ROOM_FULL" and p.room is None
        [call] = [a for a in p.receive(RoomJoin(room_code="123456"), 3) if isinstance(a, RoomCall)]
        p.room_answered(call, RoomAnswer("joined"), 4)
        [again] = sent(p.receive(RoomJoin(room_code="654321"), 5))
        assert again.code == "ALREADY_IN_ROOM"
        [not_in] = sent(p.receive(RoomLeave(room_code="654321"), 6))
        assert not_in.code == "NOT_IN_ROOM"

    def test_an_utterance_makes_one_job_per_language_of_the_others_and_the_speaker_hears_none(self) -> None:
        p = self.in_room("zh")
        [speak] = [a for a in p.receive(chunk(0), 10) if isinstance(a, RoomCall)]
        assert speak.op == "speak"
        members = (member("s1", "zh"), member("a", "en", "p1"), member("b", "de", "p2"), member("c", "en", "p2"))
        [first] = dispatches(p.room_answered(speak, RoomAnswer("ok", members=members), 11))
        assert (first.tgt, first.pool, first.listeners, first.commit) == ("de", "zh>de", ("b@p2",), None)
        [second] = dispatches(p.dispatched(first, DispatchResult("assigned", "c0.de", "n1"), 12))
        assert (second.tgt, second.listeners, second.avoid) == ("en", ("a@p1", "c@p2"), ("n1",))
        assert second.commit == (1, 1, 0, -1)
        assert sent(p.dispatched(second, DispatchResult("assigned", "c0.en", "n2"), 13)) == []
        assert p.owed() == 0  # its own speech is not owed to it

    def test_alone_in_a_room_a_session_behaves_as_outside_one(self) -> None:
        p = self.in_room("en")
        [speak] = [a for a in p.receive(chunk(0), 10) if isinstance(a, RoomCall)]
        [req] = dispatches(p.room_answered(speak, RoomAnswer("ok", members=(member("s1", "en"),)), 11))
        assert (req.tgt, req.listeners) == ("en", ()) and p.owed() == 1

    def test_a_listener_gets_each_speakers_utterances_in_order_under_the_speakers_id(self) -> None:
        p = self.in_room("en")
        for utt, job in ((0, "c0.a0"), (1, "c0.a1")):
            p.expect_room_job(job, "alice", utt, "en", 5)
        p.expect_room_job("c0.b0", "bob", 0, "en", 5)
        assert sent(p.outcome(Outcome("c0.a1", "completed", result=result("c0.a1", "second")), 6)) == []
        [bob] = sent(p.outcome(Outcome("c0.b0", "completed", result=result("c0.b0", "bob's")), 7))
        assert (bob.session_id, bob.utterance_index) == ("bob", 0)  # speakers do not wait for each other
        out = sent(p.outcome(Outcome("c0.a0", "completed", result=result("c0.a0", "first")), 8))
        assert [(m.session_id, m.utterance_index, m.text_translated) for m in out] == [
            ("alice", 0, "first"), ("alice", 1, "second")]

    def test_a_listener_that_leaves_is_owed_nothing_more(self) -> None:
        p = self.in_room("en")
        p.expect_room_job("c0.a0", "alice", 0, "en", 5)
        actions = p.receive(RoomLeave(room_code=p.room or ""), 6)
        assert [a.op for a in actions if isinstance(a, RoomCall)] == ["leave"]
        assert p.owed() == 0
        assert sent(p.outcome(Outcome("c0.a0", "completed", result=result("c0.a0")), 7)) == []
        assert p.expect_room_job("c0.a1", "alice", 1, "en", 8) == [] and p.owed() == 0

    def test_room_news_becomes_the_web_clients_messages(self) -> None:
        p = self.in_room("en")
        code = p.room or ""
        payload = json.dumps([{"session_id": "s1", "display_name": "Ann", "preferred_lang": None, "prefs": {},
                               "joined_at": 5}, {"session_id": "s2", "prefs": {"s1": False}, "joined_at": 6}])
        [members] = sent(p.room_news(RoomNews(code, "members", payload=payload), 9))
        assert isinstance(members, RoomMembers) and [m.participant_id for m in members.members] == ["s1", "s2"]
        assert members.members[1].raw_voice_preferences == {"s1": False}
        offer = encode(WebrtcOffer(room_code=code, to="s1", sdp={"type": "offer"}))
        [relayed] = sent(p.room_news(RoomNews(code, "signal", sender="s2", payload=offer), 10))
        assert relayed == WebrtcOffer(room_code=code, to="s2", sdp={"type": "offer"})
        [expired] = sent(p.room_news(RoomNews(code, "expired"), 11))
        assert isinstance(expired, RoomExpired) and p.room is None
        assert sent(p.room_news(RoomNews(code, "members", payload=payload), 12)) == []  # not in it any more

    def test_a_listeners_error_names_whose_utterance_failed(self) -> None:
        p = self.in_room("en")
        p.expect_room_job("c0.a0", "alice", 0, "en", 5)
        [err, ui] = sent(p.outcome(Outcome("c0.a0", "failed", "JOB_TIMEOUT"), 6))
        assert isinstance(err, ErrorMessage) and err.code == "JOB_TIMEOUT"
        assert (err.details["session_id"], err.details["utterance_index"], err.details["tgt_lang"]) == (
            "alice", 0, "en")
        assert isinstance(ui, UiEvent) and ui.session_id == "s1"  # the listener's own ui event
        [r] = dispatches(p.receive(RoomLeave(room_code=p.room or ""), 7) + p.receive(chunk(0), 8))
        [own, _] = sent(p.dispatched(r, DispatchResult("failed", "c0.x", code="NO_AVAILABLE_NODE"), 9)
                        + p.outcome(Outcome("c0.x", "failed", "NO_AVAILABLE_NODE"), 10))
        assert own.details["session_id"] == "s1"  # its own utterance: its own id

    def test_a_room_jobs_ack_is_read_first_an_own_jobs_is_not(self) -> None:
        """A room job is its listeners' together: each ack counts toward forgetting it (ack_outcomes
        reads it); the session's own job, ended as Redis said, is forgotten unread."""
        p = self.in_room("en")
        p.expect_room_job("c0.a0", "alice", 0, "en", 5)
        p.outcome(Outcome("c0.a0", "completed", result=result("c0.a0")), 6)
        [r] = dispatches(p.receive(RoomLeave(room_code=p.room or ""), 7) + p.receive(chunk(0), 8))
        p.dispatched(r, DispatchResult("assigned", "c0.x", node="n1"), 9)
        p.outcome(Outcome("c0.x", "completed", result=result("c0.x")), 10)
        acks = [a for a in p.tick(10 + CONFIG.ack_interval_ms) if isinstance(a, Ack)]
        assert acks == [Ack(("c0.a0",), ("c0.x",))]

    def test_a_listeners_error_names_the_speakers_pool(self) -> None:
        p = self.in_room("en")  # the listener speaks zh; the speaker speaks fr
        p.expect_room_job("c0.a0", "alice", 0, "en", 5, pool="fr>en")
        [err, _] = sent(p.outcome(Outcome("c0.a0", "failed", "NO_AVAILABLE_NODE"), 6))
        assert err.message == "no node serves fr>en"

    def test_signalling_and_preferences_go_to_the_room(self) -> None:
        p = self.in_room("en")
        code = p.room or ""
        [pref] = p.receive(RoomRawVoicePreference(room_code=code, target_session_id="s2", receive_raw_voice=False), 1)
        assert pref == RoomCall("prefer", code, "s2", "0")
        [sig] = p.receive(WebrtcIce(room_code=code, to="s2", candidate={"c": 1}), 2)
        assert (sig.op, sig.arg5, json.loads(sig.arg6)["candidate"]) == ("signal", "s2", {"c": 1})

    def test_a_closed_socket_leaves_the_room(self) -> None:
        p = self.in_room("en")
        actions = p.socket_lost(5)
        assert [type(a).__name__ for a in actions] == ["RoomCall", "Detach"] and actions[0].op == "leave"


class TestRoomsAfterRedisLostThem:
    """Redis lost a room or a membership (its data, writes lost in a failover, or this process
    declared dead during a stall): on the session's redis_reset, a member joins its room again."""

    def in_room(self) -> tuple[SessionProtocol, RoomCall]:
        p = SessionProtocol(spec(tgt_lang="de"), CONFIG, now=0, rng=random.Random(7))
        p.start(0)
        [call] = [a for a in p.receive(RoomCreate(client_ts=1, display_name="Ann", preferred_lang="en"), 0)
                  if isinstance(a, RoomCall)]
        p.room_answered(call, RoomAnswer("created", room_id="r1"), 1)
        return p, call

    def rejoin(self, p: SessionProtocol, now: int = 10) -> RoomCall:
        [call] = [a for a in p.redis_reset(now) if isinstance(a, RoomCall)]
        return call

    def test_a_member_joins_its_room_again_as_it_was(self) -> None:
        p, created = self.in_room()
        p.expect_room_job("c0.b0", "bob", 0, "en", 5)
        actions = p.redis_reset(10)
        assert actions == [Reopen(), CheckJobs(("c0.b0",)), RoomCall("join", created.code, created.arg5, "16",
                                                                     rejoin=True)]
        assert json.loads(created.arg5) == {"display_name": "Ann", "preferred_lang": "en", "lang": "en"}
        assert sent(p.room_answered(actions[-1], RoomAnswer("joined", room_id="r1"), 11)) == []
        assert p.room == created.code and p.owed() == 1  # still hears bob
        [err] = sent(p.receive(RoomJoin(room_code="654321"), 12))
        assert err.code == "ALREADY_IN_ROOM"
        assert [a.op for a in p.receive(chunk(0), 13) if isinstance(a, RoomCall)] == ["speak"]

    def test_a_member_redis_still_lists_stays(self) -> None:
        p, created = self.in_room()
        call = self.rejoin(p)
        assert sent(p.room_answered(call, RoomAnswer("error", code="ALREADY_IN_ROOM"), 11)) == []
        assert p.room == created.code

    @pytest.mark.parametrize("code", ["ROOM_NOT_FOUND", "ROOM_FULL"])
    def test_a_room_that_cannot_be_joined_again_is_over_for_the_client(self, code: str) -> None:
        p, created = self.in_room()
        p.expect_room_job("c0.b0", "bob", 0, "en", 5)
        call = self.rejoin(p)
        [expired] = sent(p.room_answered(call, RoomAnswer("error", code=code), 11))
        assert isinstance(expired, RoomExpired) and expired.room_code == created.code  # the web client leaves room mode
        assert p.room is None and p.owed() == 0
        assert dispatches(p.receive(chunk(0), 12))[0].listeners == ()  # its own targets again
        assert [a.op for a in p.receive(RoomCreate(client_ts=2), 13) if isinstance(a, RoomCall)] == ["create"]

    def test_the_store_out_of_reach_is_tried_again_then_given_up(self) -> None:
        p, created = self.in_room()
        call = self.rejoin(p, now=10)
        assert sent(p.room_answered(call, RoomAnswer("unreachable"), 11)) == []
        assert p.room == created.code and p.next_deadline() == 11 + CONFIG.outcome_check_ms
        answers = []
        for _ in range(2):  # the second and third tries
            now = p.next_deadline() or 0
            [again] = [a for a in p.tick(now) if isinstance(a, RoomCall)]
            assert again == call
            answers.append(sent(p.room_answered(again, RoomAnswer("unreachable"), now + 1)))
        assert answers[0] == [] and isinstance(answers[1][0], RoomExpired)
        assert p.room is None and p.next_deadline() is None

    def test_a_member_that_leaves_meanwhile_is_not_joined_again(self) -> None:
        p, created = self.in_room()
        call = self.rejoin(p)
        [leave] = [a for a in p.receive(RoomLeave(room_code=created.code), 11) if isinstance(a, RoomCall)]
        assert leave == RoomCall("leave", created.code)
        assert p.room_answered(call, RoomAnswer("joined"), 12) == [RoomCall("leave", created.code)]
        assert p.room is None
        assert not [a for a in p.redis_reset(20) if isinstance(a, RoomCall)]  # not in a room: nothing to join

    def test_a_member_that_leaves_while_a_retry_waits_is_not_joined_again(self) -> None:
        p, created = self.in_room()
        p.room_answered(self.rejoin(p), RoomAnswer("unreachable"), 11)
        p.receive(RoomLeave(room_code=created.code), 12)
        assert p.next_deadline() is None
        assert not [a for a in p.tick(11 + CONFIG.outcome_check_ms) if isinstance(a, RoomCall)]


def member(sid: str, lang: str, proc: str = "p1") -> RoomMemberRecord:
    return RoomMemberRecord(session_id=sid, lang=lang, proc=proc)
