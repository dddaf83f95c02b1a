// Dragoman web client: microphone -> 16 kHz mono pcm16 -> /ws/session, results in a table.
//
// The language choices come from /api/v1/languages (what the node pools serve now), refreshed
// every few seconds and whenever a language control gets focus. A connected session can create
// or join a room: each member hears the others in its own language, and every result row names
// its speaker (results of other members carry the speaker's session_id).
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
const LANGS_REFRESH_MS = 10000;
const LANGS_RETRY_MS = 2000; // while nothing is served yet, or the last fetch failed
const LANGS_MIN_GAP_MS = 1000; // focus-triggered refreshes at most this often
const ROOM_CODE_RE = /^\d{6}$/;

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

function shortId(id) {
  const s = String(id ?? "");
  return s.length > 8 ? s.slice(0, 8) : s;
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
  room: null, // the code of the room this session is in
  roomPending: null, // "create" | "join" while the scheduler has not answered
  roomCodeWanted: null, // the code asked for by the pending join
  members: [], // the room's members, from the latest room_members
};

// Display names of room members by session id. Kept after they leave, so their late results
// still show who spoke.
const speakerNames = new Map();
let controlsLocked = false; // a run is under way: the language controls are frozen

function setStatus(phase, detail = "") {
  S.phase = phase;
  const status = $("#status");
  status.textContent = phase;
  status.dataset.state = phase;
  $("#status-detail").textContent = detail;
  renderRoom();
}

function setConn(connected) {
  $("#conn").dataset.state = connected ? "live" : "idle";
  $("#conn-label").textContent = connected ? "connected" : "not connected";
}

function setButtons(running) {
  controlsLocked = running;
  $("#stop").disabled = !running;
  for (const id of ["#src", "#lang-a", "#lang-b"]) $(id).disabled = running;
  for (const box of document.querySelectorAll("#tgts input")) box.disabled = running;
  updateStartButton();
  renderRoom();
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

// ---------------------------------------------------------------- served languages

const LANG_NAMES = {
  zh: "Chinese", en: "English", ja: "Japanese", ko: "Korean", es: "Spanish", fr: "French", de: "German",
  ru: "Russian", pt: "Portuguese", it: "Italian", ar: "Arabic", vi: "Vietnamese", th: "Thai",
};

function langLabel(code) {
  const name = LANG_NAMES[code];
  return name ? `${code} · ${name}` : code;
}

const L = {
  served: null, // {pairs, twoWay, bySource, sources, targets} from /api/v1/languages; null until the first answer
  key: "", // the last answer, to rebuild the controls only when it changed
  error: "", // why the last fetch failed
  fetching: null,
  lastFetch: 0,
  timer: null,
  chosenTargets: new Set(), // the targets ticked by the user (kept across refreshes)
  defaultsFor: null, // the source whose default target was ticked
};

function languagesUrl() {
  return apiKey ? `/api/v1/languages?api_key=${encodeURIComponent(apiKey)}` : "/api/v1/languages";
}

function pairList(v) {
  if (!Array.isArray(v)) return [];
  return v
    .filter((p) => Array.isArray(p) && p.length === 2 && p.every((x) => typeof x === "string" && x))
    .map(([a, b]) => [a, b]);
}

function normalizeServed(data) {
  // /api/v1/languages: pairs [src, tgt] (a pool "zh>en" is source zh, target en), two_way [a, b]
  // (pools "a<>b"), and by_source {src: [targets it reaches]}.
  const pairs = pairList(data && data.pairs);
  const twoWay = pairList(data && data.two_way);
  const uniq = (xs) => [...new Set(xs)].sort();
  const uniqPairs = (ps) => uniq(ps.map((p) => p.join(" "))).map((k) => k.split(" "));
  const bySource = Object.create(null);
  const given = data && data.by_source && typeof data.by_source === "object" ? data.by_source : null;
  for (const [src, tgt] of pairs) (bySource[src] ||= []).push(tgt);
  if (given) {
    for (const [src, tgts] of Object.entries(given)) {
      if (Array.isArray(tgts)) for (const t of tgts) if (typeof t === "string" && t) (bySource[src] ||= []).push(t);
    }
  }
  for (const src of Object.keys(bySource)) bySource[src] = uniq(bySource[src]);
  return {
    pairs: uniqPairs(pairs),
    twoWay: uniqPairs(twoWay),
    bySource,
    sources: uniq(Object.keys(bySource)),
    targets: uniq(Object.values(bySource).flat()),
    twoWayLangs: uniq(twoWay.flat()),
  };
}

function servedTargetsFor(src) {
  if (!L.served) return [];
  return L.served.bySource[src] || [];
}

function twoWayPartners(a) {
  if (!L.served) return [];
  const out = new Set();
  for (const [x, y] of L.served.twoWay) {
    if (x === a) out.add(y);
    if (y === a) out.add(x);
  }
  return [...out].sort();
}

function refreshLanguages(force = false) {
  if (L.fetching) return L.fetching;
  if (!force && Date.now() - L.lastFetch < LANGS_MIN_GAP_MS) return Promise.resolve();
  L.lastFetch = Date.now();
  L.fetching = (async () => {
    try {
      const res = await fetch(languagesUrl(), { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!res.ok) {
        let why = `HTTP ${res.status}`;
        const body = await res.json().catch(() => null);
        if (body && body.error && body.error.message) why += `: ${body.error.message}`;
        throw new Error(why);
      }
      const served = normalizeServed(await res.json());
      L.error = "";
      const key = JSON.stringify(served);
      if (key !== L.key) {
        L.key = key;
        L.served = served;
        renderLanguageControls();
      }
    } catch (err) {
      L.error = err && err.message ? err.message : String(err);
    } finally {
      L.fetching = null;
      updateStartButton();
      scheduleLanguages();
    }
  })();
  return L.fetching;
}

function scheduleLanguages() {
  if (L.timer) clearTimeout(L.timer);
  const nothing = !L.served || (!L.served.pairs.length && !L.served.twoWay.length);
  L.timer = setTimeout(() => {
    if (document.hidden) scheduleLanguages();
    else refreshLanguages(true);
  }, L.error || nothing ? LANGS_RETRY_MS : LANGS_REFRESH_MS);
}

// Fills a select with `values`, keeping its current choice: a choice the network no longer
// serves stays, marked, so nothing changes behind the user's back (Start explains the problem).
// With no current choice it takes the first of `prefer` that is offered, else the first value.
function fillSelect(select, values, { prefer = [], extra = [], label = langLabel, keepStale = true } = {}) {
  const current = select.value;
  const options = [...extra.map(([value, text]) => ({ value, text })), ...values.map((v) => ({ value: v, text: label(v) }))];
  if (keepStale && current && !options.some((o) => o.value === current)) {
    options.push({ value: current, text: `${label(current)} (not served now)`, stale: true });
  }
  const key = JSON.stringify(options);
  if (select.dataset.v !== key) {
    select.dataset.v = key;
    select.replaceChildren(
      ...options.map((o) => el("option", { value: o.value, text: o.text, ...(o.stale ? { "data-stale": "" } : {}) })),
    );
  }
  if (current && options.some((o) => o.value === current)) {
    select.value = current;
  } else {
    const pick = prefer.find((v) => options.some((o) => o.value === v)) ?? (options[0] && options[0].value);
    if (pick !== undefined) select.value = pick;
  }
}

function renderLanguageControls() {
  const served = L.served || normalizeServed({});
  // "auto" is listed first but only taken by hand, unless it is all there is.
  fillSelect($("#src"), served.sources, {
    extra: served.twoWay.length ? [["auto", "auto (two-way)"]] : [],
    prefer: served.sources.length ? served.sources : ["auto"],
  });
  const a = $("#lang-a");
  fillSelect(a, served.twoWayLangs);
  fillSelect($("#lang-b"), twoWayPartners(a.value));
  renderTargets();
  syncTwoWay();
}

// The user picked another source: keep only the ticked targets it serves.
function onSourceChange() {
  const served = servedTargetsFor($("#src").value);
  for (const t of [...L.chosenTargets]) if (!served.includes(t)) L.chosenTargets.delete(t);
  renderTargets();
  syncTwoWay();
}

// The user picked another language A: B must be one of its partners.
function onLangAChange() {
  fillSelect($("#lang-b"), twoWayPartners($("#lang-a").value), { keepStale: false });
  renderPreferred();
  updateStartButton();
}

function onTargetToggle(ev) {
  const box = ev.target;
  if (!box || box.name !== "tgt") return;
  if (box.checked) L.chosenTargets.add(box.value);
  else L.chosenTargets.delete(box.value);
  renderTargets();
  updateStartButton();
}

// Target checkboxes: the targets served for the chosen source (plus ticked ones that are not).
function renderTargets() {
  const src = $("#src").value;
  const served = servedTargetsFor(src);
  const chosen = L.chosenTargets;
  if (served.length && L.defaultsFor !== src && ![...chosen].some((t) => served.includes(t))) {
    // Nothing usable ticked for a source seen for the first time: tick its first translation
    // (once: a user who unticks everything is not overruled).
    chosen.clear();
    chosen.add(served.find((t) => t !== src) ?? served[0]);
    L.defaultsFor = src;
  }
  const shown = [...served, ...[...chosen].filter((t) => !served.includes(t)).sort()];
  const box = $("#tgts");
  const key = JSON.stringify([src, shown, served]);
  if (box.dataset.v !== key) {
    box.dataset.v = key;
    box.replaceChildren(
      ...shown.map((t) => {
        const stale = !served.includes(t);
        return el(
          "label",
          { class: stale ? "check stale" : "check", title: stale ? "not served for this source now" : langLabel(t) },
          el("input", { type: "checkbox", name: "tgt", value: t }),
          stale ? `${t} (not served)` : t,
        );
      }),
    );
    if (!shown.length) {
      box.append(el("span", { class: "none", text: src && src !== "auto" ? `none for ${src}` : "none" }));
    }
  }
  for (const input of box.querySelectorAll("input")) {
    input.checked = chosen.has(input.value);
    input.disabled = controlsLocked;
  }
  renderPreferred();
}

function checkedTargets() {
  return [...document.querySelectorAll("#tgts input:checked")].map((i) => i.value);
}

// The room's "you hear others in" choice: served targets; empty means the session's first target.
function renderPreferred() {
  const first = firstTarget();
  fillSelect($("#preferred-lang"), L.served ? L.served.targets : [], {
    extra: [["", first ? `my target (${first})` : "my target"]],
    prefer: [""],
  });
}

function firstTarget() {
  if (S.targets.length && controlsLocked) return S.targets[0];
  if ($("#src").value === "auto") return $("#lang-b").value;
  return checkedTargets()[0] || "";
}

// What Start would send, or why it cannot start.
function sessionChoice() {
  if (!L.served) {
    return { why: L.error ? `cannot load the languages the network serves (${L.error})` : "loading the languages the network serves…" };
  }
  const { pairs, twoWay } = L.served;
  if (!pairs.length && !twoWay.length) {
    return { why: "the network serves no language yet: no node is connected. Start waits for one (checked every 2 s)." };
  }
  const src = $("#src").value;
  if (src === "auto") {
    const a = $("#lang-a").value;
    const b = $("#lang-b").value;
    if (!a || !b) return { why: "two-way mode needs language A and language B" };
    if (!twoWayPartners(a).includes(b)) return { why: `two-way ${a} ⇄ ${b} is not served now` };
    return { src, auto: true, langA: a, langB: b, targets: [b] };
  }
  if (!src) return { why: "choose a source language" };
  const served = servedTargetsFor(src);
  if (!served.length) return { why: `nothing is served from ${src} now` };
  const targets = checkedTargets();
  if (!targets.length) return { why: "tick at least one target language" };
  const unserved = targets.filter((t) => !served.includes(t));
  if (unserved.length) return { why: `${unserved.map((t) => `${src} → ${t}`).join(", ")} not served now` };
  return { src, auto: false, targets };
}

function updateStartButton() {
  const choice = sessionChoice();
  $("#start").disabled = controlsLocked || Boolean(choice.why);
  const note = $("#langs-note");
  let text;
  let state;
  if (choice.why) {
    text = choice.why;
    state = L.served ? "blocked" : L.error ? "error" : "loading";
  } else {
    const { pairs, twoWay } = L.served;
    const parts = [];
    if (pairs.length) parts.push(pairs.map(([s, t]) => `${s}→${t}`).join(", "));
    if (twoWay.length) parts.push(`two-way ${twoWay.map(([a, b]) => `${a}⇄${b}`).join(", ")}`);
    text = `served now: ${parts.join(" · ")}`;
    state = "ok";
  }
  if (L.served && L.error) text += ` (last refresh failed: ${L.error})`;
  setTextIfChanged(note, text);
  note.dataset.state = state;
}

function setTextIfChanged(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// ---------------------------------------------------------------- start / stop

async function start() {
  if (S.phase === "connecting" || S.phase === "streaming" || S.phase === "closing") return;

  const choice = sessionChoice();
  if (choice.why) {
    setStatus("error", choice.why);
    return;
  }
  const { src, auto, langA, langB, targets } = choice;

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
    room: null,
    roomPending: null,
    roomCodeWanted: null,
    members: [],
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
  if (S.room || S.roomPending) {
    // The scheduler takes a closed session out of its room.
    setRoomInfoNote(S.room ? `left room ${S.room}: the session ended` : "");
    setRoomState(null);
  }
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
    case "room_create_ack":
      onRoomCreated(msg);
      break;
    case "room_members":
      onRoomMembers(msg);
      break;
    case "room_error":
      onRoomError(msg);
      break;
    case "room_expired":
      onRoomExpired(msg);
      break;
    case "webrtc_offer":
    case "webrtc_answer":
    case "webrtc_ice":
      // Other members' raw voice over WebRTC: this page plays translations only.
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

// One row per (speaker, utterance, target): each outcome has its own row, so two speakers'
// utterance 0 both show; an outcome for a key already shown replaces that row.
function putRow(tr, speaker, utt, tgt) {
  tr.dataset.speaker = speaker;
  if (utt !== "") {
    const key = `${speaker}|${utt}|${tgt}`;
    tr.dataset.key = key;
    const old = [...resultsBody().children].find((row) => row.dataset.key === key);
    if (old) {
      old.replaceWith(tr);
      $("#results-count").textContent = String(resultsBody().querySelectorAll("tr.result").length);
      return;
    }
  }
  appendRow(tr);
}

function tgtOf(msg) {
  if (msg.tgt_lang) return String(msg.tgt_lang);
  const d = msg.details;
  if (d && d.tgt_lang) return String(d.tgt_lang);
  return S.targets.length === 1 ? S.targets[0] : "";
}

function addResult(msg) {
  const utt = String(msg.utterance_index ?? "");
  const tgt = tgtOf(msg);
  const speaker = speakerOf(msg);
  const own = speaker === S.sessionId;
  const meta = [];
  if (msg.tts_audio) meta.push(`tts ${msg.tts_format || "?"}`);
  const t = msg.service_timings || (msg.extra && msg.extra.service_timings);
  if (t && typeof t === "object") {
    const total = Object.values(t).reduce((a, v) => a + (Number(v) || 0), 0);
    if (total > 0) meta.push(`${Math.round(total)} ms`);
  }
  const tr = el(
    "tr",
    { class: "result", "data-utt": utt, "data-tgt": tgt },
    el("td", { class: "num utt", text: utt }),
    speakerCell(speaker),
    el("td", { class: "tgt", text: tgt }),
    el("td", { class: "asr", text: msg.text_asr ?? "" }),
    el("td", { class: "translated", text: msg.text_translated ?? "" }),
    el("td", { class: "meta", text: meta.join(" · ") }),
  );
  if (msg.job_id) tr.dataset.jobId = String(msg.job_id);
  putRow(tr, speaker, utt, tgt);
  const partial = $("#partial");
  if (own && partial.dataset.utt === utt) {
    partial.textContent = "";
    delete partial.dataset.utt;
  }
  if (msg.tts_audio && $("#tts-enabled").checked) {
    enqueueTts({
      b64: msg.tts_audio,
      format: msg.tts_format || "wav",
      sampleRate: msg.tts_sample_rate,
      // Playback is reported for this session (it pauses our own segmenter), whoever spoke.
      sessionId: S.sessionId,
      traceId: S.traceId || msg.trace_id || "",
      groupId: own ? utt : `${speaker}:${utt}`,
    });
  }
}

function addMissing(msg) {
  const utt = String(msg.utterance_index ?? "");
  const tgt = tgtOf(msg);
  const speaker = speakerOf(msg);
  const tr = el(
    "tr",
    { class: "missing-row", "data-utt": utt, "data-tgt": tgt, "data-reason": String(msg.reason ?? "") },
    el("td", { class: "num utt", text: utt }),
    speakerCell(speaker),
    el("td", { class: "tgt", text: tgt }),
    el("td", { class: "reason", colspan: "2", text: `no result: ${msg.reason ?? "unknown"}` }),
    el("td", { class: "meta", text: msg.created_at_ms ? fmtTime(Number(msg.created_at_ms)) : "" }),
  );
  putRow(tr, speaker, utt, tgt);
}

function addError(msg) {
  const d = msg.details && typeof msg.details === "object" ? msg.details : {};
  const utt = String(d.utterance_index ?? "");
  const tgt = String(d.tgt_lang ?? "");
  const speaker = utt === "" ? S.sessionId || "" : speakerOf(msg);
  const tr = el(
    "tr",
    { class: "error-row", "data-code": String(msg.code ?? ""), "data-utt": utt, "data-tgt": tgt },
    el("td", { class: "num utt", text: utt }),
    speakerCell(speaker),
    el("td", { class: "tgt", text: tgt }),
    el("td", { class: "code", text: String(msg.code ?? "ERROR") }),
    el("td", { class: "message", text: String(msg.message ?? "") }),
    el("td", { class: "meta", text: d.job_id ? `job ${d.job_id}` : "" }),
  );
  putRow(tr, speaker, utt, tgt);
  // An error before the ack means the session was refused (bad init, auth, ...).
  if (S.phase === "connecting" && S.ws) teardown("error", `${msg.code ?? "ERROR"}: ${msg.message ?? ""}`);
  // An error about no utterance while a room request is pending is that request refused
  // (e.g. a preferred language that cannot be translated into).
  if (utt === "" && S.roomPending) onRoomError(msg);
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

// ---------------------------------------------------------------- rooms

let roomNote = ""; // shown while not in a room: why the last room ended
let copyTimer = null;

function inSession() {
  return S.phase === "streaming" && Boolean(S.sessionId);
}

function roomIdentity() {
  const out = {};
  const name = $("#display-name").value.trim().slice(0, 64);
  const lang = $("#preferred-lang").value;
  if (name) out.display_name = name;
  if (lang) out.preferred_lang = lang; // none: the scheduler uses the session's first target
  return out;
}

function createRoom() {
  if (!inSession() || S.room || S.roomPending) return;
  hideRoomError();
  if (!send({ type: "room_create", client_ts: Date.now(), ...roomIdentity() })) return;
  S.roomPending = "create";
  renderRoom();
}

function joinRoom() {
  if (!inSession() || S.room || S.roomPending) return;
  const code = $("#room-code-input").value.replace(/\s+/g, "");
  if (!ROOM_CODE_RE.test(code)) {
    showRoomError("INVALID_ROOM_CODE", "a room code is 6 digits");
    return;
  }
  hideRoomError();
  if (!send({ type: "room_join", room_code: code, ...roomIdentity() })) return;
  S.roomPending = "join";
  S.roomCodeWanted = code;
  renderRoom();
}

function leaveRoom() {
  if (!S.room) return;
  const code = S.room;
  send({ type: "room_leave", room_code: code });
  hideRoomError();
  setRoomInfoNote(`left room ${code}`);
  setRoomState(null);
}

function setRoomState(code, members = []) {
  S.room = code;
  S.roomPending = null;
  S.roomCodeWanted = null;
  S.members = code ? members : [];
  renderRoom();
}

function setRoomInfoNote(text) {
  roomNote = text;
}

function onRoomCreated(msg) {
  if (S.roomPending !== "create" || !msg.room_code) return;
  setRoomInfoNote("");
  setRoomState(String(msg.room_code), S.members);
}

function onRoomMembers(msg) {
  const code = String(msg.room_code ?? "");
  // A join is answered by the room's first room_members (a create by its ack, then this).
  const mine =
    (S.room && S.room === code) ||
    (S.roomPending === "join" && S.roomCodeWanted === code) ||
    S.roomPending === "create";
  if (!mine) return;
  const members = (Array.isArray(msg.members) ? msg.members : []).filter(
    (m) => m && typeof m === "object" && m.session_id,
  );
  for (const m of members) if (m.display_name) speakerNames.set(String(m.session_id), String(m.display_name));
  setRoomInfoNote("");
  hideRoomError();
  setRoomState(code, members);
  relabelSpeakers();
}

function onRoomError(msg) {
  S.roomPending = null;
  S.roomCodeWanted = null;
  showRoomError(String(msg.code ?? "ROOM_ERROR"), msg.message ? String(msg.message) : "");
  renderRoom();
}

function onRoomExpired(msg) {
  const code = String(msg.room_code ?? "");
  if (S.room && code && code !== S.room) return;
  showRoomError("ROOM_EXPIRED", `room ${code || S.room || "?"}: ${msg.message ?? "expired"}`);
  setRoomInfoNote(`room ${code || S.room || "?"} expired`);
  setRoomState(null);
}

function showRoomError(code, message) {
  const box = $("#room-error");
  box.dataset.code = code;
  box.textContent = message ? `${code}: ${message}` : code;
  box.hidden = false;
}

function hideRoomError() {
  const box = $("#room-error");
  box.hidden = true;
  box.textContent = "";
  delete box.dataset.code;
}

function memberLang(m, self) {
  if (m.preferred_lang) return String(m.preferred_lang);
  if (self && S.targets.length) return S.targets[0];
  return "";
}

function renderRoom() {
  const live = inSession();
  const busy = Boolean(S.room || S.roomPending);
  $("#room-create").disabled = !live || busy;
  $("#room-join").disabled = !live || busy;
  $("#room-leave").disabled = !live || !S.room;
  for (const id of ["#display-name", "#preferred-lang", "#room-code-input"]) $(id).disabled = busy;

  const codeBox = $("#room-code");
  setTextIfChanged(codeBox, S.room || (S.roomPending === "join" ? S.roomCodeWanted : "") || "–");
  codeBox.dataset.state = S.room ? "in" : S.roomPending ? "pending" : "none";
  $("#room-copy").hidden = !S.room;

  let info;
  if (S.room) {
    const n = S.members.length;
    info = `${n} member${n === 1 ? "" : "s"} · others join with this code, and each hears the others in their own language`;
  } else if (S.roomPending === "create") {
    info = "creating a room…";
  } else if (S.roomPending === "join") {
    info = `joining room ${S.roomCodeWanted}…`;
  } else if (live) {
    info = roomNote ? `${roomNote} · create a room, or join one with its code` : "not in a room: create one, or join one with its code";
  } else if (S.phase === "connecting") {
    info = "waiting for the session…";
  } else {
    info = roomNote ? `${roomNote} · start a session to create or join a room` : "start a session to create or join a room";
  }
  setTextIfChanged($("#room-info"), info);

  const list = $("#room-members");
  const key = JSON.stringify([S.sessionId, S.targets, S.members]);
  if (list.dataset.v === key) return;
  list.dataset.v = key;
  list.replaceChildren(
    ...S.members.map((m) => {
      const sid = String(m.session_id);
      const self = sid === S.sessionId;
      const lang = memberLang(m, self);
      return el(
        "li",
        { class: self ? "member self" : "member", "data-session-id": sid },
        el("span", { class: "name", text: m.display_name ? String(m.display_name) : shortId(sid) }),
        self ? el("span", { class: "you", text: "you" }) : null,
        el("span", {
          class: "chip lang",
          text: lang || "own target",
          title: lang ? `hears the others in ${langLabel(lang)}` : "hears the others in its session's first target",
        }),
        el("code", { class: "sid", text: shortId(sid), title: sid }),
      );
    }),
  );
}

async function copyRoomCode() {
  const code = S.room;
  if (!code) return;
  const button = $("#room-copy");
  let done = "Copied";
  try {
    await navigator.clipboard.writeText(code);
  } catch {
    // No clipboard access (insecure context, permission): select the code for Ctrl+C.
    const range = document.createRange();
    range.selectNodeContents($("#room-code"));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    done = "Selected";
  }
  button.textContent = done;
  if (copyTimer) clearTimeout(copyTimer);
  copyTimer = setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}

// ---------------------------------------------------------------- who said what

// Whose utterance a message is about. In a room, other members' results keep the speaker's
// session_id. An `error` frame has no session_id field: it may name one in its details; when it
// does not, it is ours outside a room and unknown inside one.
function speakerOf(msg) {
  const d = msg.details && typeof msg.details === "object" ? msg.details : {};
  const sid = msg.session_id ?? d.session_id;
  if (sid != null && sid !== "") return String(sid);
  return S.room ? "" : S.sessionId || "";
}

function speakerLabel(sid) {
  if (!sid) return "?";
  if (sid === S.sessionId) return "you";
  return speakerNames.get(sid) || shortId(sid);
}

function speakerCell(sid) {
  const self = Boolean(sid) && sid === S.sessionId;
  return el("td", {
    class: self ? "speaker self" : "speaker",
    text: speakerLabel(sid),
    title: sid ? `session ${sid}` : "the scheduler did not say whose utterance this was",
  });
}

// Rows of members whose name was not known yet when their results came.
function relabelSpeakers() {
  for (const td of resultsBody().querySelectorAll("td.speaker:not(.self)")) {
    const sid = td.parentElement.dataset.speaker;
    if (sid && speakerNames.has(sid)) setTextIfChanged(td, speakerNames.get(sid));
  }
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
  const auto = $("#src").value === "auto";
  for (const node of document.querySelectorAll(".two-way")) node.hidden = !auto;
  for (const node of document.querySelectorAll(".one-way")) node.hidden = auto;
  renderPreferred();
  updateStartButton();
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

  $("#src").addEventListener("change", onSourceChange);
  $("#lang-a").addEventListener("change", onLangAChange);
  $("#lang-b").addEventListener("change", () => {
    renderPreferred();
    updateStartButton();
  });
  $("#tgts").addEventListener("change", onTargetToggle);
  // Opening a language control re-reads what the network serves (at most once a second).
  for (const id of ["#src", "#lang-a", "#lang-b", "#tgts", "#preferred-lang"]) {
    for (const type of ["focusin", "pointerdown"]) $(id).addEventListener(type, () => refreshLanguages());
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshLanguages();
  });

  $("#room-create").addEventListener("click", createRoom);
  $("#room-join").addEventListener("click", joinRoom);
  $("#room-leave").addEventListener("click", leaveRoom);
  $("#room-copy").addEventListener("click", () => copyRoomCode());
  $("#room-code-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") joinRoom();
  });

  renderLanguageControls();
  setButtons(false);
  setStatus("idle");
  refreshLanguages(true);
  window.addEventListener("pagehide", () => {
    if (S.sessionId && (S.phase === "streaming" || S.phase === "closing")) {
      send({ type: "session_close", session_id: S.sessionId, reason: "page_closed" });
    }
  });
}

// Exposed for debugging and browser tests.
window.dragomanClient = { state: S, Resampler };

boot();
