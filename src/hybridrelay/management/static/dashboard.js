// The dashboard's page: renders the snapshots the relay streams (server-sent events) and
// sends the two state-changing requests with the session's CSRF token. No build step.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;

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
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
}

function fill(tableId, rows, render) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren();
  if (!rows.length) {
    const row = body.insertRow();
    const td = row.insertCell();
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

function drawChart(samples) {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 4;
  ctx.clearRect(0, 0, w, h);
  if (samples.length < 2) return;
  const series = [["bytesPerSecond", "#2d6cdf"], ["connectionsPerSecond", "#1f9d55"]];
  for (const [key, colour] of series) {
    const top = Math.max(1, ...samples.map((s) => s[key]));
    ctx.strokeStyle = colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    samples.forEach((s, i) => {
      const x = pad + (i / (samples.length - 1)) * (w - 2 * pad);
      const y = h - pad - (s[key] / top) * (h - 2 * pad);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
  }
  const last = samples[samples.length - 1];
  document.getElementById("rate-bytes").textContent = "(now " + bytes(last.bytesPerSecond) + "/s)";
  document.getElementById("rate-conns").textContent = "(now " + last.connectionsPerSecond.toFixed(1) + "/s)";
}

function render(snapshot) {
  fill("hybrid-connections", snapshot.hybridConnections, (row, hc) => {
    row.dataset.name = hc.name;
    cell(row, hc.name);
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
  drawChart(snapshot.rates);
  document.getElementById("status").textContent = "live · " + new Date(snapshot.time * 1000).toLocaleTimeString();
}

function connect() {
  const events = new EventSource("/dashboard/events");
  events.onmessage = (event) => render(JSON.parse(event.data));
  events.onerror = () => {
    document.getElementById("status").textContent = "reconnecting…";
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
  const answer = await post("/dashboard/api/hybrid-connections", { name: name, requiresClientAuthorization: requires });
  const result = document.getElementById("create-result");
  const body = await answer.json();
  result.textContent = answer.ok ? "created " + body.name : "refused: " + body.error;
  result.className = answer.ok ? "" : "error";
  if (answer.ok) document.getElementById("new-hc-name").value = "";
});

document.getElementById("sign-out").addEventListener("click", async () => {
  await post("/dashboard/logout");
  window.location.assign("/dashboard");
});

connect();
