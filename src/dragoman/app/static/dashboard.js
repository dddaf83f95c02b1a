// Dragoman operator dashboard.
//
// One data source: Server-Sent Events on /api/v1/stream, each `message` carrying a full JSON
// snapshot. Every snapshot is rendered in place (rows keyed by id) so buttons and inputs survive
// updates. All server strings go through textContent, never innerHTML.

const STREAM_URL = "/api/v1/stream";
const MAX_EVENTS = 100;
const STATE_ORDER = { ready: 0, draining: 1, offline: 2 };

const $ = (sel) => document.querySelector(sel);

// ---------------------------------------------------------------- auth pass-through

// The operator surface needs an operator token when the scheduler is configured with credentials:
// open the dashboard as /?token=<operator token>. (EventSource cannot send headers: the token goes
// in the query, as ?token=, which the scheduler accepts like the Authorization header.)
const pageParams = new URLSearchParams(location.search);
const apiKey = pageParams.get("token") || pageParams.get("api_key");

function withKey(url) {
  if (!apiKey) return url;
  const sep = url.includes("?") ? "&" : "?";
  return `${url}${sep}token=${encodeURIComponent(apiKey)}`;
}

// ---------------------------------------------------------------- small helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function setText(node, text) {
  const s = String(text);
  if (node && node.textContent !== s) node.textContent = s;
}

function setAttr(node, name, value) {
  const s = String(value);
  if (node.getAttribute(name) !== s) node.setAttribute(name, s);
}

function num(v) {
  const n = Number(v);
  return Number.isFinite(n) ? n : 0;
}

function fmtMs(v) {
  if (v === null || v === undefined || v === "") return "–";
  const n = Number(v);
  if (!Number.isFinite(n)) return "–";
  return n >= 10000 ? `${(n / 1000).toFixed(1)} s` : `${Math.round(n)} ms`;
}

function fmtRate(v) {
  const n = num(v);
  return n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2);
}

function fmtAge(ms) {
  if (!Number.isFinite(ms)) return "–";
  const s = Math.max(0, ms) / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function fmtClock(ms) {
  const n = Number(ms);
  if (!Number.isFinite(n) || n <= 0) return "–";
  const d = new Date(n);
  const pad = (x, w = 2) => String(x).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function shortId(id) {
  const s = String(id ?? "");
  return s.length > 14 ? `${s.slice(0, 12)}…` : s;
}

function parseInfo(info) {
  if (info == null || info === "") return null;
  if (typeof info === "object") return info;
  try {
    return JSON.parse(info);
  } catch {
    return String(info);
  }
}

function summarizeInfo(info) {
  if (info == null) return "";
  if (typeof info !== "object") return String(info).slice(0, 60);
  const parts = [];
  if (info.platform) parts.push(String(info.platform));
  if (info.version) parts.push(`v${info.version}`);
  const hw = info.hardware || {};
  if (Array.isArray(hw.gpus) && hw.gpus.length) {
    parts.push(hw.gpus.map((g) => (g && g.name) || "gpu").join(", "));
  } else if (hw.cpu_cores) {
    parts.push(`${hw.cpu_cores} cpu`);
  }
  if (!parts.length) {
    const keys = Object.keys(info).slice(0, 4);
    for (const k of keys) {
      const v = info[k];
      if (v !== null && typeof v !== "object") parts.push(`${k}=${v}`);
    }
  }
  return parts.join(" · ");
}

// Keyed in-place update of a tbody: create rows that appeared, update all, drop the vanished,
// and keep the given order. Rows that merely change content are never recreated.
function syncRows(tbody, items, keyOf, create, update, emptyText, columns) {
  const existing = new Map();
  for (const tr of tbody.querySelectorAll(":scope > tr[data-key]")) existing.set(tr.dataset.key, tr);
  const empty = tbody.querySelector(":scope > tr.empty");

  if (!items.length) {
    for (const tr of existing.values()) tr.remove();
    if (!empty) {
      tbody.append(el("tr", { class: "empty" }, el("td", { colspan: String(columns), text: emptyText })));
    }
    return;
  }
  if (empty) empty.remove();

  const seen = new Set();
  let prev = null;
  for (const item of items) {
    const key = String(keyOf(item));
    if (seen.has(key)) continue; // defensive: a duplicate key in one snapshot
    seen.add(key);
    let tr = existing.get(key);
    if (!tr) {
      tr = create(item);
      tr.dataset.key = key;
    }
    update(tr, item);
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (want !== tr) tbody.insertBefore(tr, want);
    prev = tr;
  }
  for (const [key, tr] of existing) if (!seen.has(key)) tr.remove();
}

// ---------------------------------------------------------------- clock

// Ages are computed on the scheduler's clock (snapshot ts) advanced by local elapsed time,
// so a skewed browser clock does not make every heartbeat look late.
let lastSnapshot = null;
let snapshotLocalAt = 0;

function serverNow() {
  if (!lastSnapshot || !Number.isFinite(Number(lastSnapshot.ts))) return Date.now();
  return Number(lastSnapshot.ts) + (Date.now() - snapshotLocalAt);
}

// ---------------------------------------------------------------- header totals

function renderTotals(snap) {
  const nodes = Array.isArray(snap.nodes) ? snap.nodes : [];
  const stats = snap.stats || {};
  const rates = snap.rates || {};
  const byState = { ready: 0, draining: 0, offline: 0 };
  let used = 0;
  let total = 0;
  for (const n of nodes) {
    const state = n.state in byState ? n.state : "offline";
    byState[state] += 1;
    if (state !== "offline") {
      used += num(n.used);
      total += num(n.max);
    }
  }
  const pools = Array.isArray(snap.pools) ? snap.pools : [];
  const queued = pools.reduce((acc, p) => acc + num(p.queue_depth), 0);

  setText($("#node-count"), nodes.length - byState.offline);
  setText($("#nodes-ready"), byState.ready);
  setText($("#nodes-draining"), byState.draining);
  setText($("#nodes-offline"), byState.offline);
  setText($("#slots-used"), used);
  setText($("#slots-total"), total);
  setText($("#queue-depth"), queued);
  setText($("#jobs-per-s"), fmtRate(rates.jobs_per_s));
  setText($("#jobs-completed"), num(stats.jobs_completed));
  setText($("#jobs-failed"), num(stats.jobs_failed));
  setText($("#jobs-reassigned"), num(stats.reassigned));
  setText($("#session-count"), Array.isArray(snap.sessions) ? snap.sessions.length : 0);
  $("#jobs-failed").classList.toggle("bad", num(stats.jobs_failed) > 0);
  $("#queue-depth").classList.toggle("bad", queued > 0);
}

// ---------------------------------------------------------------- nodes

const pending = new Set(); // node ids with an action in flight

function createNodeRow(node) {
  const tr = el("tr", { "data-node-id": String(node.id) });
  tr.append(
    el("td", { class: "id mono" }),
    el("td", { class: "state" }, el("span", { class: "badge" })),
    el("td", { class: "cell" }),
    el("td", { class: "pools" }),
    el(
      "td",
      { class: "slots-cell" },
      el("div", { class: "slots" }, el("div", { class: "bar" }, el("span")), el("span", { class: "slot-text" })),
    ),
    el("td", { class: "num hb" }),
    el("td", { class: "info" }),
    el("td", { class: "actions" }),
  );
  return tr;
}

function actionButtonFor(node) {
  const id = String(node.id);
  if (node.state === "ready") {
    return el("button", {
      type: "button",
      class: "drain",
      "data-node-id": id,
      text: "Drain",
      title: "Stop sending new jobs to this node; running jobs finish",
      onclick: () => nodeAction(id, "drain"),
    });
  }
  if (node.state === "draining") {
    return el("button", {
      type: "button",
      class: "undrain",
      "data-node-id": id,
      text: "Undrain",
      title: "Let this node take new jobs again",
      onclick: () => nodeAction(id, "undrain"),
    });
  }
  return null;
}

function updateNodeRow(tr, node) {
  const state = String(node.state || "offline");
  const cells = tr.children;
  setAttr(tr, "data-state", state);
  setText(cells[0], node.id);

  const stateCell = cells[1];
  const badge = stateCell.firstElementChild;
  setText(badge, state);
  const cls = `badge ${state}`;
  if (badge.className !== cls) badge.className = cls;

  setText(cells[2], node.cell ?? "");

  const poolsStr = String(node.pools ?? "").trim();
  if (cells[3].dataset.v !== poolsStr) {
    cells[3].dataset.v = poolsStr;
    cells[3].replaceChildren(
      ...(poolsStr ? poolsStr.split(/\s+/) : []).map((p) => el("span", { class: "chip", text: p })),
    );
  }

  const used = num(node.used);
  const max = num(node.max);
  const frac = max > 0 ? Math.min(1, used / max) : 0;
  const bar = cells[4].querySelector(".bar");
  bar.firstElementChild.style.width = `${(frac * 100).toFixed(0)}%`;
  bar.classList.toggle("full", max > 0 && used >= max);
  bar.classList.toggle("high", max > 0 && used < max && frac >= 0.75);
  setText(cells[4].querySelector(".slot-text"), `${used}/${max}`);

  const hb = cells[5];
  hb.dataset.lastHeartbeat = String(node.last_heartbeat ?? "");
  hb.dataset.deadline = String(node.deadline ?? "");
  renderHeartbeat(hb, state);

  const info = parseInfo(node.info);
  const infoKey = typeof node.info === "string" ? node.info : JSON.stringify(node.info ?? null);
  if (cells[6].dataset.v !== infoKey) {
    cells[6].dataset.v = infoKey;
    setText(cells[6], summarizeInfo(info));
    cells[6].title = info == null ? "" : typeof info === "object" ? JSON.stringify(info, null, 2) : String(info);
  }

  const actions = cells[7];
  if (actions.dataset.state !== state) {
    actions.dataset.state = state;
    const btn = actionButtonFor(node);
    actions.replaceChildren(...(btn ? [btn] : []));
  }
  const btn = actions.querySelector("button");
  if (btn) btn.disabled = pending.has(String(node.id));
}

function renderHeartbeat(td, state) {
  const last = Number(td.dataset.lastHeartbeat);
  const deadline = Number(td.dataset.deadline);
  if (!td.dataset.lastHeartbeat || !Number.isFinite(last) || last <= 0) {
    setText(td, "–");
    td.className = "num hb";
    td.title = "";
    return;
  }
  const now = serverNow();
  const age = now - last;
  setText(td, fmtAge(age));
  let cls = "num hb";
  if (state !== "offline" && Number.isFinite(deadline) && deadline > 0) {
    const ttl = deadline - last;
    if (now >= deadline) cls += " hb-dead";
    else if (ttl > 0 && age > ttl / 2) cls += " hb-late";
    td.title = now >= deadline ? "past its liveness deadline" : `deadline in ${fmtAge(deadline - now)}`;
  } else {
    td.title = "";
  }
  if (td.className !== cls) td.className = cls;
}

function renderNodes(snap) {
  const nodes = (Array.isArray(snap.nodes) ? snap.nodes : []).slice();
  nodes.sort((a, b) => {
    const sa = STATE_ORDER[a.state] ?? 3;
    const sb = STATE_ORDER[b.state] ?? 3;
    return sa - sb || String(a.id).localeCompare(String(b.id));
  });
  setText($("#nodes-total"), nodes.length);
  syncRows($("#nodes-body"), nodes, (n) => n.id, createNodeRow, updateNodeRow, "no nodes registered", 8);
}

// ---------------------------------------------------------------- pools

function createPoolRow(pool) {
  return el(
    "tr",
    { "data-pool": String(pool.pool), "data-cell": String(pool.cell ?? "") },
    el("td", { class: "pool mono" }),
    el("td", { class: "cell" }),
    el("td", { class: "pool-nodes" }),
    el("td", { class: "num free" }),
    el("td", { class: "num queue" }),
  );
}

function updatePoolRow(tr, pool) {
  const c = tr.children;
  setText(c[0], pool.pool);
  setText(c[1], pool.cell ?? "");
  const ids = Array.isArray(pool.nodes) ? pool.nodes.map(String) : [];
  const key = ids.join(" ");
  if (c[2].dataset.v !== key) {
    c[2].dataset.v = key;
    c[2].replaceChildren(...ids.map((id) => el("span", { class: "chip", text: shortId(id), title: id })));
  }
  setText(c[3], num(pool.free_slots));
  const q = num(pool.queue_depth);
  setText(c[4], q);
  c[4].classList.toggle("queued", q > 0);
}

function renderPools(snap) {
  const pools = (Array.isArray(snap.pools) ? snap.pools : []).slice();
  pools.sort(
    (a, b) => String(a.cell ?? "").localeCompare(String(b.cell ?? "")) || String(a.pool).localeCompare(String(b.pool)),
  );
  setText($("#pools-total"), pools.length);
  syncRows($("#pools-body"), pools, (p) => `${p.cell ?? ""}|${p.pool}`, createPoolRow, updatePoolRow, "no pools", 5);
}

// ---------------------------------------------------------------- sessions

function createSessionRow(s) {
  return el(
    "tr",
    { "data-session-id": String(s.session_id) },
    el("td", { class: "id mono" }),
    el("td", { class: "langs" }),
    el("td", { class: "num utterances" }),
    el("td", { class: "num owed" }),
    el("td", { class: "num age" }),
  );
}

function updateSessionRow(tr, s) {
  const c = tr.children;
  setText(c[0], s.session_id);
  const tgts = Array.isArray(s.tgt_langs) ? s.tgt_langs.join(", ") : String(s.tgt_langs ?? "");
  setText(c[1], `${s.src_lang ?? "?"} → ${tgts}`);
  setText(c[2], num(s.utterances));
  setText(c[3], num(s.owed));
  c[4].dataset.openedAt = String(s.opened_at_ms ?? "");
  renderSessionAge(c[4]);
}

function renderSessionAge(td) {
  const opened = Number(td.dataset.openedAt);
  setText(td, td.dataset.openedAt && Number.isFinite(opened) && opened > 0 ? fmtAge(serverNow() - opened) : "–");
}

function renderSessions(snap) {
  const sessions = (Array.isArray(snap.sessions) ? snap.sessions : []).slice();
  sessions.sort((a, b) => num(b.opened_at_ms) - num(a.opened_at_ms));
  setText($("#sessions-total"), sessions.length);
  syncRows($("#sessions-body"), sessions, (s) => s.session_id, createSessionRow, updateSessionRow, "no open sessions", 5);
}

// ---------------------------------------------------------------- rooms

function fmtTimeOfDay(ms) {
  const n = Number(ms);
  if (!Number.isFinite(n) || n <= 0) return "–";
  const d = new Date(n);
  const pad = (x) => String(x).padStart(2, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function createRoomRow(room) {
  return el(
    "tr",
    { "data-room-code": String(room.room_code), "data-cell": String(room.cell ?? "") },
    el("td", { class: "room-code mono" }),
    el("td", { class: "num member-count" }),
    el("td", { class: "members" }),
    el("td", { class: "created" }),
    el("td", { class: "expires" }),
    el("td", { class: "cell" }),
  );
}

function memberChip(m) {
  const sid = String(m.session_id ?? "");
  const name = m.display_name ? String(m.display_name) : shortId(sid);
  const lang = m.preferred_lang || m.lang || "";
  return el(
    "span",
    {
      class: "chip member",
      "data-session-id": sid,
      text: lang ? `${name} · ${lang}` : name,
      title: `session ${sid}${lang ? `, hears the others in ${lang}` : ""}${
        m.joined_at ? `, joined ${fmtTimeOfDay(m.joined_at)}` : ""}`,
    },
  );
}

function updateRoomRow(tr, room) {
  const c = tr.children;
  const members = Array.isArray(room.members) ? room.members : [];
  setText(c[0], room.room_code);
  c[0].title = room.room_id ? `room id ${room.room_id}` : "";
  setText(c[1], members.length);
  const key = JSON.stringify(members);
  if (c[2].dataset.v !== key) {
    c[2].dataset.v = key;
    c[2].replaceChildren(...members.map(memberChip));
  }
  c[3].dataset.at = String(room.created_ms ?? "");
  c[4].dataset.at = String(room.expires_ms ?? "");
  renderRoomTimes(tr);
  setText(c[5], room.cell ?? "");
}

function renderRoomTimes(tr) {
  const created = tr.querySelector("td.created");
  const expires = tr.querySelector("td.expires");
  const at = Number(created.dataset.at);
  setText(created, at > 0 ? `${fmtTimeOfDay(at)} (${fmtAge(serverNow() - at)} ago)` : "–");
  const until = Number(expires.dataset.at);
  if (!(until > 0)) {
    setText(expires, "–");
    return;
  }
  const left = until - serverNow();
  setText(expires, left > 0 ? `${fmtTimeOfDay(until)} (in ${fmtAge(left)})` : `${fmtTimeOfDay(until)} (due)`);
  expires.title = "a room with no speech for the expiry time is closed; each utterance extends it";
}

function renderRooms(snap) {
  const rooms = (Array.isArray(snap.rooms) ? snap.rooms : []).slice();
  rooms.sort((a, b) => num(a.created_ms) - num(b.created_ms) || String(a.room_code).localeCompare(String(b.room_code)));
  setText($("#rooms-total"), rooms.length);
  syncRows($("#rooms-body"), rooms, (r) => `${r.cell ?? ""}|${r.room_code}`, createRoomRow, updateRoomRow, "no rooms", 6);
}

// ---------------------------------------------------------------- latency + stats

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

let histogramKey = "";

function renderHistogram(snap) {
  const h = snap.latency_histogram || {};
  const buckets = Array.isArray(h.buckets_ms) ? h.buckets_ms : [];
  const counts = Array.isArray(h.counts) ? h.counts.map(num) : [];
  const key = JSON.stringify([buckets, counts]);
  if (key === histogramKey) return;
  histogramKey = key;

  const root = $("#latency-histogram");
  const W = 600;
  const H = 190;
  const top = 16;
  const bottom = 22;
  const labels = counts.map((_, i) => {
    if (i < buckets.length) return `≤${fmtBucket(buckets[i])}`;
    return buckets.length ? `>${fmtBucket(buckets[buckets.length - 1])}` : "all";
  });
  const nodes = [svg("line", { class: "axis", x1: 0, y1: H - bottom, x2: W, y2: H - bottom })];
  if (!counts.length) {
    nodes.push(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no latency data yet"));
    root.replaceChildren(...nodes);
    return;
  }
  const max = Math.max(1, ...counts);
  const slot = W / counts.length;
  const barW = Math.max(2, slot * 0.72);
  counts.forEach((c, i) => {
    const x = i * slot + (slot - barW) / 2;
    const hgt = ((H - top - bottom) * c) / max;
    const y = H - bottom - hgt;
    const over = i >= buckets.length;
    const rect = svg("rect", { class: over ? "hbar over" : "hbar", x, y, width: barW, height: Math.max(hgt, c > 0 ? 1 : 0) });
    rect.append(svg("title", {}, `${labels[i]} ms: ${c}`));
    nodes.push(rect);
    if (c > 0) nodes.push(svg("text", { class: "cnt", x: x + barW / 2, y: y - 3, "text-anchor": "middle" }, String(c)));
    nodes.push(svg("text", { x: x + barW / 2, y: H - 7, "text-anchor": "middle" }, labels[i]));
  });
  root.replaceChildren(...nodes);
  root.dataset.total = String(counts.reduce((a, b) => a + b, 0));
}

function fmtBucket(ms) {
  const n = Number(ms);
  if (!Number.isFinite(n)) return String(ms);
  return n >= 1000 ? `${n / 1000}s` : String(n);
}

const EXTRA_STATS = [
  ["dispatched", "dispatched"],
  ["assigned", "assigned"],
  ["queued", "queued"],
  ["jobs_completed_empty", "empty results"],
  ["lease_expired", "leases expired"],
  ["nodes_lost", "nodes lost"],
  ["registrations", "registrations"],
];

function renderStats(snap) {
  const stats = snap.stats || {};
  const rates = snap.rates || {};
  setText($("#e2e-p50"), fmtMs(rates.e2e_p50_ms));
  setText($("#e2e-p95"), fmtMs(rates.e2e_p95_ms));
  setText($("#e2e-p99"), fmtMs(rates.e2e_p99_ms));
  setText($("#dispatch-p50"), fmtMs(rates.dispatch_p50_ms));
  setText($("#dispatch-p95"), fmtMs(rates.dispatch_p95_ms));

  const extra = $("#stats-extra");
  const extraKey = JSON.stringify(EXTRA_STATS.map(([k]) => num(stats[k])));
  if (extra.dataset.v !== extraKey) {
    extra.dataset.v = extraKey;
    extra.replaceChildren(
      ...EXTRA_STATS.map(([k, label]) =>
        el("span", { "data-stat": k }, el("span", { class: "k", text: label }), " ", el("b", { text: String(num(stats[k])) })),
      ),
    );
  }

  const failures = Object.entries(stats)
    .filter(([k]) => k.startsWith("failed_"))
    .map(([k, v]) => [k.slice("failed_".length), num(v)])
    .filter(([, v]) => v > 0)
    .sort((a, b) => b[1] - a[1]);
  const box = $("#failures");
  const fKey = JSON.stringify(failures);
  if (box.dataset.v !== fKey) {
    box.dataset.v = fKey;
    if (!failures.length) box.replaceChildren(el("span", { class: "k", text: "no failures" }));
    else
      box.replaceChildren(
        ...failures.map(([code, n]) => el("span", { class: "chip bad", "data-code": code, text: `${code} ${n}` })),
      );
  }
}

// ---------------------------------------------------------------- events

let eventsKey = "";

function eventKey(ev, i) {
  return ev.id != null ? String(ev.id) : `${ev.kind}|${ev.at}|${ev.job ?? ""}|${ev.node ?? ""}|${i}`;
}

function renderEvents(snap) {
  const events = (Array.isArray(snap.events) ? snap.events : []).slice(0, MAX_EVENTS);
  const key = events.map(eventKey).join(",");
  setText($("#events-total"), events.length);
  if (key === eventsKey) return;
  eventsKey = key;

  const list = $("#events");
  if (!events.length) {
    list.replaceChildren(el("li", { class: "empty", text: "nothing yet" }));
    return;
  }
  list.replaceChildren(
    ...events.map((ev, i) => {
      const fields = Object.entries(ev)
        .filter(([k]) => k !== "id" && k !== "kind" && k !== "at")
        .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`)
        .join("  ");
      return el(
        "li",
        { "data-event-id": eventKey(ev, i), "data-kind": String(ev.kind ?? "") },
        el("span", { class: "at", text: fmtClock(ev.at) }),
        el("span", { class: "kind", text: String(ev.kind ?? "event") }),
        el("span", { class: "fields", text: fields }),
      );
    }),
  );
}

// ---------------------------------------------------------------- snapshot entry point

function render(snap) {
  lastSnapshot = snap;
  snapshotLocalAt = Date.now();
  // Each panel renders independently: one malformed section must not freeze the rest.
  for (const part of [renderTotals, renderNodes, renderPools, renderSessions, renderRooms, renderHistogram, renderStats,
    renderEvents]) {
    try {
      part(snap);
    } catch (err) {
      console.error(`dashboard: ${part.name} failed`, err);
    }
  }
  tick();
}

// Ages move between snapshots.
function tick() {
  for (const td of document.querySelectorAll("#nodes-body td.hb")) {
    const tr = td.closest("tr");
    renderHeartbeat(td, tr ? tr.dataset.state : "");
  }
  for (const td of document.querySelectorAll("#sessions-body td.age")) renderSessionAge(td);
  for (const tr of document.querySelectorAll("#rooms-body tr[data-key]")) renderRoomTimes(tr);
  const lu = $("#last-update");
  if (lastSnapshot) setText(lu, `updated ${fmtAge(Date.now() - snapshotLocalAt)} ago`);
}

// ---------------------------------------------------------------- connection

let source = null;
let retryDelay = 1000;
let retryTimer = null;

function setConn(state, label = state) {
  const box = $("#conn");
  setAttr(box, "data-state", state);
  setText($("#conn-status"), label);
}

function connect() {
  if (retryTimer) {
    clearTimeout(retryTimer);
    retryTimer = null;
  }
  if (source) source.close();
  setConn(lastSnapshot ? "reconnecting" : "connecting");
  const es = new EventSource(withKey(STREAM_URL));
  source = es;

  es.onopen = () => {
    retryDelay = 1000;
    setConn("live");
  };
  es.onmessage = (ev) => {
    let snap;
    try {
      snap = JSON.parse(ev.data);
    } catch (err) {
      console.warn("dashboard: bad snapshot", err);
      return;
    }
    if (!snap || typeof snap !== "object") return;
    if (es.readyState === EventSource.OPEN) setConn("live");
    render(snap);
  };
  es.onerror = () => {
    if (source !== es) return;
    if (es.readyState === EventSource.CLOSED) {
      // The browser gave up (HTTP error or bad content type): retry ourselves with backoff.
      es.close();
      source = null;
      const delay = retryDelay * (0.75 + Math.random() * 0.5);
      retryDelay = Math.min(retryDelay * 2, 15000);
      setConn("down", `down (retry in ${Math.ceil(delay / 1000)} s)`);
      retryTimer = setTimeout(connect, delay);
    } else {
      setConn("reconnecting");
    }
  };
}

// ---------------------------------------------------------------- operator actions

function showResult(text, ok) {
  const box = $("#action-result");
  box.textContent = text;
  box.classList.toggle("ok", ok);
  box.classList.toggle("bad", !ok);
  box.dataset.ok = ok ? "true" : "false";
}

async function post(path) {
  const headers = { Accept: "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  showResult(`POST ${path} …`, true);
  let res;
  try {
    res = await fetch(withKey(path), { method: "POST", headers });
  } catch (err) {
    showResult(`POST ${path} → network error: ${err.message || err}`, false);
    return null;
  }
  const raw = await res.text().catch(() => "");
  let body = raw;
  try {
    body = raw ? JSON.stringify(JSON.parse(raw), null, 2) : "";
  } catch {
    /* not JSON: show as text */
  }
  showResult(`POST ${path} → ${res.status} ${res.statusText}\n${body}`.trimEnd(), res.ok);
  return res;
}

async function nodeAction(nodeId, action) {
  pending.add(nodeId);
  refreshActionButtons();
  try {
    await post(`/api/v1/nodes/${encodeURIComponent(nodeId)}/${action}`);
  } finally {
    pending.delete(nodeId);
    refreshActionButtons();
  }
}

function refreshActionButtons() {
  for (const btn of document.querySelectorAll("#nodes-body td.actions button")) {
    btn.disabled = pending.has(btn.dataset.nodeId);
  }
}

function setupCancelForm() {
  const form = $("#cancel-form");
  const input = $("#cancel-job-id");
  const button = $("#cancel-job");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const jobId = input.value.trim();
    if (!jobId) {
      showResult("enter a job id", false);
      return;
    }
    button.disabled = true;
    try {
      await post(`/api/v1/jobs/${encodeURIComponent(jobId)}/cancel`);
    } finally {
      button.disabled = false;
    }
  });
}

// ---------------------------------------------------------------- boot

function boot() {
  setupCancelForm();
  render({ ts: Date.now(), nodes: [], pools: [], sessions: [], rooms: [], stats: {}, rates: {}, events: [] });
  lastSnapshot = null;
  setText($("#last-update"), "");
  setInterval(tick, 1000);
  connect();
}

boot();
