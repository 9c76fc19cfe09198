// The dashboard's page: renders the snapshots the relay streams (server-sent events) and
// sends the two state-changing requests with the session's CSRF token. No build step.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
// The chart's span: the relay keeps ten minutes of samples; a younger relay shows what it has
// (at least a minute).
const MAX_SPAN = 600, MIN_SPAN = 60;

function cell(row, text, cls) {
  const td = document.createElement("td");
  if (text instanceof Node) td.appendChild(text); else td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function badges(items, cls, label) {
  const span = document.createElement("span");
  if (!items.length) { span.textContent = "none"; span.className = "empty"; return span; }
  for (const item of items) {
    const badge = document.createElement("span");
    badge.className = "badge " + cls;
    badge.dataset.listenerId = item.id;
    badge.title = "listener " + item.id;
    badge.textContent = label(item);
    span.appendChild(badge);
  }
  return span;
}

function when(value) {
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return date.toLocaleTimeString();
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? +n.toFixed(1) : Math.round(n)) + " " + units[i];
}

function fill(tableId, rows, render) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren();
  if (!rows.length) {
    const td = body.insertRow().insertCell();
    td.colSpan = document.querySelectorAll("#" + tableId + " th").length;
    td.textContent = "none";
    td.className = "empty";
    return;
  }
  for (const item of rows) {
    const row = document.createElement("tr");
    render(row, item);
    body.appendChild(row);
  }
}

// -- the chart: two series on one time axis, each with its own scale (bytes/s on the left,
// connections/s on the right), drawn on a canvas at the screen's resolution.

// A round top for a scale whose quarters read well: 1, 2, 4, 6, 8 or 10 times a power of
// ``base`` (10 for rates, 1024 for bytes, so that the labels are whole KiB or MiB).
function niceCeil(value, base) {
  if (value <= 0) return 1;
  const unit = Math.pow(base, Math.floor(Math.log(value) / Math.log(base)));
  const scaled = value / unit;
  const decade = Math.pow(10, Math.floor(Math.log10(scaled)));
  for (const step of [1, 2, 4, 6, 8, 10]) if (scaled <= step * decade) return step * decade * unit;
  return 10 * decade * unit;
}

function colour(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function ago(seconds) {
  return seconds >= 60 ? "−" + +(seconds / 60).toFixed(1) + " min" : "−" + seconds + " s";
}

function drawChart(samples, now) {
  const canvas = document.getElementById("chart");
  canvas.dataset.samples = samples.length;
  const oldest = samples.length ? now - samples[0].t : 0;
  const span = Math.min(MAX_SPAN, Math.max(MIN_SPAN, Math.ceil(oldest / 60) * 60));
  const tick = [10, 30, 60, 120].find((step) => span / step <= 6);
  document.getElementById("chart-span").textContent = span >= 120 ? span / 60 + " minutes" : span + " seconds";
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth, cssHeight = canvas.clientHeight;
  canvas.width = Math.round(cssWidth * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const box = { left: 72, right: cssWidth - 56, top: 10, bottom: cssHeight - 22 };
  const x = (t) => box.left + ((t - (now - span)) / span) * (box.right - box.left);
  const y = (v, top) => box.bottom - (v / top) * (box.bottom - box.top);
  const bytesTop = niceCeil(Math.max(1024, ...samples.map((s) => s.bytesPerSecond)), 1024);
  const connsTop = niceCeil(Math.max(1, ...samples.map((s) => s.connectionsPerSecond)), 10);

  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) { // grid and scales
    const gy = box.top + (i / 4) * (box.bottom - box.top);
    ctx.strokeStyle = colour("--line");
    ctx.beginPath(); ctx.moveTo(box.left, gy); ctx.lineTo(box.right, gy); ctx.stroke();
    ctx.fillStyle = colour("--accent");
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(bytes(bytesTop * (1 - i / 4)) + "/s", box.left - 6, gy);
    ctx.fillStyle = colour("--ok");
    ctx.textAlign = "left";
    ctx.fillText(String(+(connsTop * (1 - i / 4)).toFixed(2)) + "/s", box.right + 6, gy);
  }
  ctx.fillStyle = colour("--muted");
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let back = span; back >= 0; back -= tick) {
    ctx.fillText(back ? ago(back) : "now", x(now - back), box.bottom + 6);
  }
  if (samples.length < 2) {
    ctx.textBaseline = "middle";
    ctx.fillText("collecting samples…", (box.left + box.right) / 2, (box.top + box.bottom) / 2);
    return;
  }
  const shown = samples.filter((s) => s.t >= now - span);
  const path = (key, top) => {
    ctx.beginPath();
    shown.forEach((s, i) => {
      if (i) ctx.lineTo(x(s.t), y(s[key], top)); else ctx.moveTo(x(s.t), y(s[key], top));
    });
  };
  path("bytesPerSecond", bytesTop); // throughput: a filled area
  ctx.lineTo(x(shown[shown.length - 1].t), box.bottom);
  ctx.lineTo(x(shown[0].t), box.bottom);
  ctx.closePath();
  ctx.globalAlpha = 0.15; ctx.fillStyle = colour("--accent"); ctx.fill(); ctx.globalAlpha = 1;
  ctx.lineWidth = 2;
  path("bytesPerSecond", bytesTop);
  ctx.strokeStyle = colour("--accent"); ctx.stroke();
  path("connectionsPerSecond", connsTop);
  ctx.strokeStyle = colour("--ok"); ctx.stroke();

  const last = samples[samples.length - 1];
  document.getElementById("rate-bytes").textContent = "now " + bytes(last.bytesPerSecond) + "/s";
  document.getElementById("rate-conns").textContent = "now " + last.connectionsPerSecond.toFixed(1) + "/s";
}

// -- the snapshot

let lastSnapshot = null;

function render(snapshot) {
  lastSnapshot = snapshot;
  // listenerCount: on every node of a cluster (the badges are this node's listeners)
  const online = snapshot.hybridConnections.reduce((n, hc) => n + hc.listenerCount, 0);
  document.getElementById("count-hc").textContent = snapshot.hybridConnections.length;
  document.getElementById("count-listeners").textContent = online;
  document.getElementById("count-connections").textContent = snapshot.connections.length;
  document.getElementById("count-errors").textContent = snapshot.errors.length;
  fill("hybrid-connections", snapshot.hybridConnections, (row, hc) => {
    row.dataset.name = hc.name;
    cell(row, hc.name, "name");
    cell(row, hc.requiresClientAuthorization ? "required" : "anonymous");
    cell(row, badges(hc.listeners, "online", (l) => l.remoteAddress + " · since " + when(l.connectedAt)), "online");
    cell(row, badges(hc.offline, "offline", (l) => l.remoteAddress + " · gone " + when(l.since)), "offline");
  });
  fill("connections", snapshot.connections, (row, c) => {
    for (const text of [c.trackingId, c.hybridConnection, c.kind, c.senderAddress || "", c.listenerAddress || "", when(c.since), bytes(c.bytesToListener), bytes(c.bytesToSender)]) cell(row, text);
  });
  fill("errors", snapshot.errors, (row, e) => {
    for (const text of [when(e.at), e.kind, e.hybridConnection, String(e.status), e.reason, e.remote || ""]) cell(row, text);
  });
  drawChart(snapshot.rates, snapshot.time);
  const status = document.getElementById("status");
  status.textContent = "live · " + when(snapshot.time);
  status.className = "status live";
}

function connect() {
  const events = new EventSource("/dashboard/events");
  events.onmessage = (event) => render(JSON.parse(event.data));
  events.onerror = () => {
    const status = document.getElementById("status");
    status.className = "status stale";
    if (events.readyState === EventSource.CLOSED) {
      // Refused (the session ended, or too many streams): the page says why, or signs in.
      status.textContent = "disconnected";
      setTimeout(() => window.location.assign("/dashboard"), 3000);
    } else {
      status.textContent = "reconnecting…"; // the browser retries by itself
    }
  };
}

async function post(path, body) {
  return fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body || {}),
    credentials: "same-origin",
  });
}

document.getElementById("create-hc").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = document.getElementById("new-hc-name").value.trim();
  const requires = document.getElementById("new-hc-auth").checked;
  const result = document.getElementById("create-result");
  let answer, body;
  try {
    answer = await post("/dashboard/api/hybrid-connections", { name: name, requiresClientAuthorization: requires });
    body = await answer.json();
  } catch (error) {
    result.textContent = "refused: the relay did not answer";
    result.className = "error";
    return;
  }
  result.textContent = answer.ok ? "created " + body.name : "refused: " + body.error;
  result.className = answer.ok ? "ok" : "error";
  if (answer.ok) document.getElementById("new-hc-name").value = "";
});

document.getElementById("sign-out").addEventListener("click", async () => {
  await post("/dashboard/logout");
  window.location.assign("/dashboard");
});

window.addEventListener("resize", () => { if (lastSnapshot) drawChart(lastSnapshot.rates, lastSnapshot.time); });

connect();
