// vmesh admin page: reads the admin API's JSON views and turns successive
// /v1/golden snapshots into rates. Everything is rendered with textContent:
// names come from gossip and are not trusted as HTML.
"use strict";

const params = new URLSearchParams(location.search);
const refreshMs = Math.max(250, 1000 * Number(params.get("refresh") || 2));
let prevGolden = null;

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fill(id, rows, cols, empty) {
  const tbody = document.querySelector("#" + id + " tbody");
  tbody.replaceChildren();
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", empty, "empty");
    td.colSpan = cols;
    tr.append(td);
    tbody.append(tr);
    return;
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const c of cells) tr.append(typeof c === "object" ? c : el("td", c));
    tbody.append(tr);
  }
}

function fmtTime(s) { return String(s || "-").replace(/\.\d+(Z|[+-]\d\d:\d\d)$/, "$1"); }

function num(v, digits) { return el("td", v === null || isNaN(v) ? "-" : v.toFixed(digits), "num"); }

// quantile interpolates q from cumulative bucket deltas, as Prometheus'
// histogram_quantile does.
function quantile(buckets, q) {
  if (!buckets.length) return NaN;
  const total = buckets[buckets.length - 1].count;
  if (total <= 0) return NaN;
  const rank = q * total;
  let prevLE = 0, prevCount = 0;
  for (const b of buckets) {
    if (b.count >= rank) {
      if (b.inf) return prevLE;
      if (b.count === prevCount) return b.le;
      return prevLE + (b.le - prevLE) * (rank - prevCount) / (b.count - prevCount);
    }
    prevLE = b.le; prevCount = b.count;
  }
  return prevLE;
}

function renderGolden(cur) {
  const rows = [];
  const prev = new Map();
  let dt = 0;
  if (prevGolden) {
    dt = (new Date(cur.time) - new Date(prevGolden.time)) / 1000;
    for (const s of prevGolden.services || []) prev.set(s.direction + "|" + s.service, s);
  }
  document.getElementById("window").textContent = dt > 0 ? "(last " + dt.toFixed(1) + " s)" : "(measuring…)";
  for (const s of cur.services || []) {
    const p = prev.get(s.direction + "|" + s.service);
    let rps = NaN, success = NaN, p50 = NaN, p95 = NaN, p99 = NaN;
    if (p && dt > 0) {
      rps = (s.requests - p.requests) / dt;
      const dResp = s.responses - p.responses;
      if (dResp > 0) success = (s.successes - p.successes) / dResp;
      const lat = (s.latency || []).map((b, i) => ({ le: b.le, inf: b.inf, count: b.count - ((p.latency || [])[i] || { count: 0 }).count }));
      p50 = quantile(lat, 0.5); p95 = quantile(lat, 0.95); p99 = quantile(lat, 0.99);
    }
    const sr = el("td", isNaN(success) ? "-" : (100 * success).toFixed(2) + "%", "num " + (isNaN(success) ? "" : success >= 0.99 ? "ok" : success >= 0.95 ? "warn" : "bad"));
    rows.push([s.service || "(unknown)", s.direction, sr, num(rps, 1), num(p50, 1), num(p95, 1), num(p99, 1), num(s.tcp_conns, 0)]);
  }
  fill("golden", rows, 8, "no traffic through this host yet");

  const edges = (cur.edges || []).map(e => {
    const client = e.client || (e.direction === "outbound" ? "this host" : "unauthenticated");
    const server = e.server || (e.direction === "inbound" ? "this host" : "-");
    const mtls = el("td", e.tls === "true" ? "mTLS" : "plaintext", e.tls === "true" ? "ok" : "warn");
    return [client, "→", server, e.service || "(unknown)", mtls, num(e.requests, 0), num(e.tcp_opens, 0)];
  });
  fill("edges", edges, 7, "no connections yet");
  prevGolden = cur;
}

function renderStatus(st) {
  document.getElementById("node").textContent = st.node + (st.version ? " (" + st.version + ")" : "");
  document.getElementById("summary").textContent =
    (st.ready ? "ready" : "not ready: " + st.not_ready) + " · " + (st.identity || "no identity yet") +
    " · " + (st.members || []).filter(m => m.state === "alive").length + " member(s) alive";
  const clock = m => {
    if (m.clock_offset === undefined || m.clock_offset === null) return el("td", m.name === st.node ? "-" : "not measured yet");
    let s = m.clock_offset / 1e9;
    if (Math.abs(s) < 0.05) s = 0;
    return el("td", (s >= 0 ? "+" : "") + s.toFixed(1) + " s", Math.abs(s) >= 60 ? "bad" : Math.abs(s) >= 10 ? "warn" : "ok");
  };
  fill("members", (st.members || []).map(m => [m.name, m.addr, el("td", m.state, m.state === "alive" ? "ok" : "bad"), m.services, m.agent || "-", (m.roles || []).join(",") || "-", clock(m)]), 7, "no members");
  const now = new Date(st.now);
  fill("certs", (st.identities || []).map(c => {
    const left = (new Date(c.not_after) - now) / 3600000;
    return [c.id, fmtTime(c.not_after), el("td", left <= 0 ? "expired" : left.toFixed(1) + " h", left <= 0 ? "bad" : left < 4 ? "warn" : "ok"), fmtTime(c.renew_at)];
  }), 4, "no certificates yet");
}

function renderServices(entries) {
  const rows = [];
  for (const e of entries || []) {
    for (const s of e.services || []) {
      const addr = (e.addrs && e.addrs.length) ? e.addrs[0] + ":" + s.port : "-";
      const proto = s.protocol + (s.opaque && s.protocol !== "opaque" ? " (opaque)" : "");
      rows.push([s.name, e.node, addr, proto, el("td", s.health, s.health === "passing" ? "ok" : s.health === "failing" ? "bad" : "warn"), s.identity]);
    }
  }
  rows.sort((a, b) => (a[0] + a[1]).localeCompare(b[0] + b[1]));
  fill("services", rows, 6, "no services in the catalog");
}

async function tick() {
  try {
    const [st, services, gold] = await Promise.all([getJSON("/v1/status?rules=false"), getJSON("/v1/services").catch(() => []), getJSON("/v1/golden")]);
    renderStatus(st);
    renderServices(services);
    renderGolden(gold);
  } catch (e) {
    document.getElementById("summary").textContent = "cannot reach the agent: " + e.message;
  }
  setTimeout(tick, refreshMs);
}
tick();
