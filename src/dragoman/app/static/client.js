// Dragoman web client: microphone -> 16 kHz mono pcm16 -> /ws/session, results in a table.
//
// Flow: Start opens the microphone first (so the permission prompt comes before the session),
// buffers audio while the WebSocket connects, sends session_init, and on session_init_ack
// streams audio_chunk messages every ~200 ms. Stop flushes what is buffered, sends an empty
// is_final chunk and session_close, and shows "closed" when session_close_ack arrives (the
// scheduler sends it after every result still owed has been delivered).

const CLIENT_VERSION = "dragoman-web/0.1";
const TARGET_RATE = 16000;
const SEND_INTERVAL_MS = 200;
const MAX_CHUNK_SAMPLES = TARGET_RATE; // split backlogs into <= 1 s chunks
const MAX_PREACK_SAMPLES = TARGET_RATE * 10; // audio kept while waiting for the ack
const ACK_TIMEOUT_MS = 15000;
const CLOSE_ACK_TIMEOUT_MS = 60000;
const HEARTBEAT_MS = 15000;
const MAX_WS_BUFFERED = 1 << 20;

const $ = (sel) => document.querySelector(sel);

const pageParams = new URLSearchParams(location.search);
const apiKey = pageParams.get("api_key");

// ---------------------------------------------------------------- small helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function parseLangs(text) {
  const out = [];
  for (const part of String(text).split(/[\s,;]+/)) {
    const lang = part.trim();
    if (lang && !out.includes(lang)) out.push(lang);
  }
  return out;
}

function int16ToBase64(samples) {
  const bytes = new Uint8Array(samples.length * 2);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < samples.length; i++) view.setInt16(i * 2, samples[i], true);
  return bytesToBase64(bytes);
}

function bytesToBase64(bytes) {
  let binary = "";
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(binary);
}

function base64ToBytes(b64) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function fmtTime(ms) {
  const d = new Date(ms);
  const pad = (x) => String(x).padStart(2, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// ---------------------------------------------------------------- resampling

// Streaming resampler to 16 kHz int16. Downsampling averages the input samples that fall into
// each output period (a box filter: cheap, and enough anti-aliasing for speech); upsampling, for
// the rare sub-16 kHz device, interpolates linearly. State carries across calls so chunk
// boundaries add no clicks and lose no samples.
class Resampler {
  constructor(inRate, outRate = TARGET_RATE) {
    this.ratio = inRate / outRate;
    this.carry = new Float32Array(0);
    this.pos = 0; // fractional read position inside carry+input
  }

  process(input) {
    let data = input;
    if (this.carry.length) {
      data = new Float32Array(this.carry.length + input.length);
      data.set(this.carry);
      data.set(input, this.carry.length);
    }
    const ratio = this.ratio;
    const out = new Int16Array(Math.ceil(data.length / ratio) + 1);
    let n = 0;
    let t = this.pos;
    if (ratio === 1) {
      for (let i = 0; i < data.length; i++) out[n++] = toInt16(data[i]);
      t = data.length;
    } else if (ratio > 1) {
      while (t + ratio <= data.length) {
        const start = Math.floor(t);
        const end = Math.max(start + 1, Math.floor(t + ratio));
        let sum = 0;
        for (let i = start; i < end; i++) sum += data[i];
        out[n++] = toInt16(sum / (end - start));
        t += ratio;
      }
    } else {
      while (t + 1 < data.length) {
        const i = Math.floor(t);
        const f = t - i;
        out[n++] = toInt16(data[i] * (1 - f) + data[i + 1] * f);
        t += ratio;
      }
    }
    const keep = Math.min(Math.floor(t), data.length);
    this.carry = data.slice(keep);
    this.pos = t - keep;
    return out.subarray(0, n);
  }
}

function toInt16(x) {
  const s = x > 1 ? 1 : x < -1 ? -1 : x;
  return s < 0 ? Math.round(s * 0x8000) : Math.round(s * 0x7fff);
}

// ---------------------------------------------------------------- microphone capture

class Capture {
  constructor(onSamples, onLevel) {
    this.onSamples = onSamples; // (Int16Array at 16 kHz) => void
    this.onLevel = onLevel; // (rms 0..1) => void
    this.ctx = null;
    this.stream = null;
    this.source = null;
    this.node = null;
    this.sink = null;
    this.resampler = null;
    this.flushWaiter = null;
    this.kind = "";
  }

  // Must be called from the click handler, before any await, so the AudioContext is created
  // with the user's gesture and is allowed to run.
  createContext() {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) throw new Error("this browser has no Web Audio API");
    try {
      // Let the browser resample the microphone to 16 kHz (good quality, no JS work).
      this.ctx = new Ctx({ sampleRate: TARGET_RATE });
    } catch {
      this.ctx = new Ctx();
    }
  }

  async start() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("microphone needs a secure context (https or localhost)");
    }
    if (!this.ctx) this.createContext();
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    try {
      this.source = this.ctx.createMediaStreamSource(this.stream);
    } catch (err) {
      // Some browsers cannot connect a microphone to a context of another sample rate:
      // fall back to the device rate and resample in JS.
      console.warn("client: 16 kHz context refused the microphone, resampling in JS", err);
      await this.ctx.close().catch(() => {});
      const Ctx = window.AudioContext || window.webkitAudioContext;
      this.ctx = new Ctx();
      this.source = this.ctx.createMediaStreamSource(this.stream);
    }
    if (this.ctx.state === "suspended") await this.ctx.resume().catch(() => {});
    this.resampler = new Resampler(this.ctx.sampleRate, TARGET_RATE);

    // Processing nodes only run when pulled by the destination; a muted gain keeps the
    // graph alive without echoing the microphone.
    this.sink = this.ctx.createGain();
    this.sink.gain.value = 0;
    this.sink.connect(this.ctx.destination);

    if (this.ctx.audioWorklet && typeof AudioWorkletNode === "function") {
      try {
        await this.ctx.audioWorklet.addModule(new URL("./pcm-worklet.js", import.meta.url));
        const batch = Math.max(256, Math.round(this.ctx.sampleRate / 50)); // ~20 ms
        this.node = new AudioWorkletNode(this.ctx, "dragoman-pcm-capture", {
          numberOfInputs: 1,
          numberOfOutputs: 1,
          outputChannelCount: [1],
          channelCount: 1,
          channelCountMode: "explicit",
          channelInterpretation: "speakers",
          processorOptions: { batch },
        });
        this.node.port.onmessage = (ev) => {
          const msg = ev.data || {};
          if (msg.type === "audio") this.feed(msg.samples);
          else if (msg.type === "flushed" && this.flushWaiter) this.flushWaiter();
        };
        this.kind = "AudioWorklet";
      } catch (err) {
        console.warn("client: AudioWorklet unavailable, using ScriptProcessor", err);
        this.node = null;
      }
    }
    if (!this.node) {
      this.node = this.ctx.createScriptProcessor(4096, 1, 1);
      this.node.onaudioprocess = (ev) => this.feed(new Float32Array(ev.inputBuffer.getChannelData(0)));
      this.kind = "ScriptProcessor";
    }
    this.source.connect(this.node);
    this.node.connect(this.sink);
  }

  feed(floats) {
    if (!this.resampler || !floats || !floats.length) return;
    let sum = 0;
    for (let i = 0; i < floats.length; i++) sum += floats[i] * floats[i];
    this.onLevel(Math.sqrt(sum / floats.length));
    const pcm = this.resampler.process(floats);
    if (pcm.length) this.onSamples(pcm);
  }

  // Ask the worklet for the samples it still holds; resolves quickly either way.
  flush() {
    if (!this.node || !this.node.port) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(done, 200);
      const self = this;
      function done() {
        clearTimeout(timer);
        self.flushWaiter = null;
        resolve();
      }
      this.flushWaiter = done;
      this.node.port.postMessage({ type: "flush" });
    });
  }

  async stop() {
    const { stream, node, source, sink, ctx } = this;
    this.resampler = null;
    this.stream = this.node = this.source = this.sink = this.ctx = null;
    if (stream) for (const track of stream.getTracks()) track.stop();
    try {
      if (source) source.disconnect();
      if (node) {
        node.disconnect();
        if (node.port) node.port.onmessage = null;
        if ("onaudioprocess" in node) node.onaudioprocess = null;
      }
      if (sink) sink.disconnect();
    } catch {
      /* already disconnected */
    }
    if (ctx) await ctx.close().catch(() => {});
    this.onLevel(0);
  }
}

// ---------------------------------------------------------------- session state

const S = {
  phase: "idle", // idle | connecting | streaming | closing | closed | error | disconnected
  run: 0, // increments on every Start; stale callbacks compare against it
  ws: null,
  sessionId: null,
  traceId: null,
  seq: 0,
  targets: [],
  capture: null,
  pending: [], // Int16Array pieces not yet sent
  pendingSamples: 0,
  sendTimer: null,
  heartbeatTimer: null,
  ackTimer: null,
  closeTimer: null,
  chunksSent: 0,
  acceptAudio: false, // true from Start until Stop has flushed the capture
};

function setStatus(phase, detail = "") {
  S.phase = phase;
  const status = $("#status");
  status.textContent = phase;
  status.dataset.state = phase;
  $("#status-detail").textContent = detail;
}

function setConn(connected) {
  $("#conn").dataset.state = connected ? "live" : "idle";
  $("#conn-label").textContent = connected ? "connected" : "not connected";
}

function setButtons(running) {
  $("#start").disabled = running;
  $("#stop").disabled = !running;
  for (const id of ["#src", "#tgts", "#lang-a", "#lang-b"]) $(id).disabled = running;
}

function send(msg) {
  const ws = S.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(msg));
  return true;
}

function wsUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  let url = `${proto}//${location.host}/ws/session`;
  if (apiKey) url += `?api_key=${encodeURIComponent(apiKey)}`;
  return url;
}

function clearTimers() {
  for (const key of ["sendTimer", "heartbeatTimer"]) {
    if (S[key]) clearInterval(S[key]);
    S[key] = null;
  }
  for (const key of ["ackTimer", "closeTimer"]) {
    if (S[key]) clearTimeout(S[key]);
    S[key] = null;
  }
}

// ---------------------------------------------------------------- audio out (to the scheduler)

function onSamples(pcm) {
  if (!S.acceptAudio) return;
  S.pending.push(pcm);
  S.pendingSamples += pcm.length;
  if (S.phase === "connecting") {
    // Keep the most recent audio only, so a slow handshake cannot grow memory without bound.
    while (S.pendingSamples > MAX_PREACK_SAMPLES && S.pending.length > 1) {
      S.pendingSamples -= S.pending.shift().length;
    }
  }
}

function takePending(max) {
  const n = Math.min(max, S.pendingSamples);
  const out = new Int16Array(n);
  let filled = 0;
  while (filled < n) {
    const head = S.pending[0];
    const take = Math.min(head.length, n - filled);
    out.set(head.subarray(0, take), filled);
    filled += take;
    if (take === head.length) S.pending.shift();
    else S.pending[0] = head.subarray(take);
  }
  S.pendingSamples -= n;
  return out;
}

function sendChunk(samples, isFinal) {
  const ok = send({
    type: "audio_chunk",
    session_id: S.sessionId,
    seq: S.seq,
    is_final: isFinal,
    payload: samples.length ? int16ToBase64(samples) : "",
    client_timestamp_ms: Date.now(),
  });
  if (ok) {
    S.seq += 1;
    S.chunksSent += 1;
    $("#chunks-sent").textContent = String(S.chunksSent);
  }
  return ok;
}

function flushAudio() {
  if (!S.sessionId) return;
  const ws = S.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  while (S.pendingSamples > 0) {
    // Under network congestion keep audio here rather than piling it into the socket buffer.
    if (ws.bufferedAmount > MAX_WS_BUFFERED) return;
    if (!sendChunk(takePending(MAX_CHUNK_SAMPLES), false)) return;
  }
}

// ---------------------------------------------------------------- start / stop

async function start() {
  if (S.phase === "connecting" || S.phase === "streaming" || S.phase === "closing") return;

  const src = $("#src").value.trim() || "zh";
  const auto = src === "auto";
  const langA = $("#lang-a").value.trim();
  const langB = $("#lang-b").value.trim();
  let targets = parseLangs($("#tgts").value);
  if (auto) {
    if (!langA || !langB) {
      setStatus("error", "two-way mode needs language A and language B");
      return;
    }
    if (!targets.length) targets = [langB];
  }
  if (!targets.length) {
    setStatus("error", "enter at least one target language");
    return;
  }

  const run = ++S.run;
  clearTimers();
  Object.assign(S, {
    sessionId: null,
    traceId: null,
    seq: 0,
    targets,
    pending: [],
    pendingSamples: 0,
    chunksSent: 0,
    acceptAudio: true,
  });
  $("#session-id").textContent = "–";
  $("#chunks-sent").textContent = "0";
  $("#partial").textContent = "";
  hideBackpressure();
  setButtons(true);
  setStatus("connecting", "opening microphone…");

  const capture = new Capture(onSamples, showLevel);
  S.capture = capture;
  try {
    capture.createContext(); // inside the click, before any await
    await capture.start();
  } catch (err) {
    await capture.stop();
    if (run !== S.run || S.phase !== "connecting") return; // Stop was pressed meanwhile
    S.capture = null;
    setButtons(false);
    setStatus("error", `microphone: ${err && err.message ? err.message : err}`);
    return;
  }
  if (run !== S.run || S.phase !== "connecting") {
    await capture.stop();
    return;
  }

  const init = {
    type: "session_init",
    client_version: CLIENT_VERSION,
    platform: "web",
    src_lang: src,
    tgt_lang: targets[0],
    tgt_langs: targets,
    audio_format: "pcm16",
    sample_rate: TARGET_RATE,
    mode: auto ? "two_way_auto" : "one_way",
  };
  if (auto) {
    init.lang_a = langA;
    init.lang_b = langB;
  }

  setStatus("connecting", `microphone via ${capture.kind} at ${capture.ctx ? capture.ctx.sampleRate : "?"} Hz; connecting…`);
  let ws;
  try {
    ws = new WebSocket(wsUrl());
  } catch (err) {
    await teardown("error", `websocket: ${err.message || err}`);
    return;
  }
  S.ws = ws;

  ws.onopen = () => {
    if (S.ws !== ws) return;
    setConn(true);
    ws.send(JSON.stringify(init));
    S.ackTimer = setTimeout(() => {
      if (S.ws === ws && !S.sessionId) teardown("error", "no session_init_ack from the scheduler");
    }, ACK_TIMEOUT_MS);
  };
  ws.onmessage = (ev) => {
    if (S.ws !== ws) return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      console.warn("client: non-JSON frame ignored");
      return;
    }
    if (msg && typeof msg === "object") handleMessage(msg);
  };
  ws.onerror = () => {
    if (S.ws === ws) $("#status-detail").textContent = "websocket error";
  };
  ws.onclose = (ev) => {
    if (S.ws !== ws) return;
    setConn(false);
    S.ws = null;
    if (S.phase === "closed" || S.phase === "error") return;
    const why = `socket closed (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`;
    teardown("disconnected", why);
  };
}

async function stop() {
  const phase = S.phase;
  if (phase === "connecting") {
    // No session yet: nothing owed to us, just abandon the attempt.
    await teardown("closed", "stopped before the session opened");
    return;
  }
  if (phase !== "streaming") return;

  setStatus("closing", "sending the rest of the audio…");
  $("#stop").disabled = true;
  const capture = S.capture;
  if (capture) await capture.flush();
  if (S.sendTimer) clearInterval(S.sendTimer);
  S.sendTimer = null;
  // Remaining audio goes out regardless of bufferedAmount: it is bounded by one flush period.
  while (S.pendingSamples > 0) {
    if (!sendChunk(takePending(MAX_CHUNK_SAMPLES), false)) break;
  }
  S.acceptAudio = false;
  sendChunk(new Int16Array(0), true);
  send({ type: "session_close", session_id: S.sessionId, reason: "user_stop" });
  S.capture = null;
  if (capture) capture.stop();
  setStatus("closing", "waiting for the results still owed…");
  S.closeTimer = setTimeout(() => {
    if (S.phase === "closing") teardown("closed", "no session_close_ack within 60 s; socket closed");
  }, CLOSE_ACK_TIMEOUT_MS);
}

// Ends the run: stops the microphone, closes the socket, resets the buttons.
async function teardown(phase, detail) {
  clearTimers();
  setStatus(phase, detail);
  const ws = S.ws;
  S.ws = null;
  if (ws && (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING)) {
    try {
      ws.close(1000, phase === "closed" ? "closed" : "client teardown");
    } catch {
      /* ignore */
    }
  }
  setConn(false);
  const capture = S.capture;
  S.capture = null;
  S.acceptAudio = false;
  S.pending = [];
  S.pendingSamples = 0;
  setButtons(false);
  if (capture) await capture.stop();
}

// ---------------------------------------------------------------- incoming messages

function handleMessage(msg) {
  switch (msg.type) {
    case "session_init_ack":
      onAck(msg);
      break;
    case "translation_result":
      addResult(msg);
      break;
    case "asr_partial":
      showPartial(msg);
      break;
    case "missing_result":
      addMissing(msg);
      break;
    case "error":
      addError(msg);
      break;
    case "backpressure":
      showBackpressure(msg);
      break;
    case "ui_event":
      showUiEvent(msg);
      break;
    case "server_heartbeat":
      $("#last-seen").textContent = fmtTime(Date.now());
      break;
    case "session_close_ack":
      if (!msg.session_id || msg.session_id === S.sessionId) teardown("closed", "");
      break;
    default:
      // Unknown types are ignored, per protocol.
      break;
  }
  if (msg.type !== "server_heartbeat" && S.ws) $("#last-seen").textContent = fmtTime(Date.now());
}

function onAck(msg) {
  if (S.phase !== "connecting") return;
  if (S.ackTimer) clearTimeout(S.ackTimer);
  S.ackTimer = null;
  S.sessionId = msg.session_id;
  S.traceId = msg.trace_id || null;
  $("#session-id").textContent = String(msg.session_id ?? "?");
  const fmt = msg.negotiated_audio_format;
  const rate = msg.negotiated_sample_rate;
  let detail = `sending pcm16 @ ${TARGET_RATE} Hz`;
  if (fmt && fmt !== "pcm16") detail += ` — warning: scheduler negotiated ${fmt}`;
  if (rate && Number(rate) !== TARGET_RATE) detail += ` — warning: scheduler negotiated ${rate} Hz`;
  setStatus("streaming", detail);
  flushAudio();
  S.sendTimer = setInterval(flushAudio, SEND_INTERVAL_MS);
  S.heartbeatTimer = setInterval(() => {
    send({ type: "client_heartbeat", session_id: S.sessionId, timestamp: Date.now() });
  }, HEARTBEAT_MS);
}

function resultsBody() {
  return $("#results-body");
}

function appendRow(tr) {
  const wrap = $(".results-wrap");
  const atBottom = wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 40;
  resultsBody().append(tr);
  if (atBottom) wrap.scrollTop = wrap.scrollHeight;
  $("#results-count").textContent = String(resultsBody().querySelectorAll("tr.result").length);
}

function tgtOf(msg) {
  if (msg.tgt_lang) return String(msg.tgt_lang);
  const d = msg.details;
  if (d && d.tgt_lang) return String(d.tgt_lang);
  return S.targets.length === 1 ? S.targets[0] : "";
}

function addResult(msg) {
  const utt = msg.utterance_index ?? "";
  const tgt = tgtOf(msg);
  const meta = [];
  if (msg.tts_audio) meta.push(`tts ${msg.tts_format || "?"}`);
  const t = msg.service_timings || (msg.extra && msg.extra.service_timings);
  if (t && typeof t === "object") {
    const total = Object.values(t).reduce((a, v) => a + (Number(v) || 0), 0);
    if (total > 0) meta.push(`${Math.round(total)} ms`);
  }
  const tr = el(
    "tr",
    { class: "result", "data-utt": String(utt), "data-tgt": tgt },
    el("td", { class: "num utt", text: String(utt) }),
    el("td", { class: "tgt", text: tgt }),
    el("td", { class: "asr", text: msg.text_asr ?? "" }),
    el("td", { class: "translated", text: msg.text_translated ?? "" }),
    el("td", { class: "meta", text: meta.join(" · ") }),
  );
  if (msg.job_id) tr.dataset.jobId = String(msg.job_id);
  appendRow(tr);
  const partial = $("#partial");
  if (partial.dataset.utt === String(utt)) {
    partial.textContent = "";
    delete partial.dataset.utt;
  }
  if (msg.tts_audio && $("#tts-enabled").checked) {
    enqueueTts({
      b64: msg.tts_audio,
      format: msg.tts_format || "wav",
      sampleRate: msg.tts_sample_rate,
      sessionId: msg.session_id || S.sessionId,
      traceId: msg.trace_id || S.traceId || "",
      groupId: String(utt),
    });
  }
}

function addMissing(msg) {
  const utt = msg.utterance_index ?? "";
  const tgt = tgtOf(msg);
  const tr = el(
    "tr",
    { class: "missing-row", "data-utt": String(utt), "data-tgt": tgt, "data-reason": String(msg.reason ?? "") },
    el("td", { class: "num utt", text: String(utt) }),
    el("td", { class: "tgt", text: tgt }),
    el("td", { class: "reason", colspan: "2", text: `no result: ${msg.reason ?? "unknown"}` }),
    el("td", { class: "meta", text: msg.created_at_ms ? fmtTime(Number(msg.created_at_ms)) : "" }),
  );
  appendRow(tr);
}

function addError(msg) {
  const d = msg.details && typeof msg.details === "object" ? msg.details : {};
  const utt = d.utterance_index ?? "";
  const tgt = d.tgt_lang ?? "";
  const tr = el(
    "tr",
    { class: "error-row", "data-code": String(msg.code ?? ""), "data-utt": String(utt), "data-tgt": String(tgt) },
    el("td", { class: "num utt", text: String(utt) }),
    el("td", { class: "tgt", text: String(tgt) }),
    el("td", { class: "code", text: String(msg.code ?? "ERROR") }),
    el("td", { class: "message", text: String(msg.message ?? "") }),
    el("td", { class: "meta", text: d.job_id ? `job ${d.job_id}` : "" }),
  );
  appendRow(tr);
  // An error before the ack means the session was refused (bad init, auth, ...).
  if (S.phase === "connecting" && S.ws) teardown("error", `${msg.code ?? "ERROR"}: ${msg.message ?? ""}`);
}

function showPartial(msg) {
  const partial = $("#partial");
  partial.dataset.utt = String(msg.utterance_index ?? "");
  partial.textContent = `[${msg.utterance_index ?? "?"}] ${msg.text ?? ""}${msg.is_final ? " ✓" : " …"}`;
}

let backpressureTimer = null;

function showBackpressure(msg) {
  const banner = $("#backpressure");
  const action = String(msg.action ?? "BUSY");
  banner.dataset.action = action;
  banner.textContent = `Scheduler ${action}${msg.message ? `: ${msg.message}` : ""}${
    msg.resume_after_ms ? ` (retry in ${Math.ceil(Number(msg.resume_after_ms) / 1000)} s)` : ""
  }`;
  banner.hidden = false;
  if (backpressureTimer) clearTimeout(backpressureTimer);
  backpressureTimer = setTimeout(hideBackpressure, Math.max(2000, Number(msg.resume_after_ms) || 5000));
}

function hideBackpressure() {
  if (backpressureTimer) clearTimeout(backpressureTimer);
  backpressureTimer = null;
  $("#backpressure").hidden = true;
}

function showUiEvent(msg) {
  const parts = [`#${msg.utterance_index ?? "?"}`, String(msg.event ?? "")];
  if (msg.elapsed_ms != null) parts.push(`${Math.round(Number(msg.elapsed_ms))} ms`);
  if (msg.status === "error") parts.push(`error ${msg.error_code ?? ""}`.trim());
  if (msg.hint) parts.push(String(msg.hint));
  const node = $("#ui-event");
  node.textContent = parts.join(" ");
  node.dataset.event = String(msg.event ?? "");
}

function showLevel(rms) {
  const pct = Math.min(100, Math.round(Math.sqrt(rms) * 140));
  $("#level").style.width = `${pct}%`;
}

// ---------------------------------------------------------------- TTS playback

// One clip at a time, in arrival order. tts_started is sent when playback really begins and is
// always matched by tts_play_ended: the scheduler stops counting pause time in between, so an
// unmatched start would hold the utterance open.
const ttsQueue = [];
let ttsBusy = false;

const MIME = { wav: "audio/wav", mp3: "audio/mpeg", ogg: "audio/ogg", opus: "audio/ogg", webm: "audio/webm", aac: "audio/aac", flac: "audio/flac", m4a: "audio/mp4" };

function enqueueTts(item) {
  ttsQueue.push(item);
  playNextTts();
}

function wavFromPcm16(bytes, rate) {
  const header = new ArrayBuffer(44);
  const v = new DataView(header);
  const str = (off, s) => [...s].forEach((c, i) => v.setUint8(off + i, c.charCodeAt(0)));
  str(0, "RIFF");
  v.setUint32(4, 36 + bytes.length, true);
  str(8, "WAVE");
  str(12, "fmt ");
  v.setUint32(16, 16, true);
  v.setUint16(20, 1, true); // PCM
  v.setUint16(22, 1, true); // mono
  v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true);
  v.setUint16(32, 2, true);
  v.setUint16(34, 16, true);
  str(36, "data");
  v.setUint32(40, bytes.length, true);
  return new Blob([header, bytes], { type: "audio/wav" });
}

function playNextTts() {
  if (ttsBusy || !ttsQueue.length) return;
  const item = ttsQueue.shift();
  let blob;
  try {
    const bytes = base64ToBytes(item.b64);
    const fmt = String(item.format).toLowerCase();
    blob = fmt === "pcm16" || fmt === "pcm" || fmt === "s16le"
      ? wavFromPcm16(bytes, Number(item.sampleRate) || TARGET_RATE)
      : new Blob([bytes], { type: MIME[fmt] || `audio/${fmt}` });
  } catch (err) {
    console.warn("client: undecodable tts_audio", err);
    playNextTts();
    return;
  }
  ttsBusy = true;
  const player = $("#tts-player");
  const url = URL.createObjectURL(blob);
  let started = false;
  let done = false;
  const base = { session_id: item.sessionId, trace_id: item.traceId, group_id: item.groupId };

  const finish = () => {
    if (done) return;
    done = true;
    clearTimeout(watchdog);
    player.removeEventListener("playing", onPlaying);
    player.removeEventListener("ended", finish);
    player.removeEventListener("error", finish);
    URL.revokeObjectURL(url);
    if (started) send({ type: "tts_play_ended", ...base, ts_end_ms: Date.now() });
    ttsBusy = false;
    playNextTts();
  };
  const onPlaying = () => {
    if (started || done) return;
    started = true;
    send({ type: "tts_started", ...base, ts_start_ms: Date.now() });
  };
  const watchdog = setTimeout(() => {
    player.pause();
    finish();
  }, 120000);

  player.addEventListener("playing", onPlaying);
  player.addEventListener("ended", finish);
  player.addEventListener("error", finish);
  player.src = url;
  const p = player.play();
  if (p && typeof p.catch === "function") {
    p.catch((err) => {
      console.warn("client: TTS playback refused", err);
      finish();
    });
  }
}

// ---------------------------------------------------------------- wiring

function syncTwoWay() {
  const auto = $("#src").value.trim() === "auto";
  for (const label of document.querySelectorAll(".two-way")) label.hidden = !auto;
}

function boot() {
  $("#start").addEventListener("click", () => {
    start().catch((err) => teardown("error", String(err && err.message ? err.message : err)));
  });
  $("#stop").addEventListener("click", () => {
    stop().catch((err) => teardown("error", String(err && err.message ? err.message : err)));
  });
  $("#clear").addEventListener("click", () => {
    resultsBody().replaceChildren();
    $("#results-count").textContent = "0";
    $("#partial").textContent = "";
  });
  $("#src").addEventListener("input", syncTwoWay);
  $("#src").addEventListener("change", syncTwoWay);
  syncTwoWay();
  setButtons(false);
  setStatus("idle");
  window.addEventListener("pagehide", () => {
    if (S.sessionId && (S.phase === "streaming" || S.phase === "closing")) {
      send({ type: "session_close", session_id: S.sessionId, reason: "page_closed" });
    }
  });
}

// Exposed for debugging and browser tests.
window.dragomanClient = { state: S, Resampler };

boot();
