// BullMQ peer: node bullmq_peer.cjs worker|submit --redis-url URL [--inflight 50 --rate 200 --warmup 1
//   --window 5 --drain 5 --phases closed,open]      (NODE_PATH=.bench/node/node_modules)
//
// worker: a BullMQ Worker, concurrency = the in-flight count, processor returns "ok" at once.
// submit: Queue.add("noop") then job.waitUntilFinished(queueEvents): the submitter holds each job's
// return value (QueueEvents reads the queue's event stream). Same loops and JSON lines as
// loadgen.py (closed loop: N back-to-back submitters; open loop: a fixed start rate, latency of
// the jobs started inside the window, stragglers waited for `drain` seconds).
"use strict";
require("events").defaultMaxListeners = 0; // BullMQ adds a listener per concurrent job slot
const { Queue, QueueEvents, Worker } = require("bullmq");

const QUEUE = "bench";

function parseArgs(argv) {
  const a = { role: argv[0], inflight: 50, rate: 200, warmup: 1, window: 5, drain: 5, phases: "closed,open" };
  for (let i = 1; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, "").replace(/-/g, "_");
    a[k] = ["redis_url", "phases"].includes(k) ? argv[i + 1] : Number(argv[i + 1]);
  }
  return a;
}

function connection(url) {
  const u = new URL(url);
  return { host: u.hostname, port: Number(u.port || 6379), db: Number((u.pathname || "/0").slice(1) || 0) };
}

function emit(event, fields) {
  process.stdout.write(JSON.stringify({ event, t: Date.now() / 1000, ...fields }) + "\n");
}

const now = () => Number(process.hrtime.bigint()) / 1e9;
const sleep = (s) => new Promise((r) => setTimeout(r, Math.max(0, s * 1000)));
const cpu = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; };

function pct(sorted, q) {
  if (!sorted.length) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.round((q / 100) * sorted.length + 0.5) - 1));
  return sorted[i];
}

function summarize(latS) {
  const v = latS.map((x) => x * 1000).sort((a, b) => a - b);
  const n = v.length;
  return { n, mean: n ? v.reduce((s, x) => s + x, 0) / n : NaN, p50: pct(v, 50), p90: pct(v, 90),
           p99: pct(v, 99), max: n ? v[n - 1] : NaN };
}

async function closedLoop(one, inflight, warmup, window) {
  const st = { done: 0, errors: 0, stop: false, first: "" };
  const lat = [];
  let recording = false;
  async function worker() {
    while (!st.stop) {
      const t0 = now();
      try { await one(); } catch (e) { st.errors++; st.first = st.first || String(e).slice(0, 300); await sleep(0.01); continue; }
      st.done++;
      if (recording) lat.push(now() - t0);
    }
  }
  const workers = Array.from({ length: inflight }, () => worker());
  await sleep(warmup);
  emit("window", { phase: "closed", edge: "start" });
  const d0 = st.done, e0 = st.errors, c0 = cpu(), t0 = now();
  recording = true;
  await sleep(window);
  const d1 = st.done, e1 = st.errors, c1 = cpu(), t1 = now();
  emit("window", { phase: "closed", edge: "end" });
  recording = false;
  st.stop = true;
  await Promise.race([Promise.all(workers), sleep(10)]);
  const secs = t1 - t0;
  return { phase: "closed", mode: "closed", inflight, completed: d1 - d0, seconds: secs, rate: (d1 - d0) / secs,
           errors: e1 - e0, first_error: st.first, latency_ms: summarize(lat), gen_cpu: (c1 - c0) / secs };
}

async function openLoop(one, rate, warmup, window, drain) {
  const st = { errors: 0, first: "" };
  const lat = [], lags = [], windowJobs = new Set();
  const start = now(), wStart = start + warmup, wEnd = start + warmup + window;
  let i = 0, started = false, c0 = 0, t0 = 0, sent = 0;
  for (;;) {
    const due = start + i / rate;
    if (due >= wEnd) break;
    let t = now();
    if (due > t) { await sleep(due - t); t = now(); }
    if (!started && due >= wStart) { started = true; emit("window", { phase: "open", edge: "start" }); c0 = cpu(); t0 = now(); }
    const record = due >= wStart;
    if (record) { lags.push(t - due); sent++; }
    const ts = now();
    const p = one().then(() => { if (record) lat.push(now() - ts); },
                         (e) => { st.errors++; st.first = st.first || String(e).slice(0, 300); });
    if (record) { windowJobs.add(p); p.finally(() => windowJobs.delete(p)); }
    i++;
  }
  const t = now();
  if (wEnd > t) await sleep(wEnd - t);
  const c1 = cpu(), t1 = now();
  emit("window", { phase: "open", edge: "end" });
  const deadline = now() + drain;
  while (windowJobs.size && now() < deadline) await sleep(0.01);
  const secs = t1 - t0;
  return { phase: "open", mode: "open", target_rate: rate, sent, completed: lat.length, seconds: secs,
           rate: lat.length / secs, errors: st.errors, first_error: st.first, lost: windowJobs.size,
           latency_ms: summarize(lat), send_lag_ms: summarize(lags), gen_cpu: (c1 - c0) / secs };
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const conn = connection(a.redis_url);
  if (a.role === "worker") {
    const w = new Worker(QUEUE, async () => "ok", { connection: conn, concurrency: a.inflight });
    w.on("error", (e) => console.error("worker error", e));
    await w.waitUntilReady();
    emit("ready", { role: "worker", peer: "bullmq" });
    const stop = async () => { await w.close(true); process.exit(0); };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
    return;
  }
  const queue = new Queue(QUEUE, { connection: conn });
  const events = new QueueEvents(QUEUE, { connection: conn });
  await queue.waitUntilReady();
  await events.waitUntilReady();
  async function one() {
    const job = await queue.add("noop", {});
    const r = await job.waitUntilFinished(events, 30000);
    if (r !== "ok") throw new Error("wrong result " + JSON.stringify(r));
  }
  emit("ready", { role: "submitter", peer: "bullmq" });
  for (const phase of a.phases.split(",").map((s) => s.trim()).filter(Boolean)) {
    const res = phase === "closed" ? await closedLoop(one, a.inflight, a.warmup, a.window)
                                   : await openLoop(one, a.rate, a.warmup, a.window, a.drain);
    emit("result", res);
  }
  await events.close();
  await queue.close();
  process.exit(0);
}

main().catch((e) => { console.error(e); process.exit(1); });
