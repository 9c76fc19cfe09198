'use strict';
// hyco-ws sender: connects through the relay, sends a plan of text and binary messages, and
// checks that every one comes back unchanged (same type, same bytes, same order) from an echo
// listener.
//
//   node ws-sender.js --url 'ws://127.0.0.1:PORT/$hc/compat?sb-hc-action=connect'
//                     [--token TOKEN | --key KEY [--key-name NAME]] [--token-in header|query]
//                     [--protocols kit.v2,kit.v1] [--expect-protocol kit.v2|none]
//                     [--headers '{"X-Kit":"1"}'] [--plan b:1048576,t:100,b:0]
//                     [--expect-status 401] [--lifetime SECONDS]
//
// --plan: comma-separated `b:SIZE` (binary) / `t:SIZE` (text, SIZE UTF-8 bytes) messages.
// --token-in header: ServiceBusAuthorization header; without protocols/headers the documented
//   relayedConnect(url, token) is used. query: `&sb-hc-token=` + encodeURIComponent(token).
//
// stdout: {"event":"token",...} {"event":"ready","protocol":..,"extensions":[..]} (upgrade done),
//   then
//   {"event":"result","ok":true,"messages":n,"bytes":b,"sha256_sent":..,"sha256_received":..,
//    "protocol":..,"close_code":..}
// --expect-status S: the upgrade must fail with HTTP S: {"event":"rejected","status":S,...}.
// Exit codes: 0 ok, 1 error/mismatch, 3 lifetime exceeded, 5 expectation not met.

const crypto = require('crypto');
const WebSocket = require('hyco-ws');
const {
  binaryPayload, emit, fail, lifetimeGuard, parseArgs, resolveToken, sha256, textPayload,
} = require('./lib/common');

const DEFAULT_PLAN = 'b:0,t:0,b:1,t:1,b:125,t:126,b:65535,t:65536,b:1048576,t:300000,b:3145728';

const opts = parseArgs(process.argv.slice(2), {
  url: process.env.HYCO_URL || '',
  token: '',
  key: '',
  keyName: '',
  tokenTtl: 0,
  tokenIn: 'header',
  protocols: '',
  expectProtocol: '',
  headers: '',
  plan: DEFAULT_PLAN,
  expectStatus: 0,
  lifetime: 60,
});
lifetimeGuard(opts.lifetime);

if (!opts.url) {
  fail('--url is required');
}
const protocols = opts.protocols ? opts.protocols.split(',') : null;
const appHeaders = opts.headers ? JSON.parse(opts.headers) : {};
const plan = opts.plan.split(',').filter(Boolean).map((item, index) => {
  const m = /^([bt]):(\d+)$/.exec(item.trim());
  if (!m) {
    fail(`bad plan item ${JSON.stringify(item)}`);
  }
  const size = Number(m[2]);
  return m[1] === 'b'
    ? { binary: true, data: binaryPayload(size, index) }
    : { binary: false, data: textPayload(size, index) };
});

const resolved = resolveToken(opts, opts.url, WebSocket.createRelayToken);
let url = opts.url;
let ws;
if (resolved) {
  emit({ event: 'token', source: resolved.source, in: opts.tokenIn });
}
if (resolved && opts.tokenIn === 'query') {
  url += (url.indexOf('?') === -1 ? '?' : '&') + 'sb-hc-token=' + encodeURIComponent(resolved.token);
  ws = new WebSocket(url, protocols, { headers: appHeaders });
} else if (opts.tokenIn !== 'header' && opts.tokenIn !== 'query') {
  fail(`--token-in must be header or query, got ${JSON.stringify(opts.tokenIn)}`);
} else if (!protocols && Object.keys(appHeaders).length === 0) {
  // The documented API: relayedConnect(address, token) puts the token in the header.
  ws = WebSocket.relayedConnect(url, resolved ? resolved.token : null);
} else {
  const headers = Object.assign({}, appHeaders);
  if (resolved) {
    headers.ServiceBusAuthorization = resolved.token;
  }
  ws = new WebSocket(url, protocols, { headers });
}

ws.on('unexpected-response', (req, res) => {
  const status = res.statusCode;
  emit({ event: 'rejected', status, reason: res.statusMessage || '' });
  req.abort();
  if (opts.expectStatus) {
    process.exit(status === opts.expectStatus ? 0 : 5);
  }
  process.exit(1);
});

ws.on('error', (err) => {
  fail(`websocket error: ${err && err.message ? err.message : err}`);
});

const sentHash = crypto.createHash('sha256');
const receivedHash = crypto.createHash('sha256');
let received = 0;
let totalBytes = 0;
let done = false;

ws.on('open', () => {
  if (opts.expectStatus) {
    emit({ event: 'unexpected-open' });
    process.exit(5);
  }
  const protocol = ws.protocol || null;
  // ws@1 offers permessage-deflate; the relay must not accept it (PROTOCOL.md 5.6).
  emit({ event: 'ready', protocol, extensions: Object.keys(ws.extensions || {}) });
  if (opts.expectProtocol) {
    const want = opts.expectProtocol === 'none' ? null : opts.expectProtocol;
    if (protocol !== want) {
      fail(`negotiated protocol ${JSON.stringify(protocol)}, expected ${JSON.stringify(want)}`, 5);
    }
  }
  if (plan.length === 0) {
    finish();
    return;
  }
  for (const item of plan) {
    const bytes = item.binary ? item.data : Buffer.from(item.data, 'utf8');
    sentHash.update(bytes);
    totalBytes += bytes.length;
    ws.send(item.data, { binary: item.binary }, (err) => {
      if (err) {
        fail(`send failed: ${err}`);
      }
    });
  }
});

ws.on('message', (data, flags) => {
  const binary = !!(flags && flags.binary);
  const index = received++;
  const want = plan[index];
  if (!want) {
    fail(`unexpected extra message #${index}`);
  }
  const got = binary ? data : Buffer.from(data, 'utf8');
  const wantBytes = want.binary ? want.data : Buffer.from(want.data, 'utf8');
  receivedHash.update(got);
  if (binary !== want.binary || !got.equals(wantBytes)) {
    emit({
      event: 'mismatch', index, binary, want_binary: want.binary,
      length: got.length, want_length: wantBytes.length,
      sha256: sha256(got), want_sha256: sha256(wantBytes),
    });
    process.exit(1);
  }
  if (received === plan.length) {
    finish();
  }
});

function finish() {
  done = true;
  ws.close(1000, 'kit done');
}

ws.on('close', (code, reason) => {
  if (!done) {
    fail(`connection closed early (code ${code} ${JSON.stringify(reason || '')}) after ${received}/${plan.length} messages`);
  }
  emit({
    event: 'result',
    ok: true,
    messages: received,
    bytes: totalBytes,
    sha256_sent: sentHash.digest('hex'),
    sha256_received: receivedHash.digest('hex'),
    protocol: ws.protocol || null,
    close_code: code,
  });
  process.exit(0);
});
