"""Framing, durations and WAV helpers of dragoman.core.audio (shared by the scheduler and node engines)."""

from __future__ import annotations

import array
import io
import sys
import wave
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragoman.core.audio import (
    duration_ms,
    frame_opus_packet,
    join_opus,
    opus_duration_ms,
    pcm16_duration_ms,
    pcm16_silence,
    read_wav_pcm16,
    resample_linear,
    split_opus_frames,
    split_opus_packets,
    wav_bytes,
    write_wav_pcm16,
)

packets_st = st.lists(st.binary(min_size=1, max_size=300), max_size=20)


def _samples(pcm: bytes) -> list[int]:
    values = array.array("h")
    values.frombytes(pcm)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def _pcm(samples: list[int]) -> bytes:
    values = array.array("h", samples)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _write_wav(path: Path, frames: bytes, *, channels: int, width: int, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(frames)


class TestOpusFraming:
    def test_split_reads_little_endian_length_prefixes(self) -> None:
        payload = b"\x03\x00abc" + b"\x01\x00z" + (300).to_bytes(2, "little") + b"x" * 300
        assert split_opus_packets(payload) == [b"abc", b"z", b"x" * 300]
        assert opus_duration_ms(payload) == 60

    def test_frames_keep_their_prefix(self) -> None:
        assert split_opus_frames(b"\x02\x00ab\x01\x00c") == [b"\x02\x00ab", b"\x01\x00c"]

    def test_empty_payload_is_no_packets(self) -> None:
        assert split_opus_packets(b"") == []
        assert opus_duration_ms(b"") == 0

    @pytest.mark.parametrize(
        ("payload", "message"),
        [
            (b"\x05\x00abc", "claims 5 bytes but only 3 remain"),
            (b"\x01\x00a\x07", "truncated length prefix at byte 3"),
            (b"\x00\x00", "zero-length packet at byte 0"),
            (b"\x01\x00a\x00\x00", "zero-length packet at byte 3"),
        ],
    )
    def test_invalid_framing_is_rejected_with_position(self, payload: bytes, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            split_opus_packets(payload)
        with pytest.raises(ValueError):
            opus_duration_ms(payload)

    @given(packets_st)
    def test_join_then_split_round_trips(self, packets: list[bytes]) -> None:
        assert split_opus_packets(join_opus(packets)) == packets
        assert opus_duration_ms(join_opus(packets)) == 20 * len(packets)

    @given(packets_st, packets_st)
    def test_concatenated_payloads_are_valid_framing(self, a: list[bytes], b: list[bytes]) -> None:
        assert split_opus_packets(join_opus(a) + join_opus(b)) == a + b

    @pytest.mark.parametrize("size", [0, 0x10000])
    def test_unframeable_packet_sizes_are_rejected(self, size: int) -> None:
        with pytest.raises(ValueError, match="1..65535"):
            frame_opus_packet(b"x" * size)


class TestDurations:
    def test_pcm16_duration(self) -> None:
        assert pcm16_duration_ms(32_000, 16_000) == 1000
        assert pcm16_duration_ms(8192, 16_000) == 256
        assert pcm16_duration_ms(30, 16_000) == 0  # 15 samples: rounds down

    def test_pcm16_odd_byte_count_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="even byte count"):
            pcm16_duration_ms(3, 16_000)

    def test_pcm16_bad_rate_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="sample_rate"):
            pcm16_duration_ms(2, 0)

    def test_generic_duration_dispatches_on_format(self) -> None:
        assert duration_ms("opus", join_opus([b"a"] * 13), 16_000) == 260
        assert duration_ms("pcm16", pcm16_silence(250), 16_000) == 250
        with pytest.raises(ValueError, match="unknown audio_format 'mp3'"):
            duration_ms("mp3", b"", 16_000)

    def test_silence(self) -> None:
        assert pcm16_silence(10) == bytes(320)
        assert pcm16_silence(10, 8000) == bytes(160)
        assert pcm16_silence(0) == b""


class TestWav:
    def test_mono_16k_round_trip(self, tmp_path: Path) -> None:
        pcm = _pcm([0, 1, -1, 32767, -32768, 1234])
        write_wav_pcm16(tmp_path / "a.wav", pcm)
        assert read_wav_pcm16(tmp_path / "a.wav") == (pcm, 16_000)

    def test_stereo_is_averaged_to_mono(self, tmp_path: Path) -> None:
        interleaved = _pcm([100, 300, -32768, -32768, 32767, 32767, 10, -10])
        _write_wav(tmp_path / "s.wav", interleaved, channels=2, width=2, rate=16_000)
        pcm, rate = read_wav_pcm16(tmp_path / "s.wav")
        assert rate == 16_000
        assert _samples(pcm) == [200, -32768, 32767, 0]

    def test_other_rates_are_resampled_to_16k(self, tmp_path: Path) -> None:
        _write_wav(tmp_path / "r.wav", _pcm([0, 100, 200, 300]), channels=1, width=2, rate=8000)
        pcm, rate = read_wav_pcm16(tmp_path / "r.wav")
        assert rate == 16_000
        assert _samples(pcm) == [0, 50, 100, 150, 200, 250, 300, 300]

    def test_one_second_at_44k1_becomes_one_second_at_16k(self, tmp_path: Path) -> None:
        _write_wav(tmp_path / "cd.wav", bytes(2 * 44_100), channels=1, width=2, rate=44_100)
        pcm, _ = read_wav_pcm16(tmp_path / "cd.wav")
        assert pcm16_duration_ms(len(pcm), 16_000) == 1000

    @pytest.mark.parametrize("width", [1, 3, 4])
    def test_other_sample_widths_are_rejected(self, tmp_path: Path, width: int) -> None:
        _write_wav(tmp_path / "w.wav", bytes(width * 10), channels=1, width=width, rate=16_000)
        with pytest.raises(ValueError, match=f"{8 * width}-bit samples are not supported"):
            read_wav_pcm16(tmp_path / "w.wav")

    def test_wav_bytes_is_a_readable_mono_wav(self) -> None:
        pcm = _pcm([0, 1, -1, 32767, -32768] * 32)
        with wave.open(io.BytesIO(wav_bytes(pcm, 22_050))) as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22_050)
            assert wav.readframes(wav.getnframes()) == pcm

    def test_wav_bytes_is_what_write_wav_pcm16_writes(self, tmp_path: Path) -> None:
        pcm = _pcm([5, -5, 1000])
        write_wav_pcm16(tmp_path / "b.wav", pcm, 8000)
        assert (tmp_path / "b.wav").read_bytes() == wav_bytes(pcm, 8000)
        assert wav_bytes(b"", 16_000)[:4] == b"RIFF"

    @pytest.mark.parametrize(
        ("pcm", "rate", "message"),
        [(b"\x00", 16_000, "even byte count"), (b"\x00\x00", 0, "sample_rate")],
    )
    def test_bad_audio_is_rejected_before_any_file_is_made(
        self, tmp_path: Path, pcm: bytes, rate: int, message: str
    ) -> None:
        with pytest.raises(ValueError, match=message):
            wav_bytes(pcm, rate)
        with pytest.raises(ValueError, match=message):
            write_wav_pcm16(tmp_path / "bad.wav", pcm, rate)
        assert not (tmp_path / "bad.wav").exists()

    def test_not_a_wav_is_rejected(self, tmp_path: Path) -> None:
        (tmp_path / "x.wav").write_bytes(b"RIFF\x00\x00\x00\x00JUNKJUNK")
        with pytest.raises(ValueError, match="not a PCM WAV"):
            read_wav_pcm16(tmp_path / "x.wav")


class TestResample:
    def test_downsampling_interpolates_and_rounds_half_away_from_zero(self) -> None:
        # 3 -> 2: output sample 1 sits at input position 1.5.
        assert resample_linear(array.array("h", [0, 1, 3]), 3, 2).tolist() == [0, 2]
        assert resample_linear(array.array("h", [0, -1, -3]), 3, 2).tolist() == [0, -2]

    @given(st.lists(st.integers(-32768, 32767), max_size=50), st.sampled_from([8000, 22_050, 44_100, 48_000]))
    def test_output_length_and_range(self, samples: list[int], src: int) -> None:
        out = resample_linear(array.array("h", samples), src, 16_000)
        assert len(out) == len(samples) * 16_000 // src
        if samples:
            assert all(min(samples) <= v <= max(samples) for v in out)


def test_read_wav_pcm16_from_memory_matches_the_file(tmp_path) -> None:
    import io
    import wave

    path = tmp_path / "stereo8k.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x10\x00\x30\x00" * 800)
    from_file = read_wav_pcm16(path)
    from_memory = read_wav_pcm16(io.BytesIO(path.read_bytes()))
    assert from_memory == from_file and from_file[1] == 16000 and len(from_file[0]) == 3200
    with pytest.raises(ValueError, match="WAV data: not a PCM WAV"):
        read_wav_pcm16(io.BytesIO(b"not a wav"))
