'use strict';
// hyco-ws echo listener: every message that arrives on an accepted connection is sent back with
// the same type (text/binary).
//
//   node ws-listener.js --url 'ws://127.0.0.1:PORT/$hc/compat?sb-hc-action=listen'
//                       [--token TOKEN | --key KEY [--key-name NAME] [--token-fn]]
//                       [--exit-after-connections N] [--lifetime SECONDS]
//                       [--expect-status 401 --max-errors N]
//
// Token: --token / HYCO_TOKEN as given, or --key / HYCO_KEY signed with hyco-ws' own
// createRelayToken(url, keyName, key); with --token-fn the listener gets a token *function*
// (hyco-ws then calls it per connect and every hour for renewToken).
//
// stdout, one JSON object per line:
//   {"event":"ready"}                      first `listening` event (control channel is up)
//   {"event":"listening","count":n}        later `listening` events (reconnects)
//   {"event":"control-closed","count":n,"code":1008,"reason":"..."}  the relay ended channel n
//   {"event":"connection","n":k,"scheme","path","query"}  accept received, rendezvous upgrade
//                                          started; path/query of the address, sb-hc-* removed
//   {"event":"open","n":k,"protocol":"..."}  rendezvous up (protocol: the one the relay confirmed)
//   {"event":"closed","n":k,"code":1000,"messages":m,"bytes":b}
//   {"event":"error","count":c,"status":401,"message":"..."}   (first 20, then every 100th)
//   {"event":"done", ...}                  clean exit (0)
// --max-errors N alone: after N control-channel errors close the server and exit 0 ("done").
// Exit codes: 0 done, 1 error, 3 lifetime exceeded, 5 --expect-status not met.
//
// --expect-status S --max-errors N: negative test. The listener must never come online; after N
// control-channel errors the script closes the server (which stops hyco-ws' reconnect storm,
// PROTOCOL.md 4.5) and exits 0 if the first error carried status S, else 5.

const WebSocket = require('hyco-ws');
const { emit, fail, lifetimeGuard, parseArgs, resolveToken, statusFromError } = require('./lib/common');

const opts = parseArgs(process.argv.slice(2), {
  url: process.env.HYCO_URL || '',
  token: '',
  key: '',
  keyName: '',
  tokenTtl: 0,
  tokenFn: false,
  exitAfterConnections: 0,
  expectStatus: 0,
  maxErrors: 0,
  lifetime: 60,
});
lifetimeGuard(opts.lifetime);

if (!opts.url) {
  fail('--url is required');
}
const first = resolveToken(opts, opts.url, WebSocket.createRelayToken);
if (!first) {
  fail('a token is required: --token/HYCO_TOKEN or --key/HYCO_KEY');
}
emit({ event: 'token', source: first.source, audience: audienceOf(first.token) });

// Never pass `id` (hyco-ws 1.0.5 throws on it, PROTOCOL.md section 9).
const server = WebSocket.createRelayedServer({
  server: opts.url,
  token: opts.tokenFn ? () => resolveToken(opts, opts.url, WebSocket.createRelayToken).token : first.token,
});

let listeningCount = 0;
let errorCount = 0;
let firstErrorStatus = null;
const statuses = {};
let connections = 0;
let closedConnections = 0;
let stopping = false;

server.on('listening', () => {
  listeningCount++;
  if (opts.expectStatus) {
    emit({ event: 'unexpected-listening' });
    process.exit(5);
  }
  // How the relay ends this control channel (e.g. 1008 when the token expires, 1001 when it
  // shuts down). An extra listener: hyco-ws' own onclose (reconnect) stays in place.
  const channel = server.controlChannel;
  const count = listeningCount;
  channel.on('close', (code, reason) => {
    if (!stopping) {
      emit({ event: 'control-closed', count, code, reason: reason || '' });
    }
  });
  emit(listeningCount === 1 ? { event: 'ready' } : { event: 'listening', count: listeningCount });
});

// With an `error` handler registered hyco-ws reconnects (immediately, twice per failure);
// without one the process would die on the first failure.
server.on('error', (err) => {
  errorCount++;
  const status = statusFromError(err);
  if (errorCount === 1) {
    firstErrorStatus = status;
  }
  const key = status === null ? String(err && err.code ? err.code : 'other') : String(status);
  statuses[key] = (statuses[key] || 0) + 1;
  if (!stopping && (errorCount <= 20 || errorCount % 100 === 0)) {
    emit({ event: 'error', count: errorCount, status, message: String(err && err.message ? err.message : err) });
  }
  if (opts.maxErrors > 0 && errorCount >= opts.maxErrors && !stopping) {
    stopping = true;
    try {
      server.close();
    } catch (e) {
      // The current control channel may already be gone; closeRequested is set either way.
    }
    const ok = !opts.expectStatus || firstErrorStatus === opts.expectStatus;
    emit({ event: 'done', errors: errorCount, first_status: firstErrorStatus, statuses, ok });
    // Attempts already in flight finish on their own; nothing new is started after close().
    setImmediate(() => process.exit(ok ? 0 : 5));
  }
});

server.on('connection', (ws) => {
  const n = ++connections;
  let messages = 0;
  let bytes = 0;
  // hyco-ws emits `connection` as soon as it starts the rendezvous upgrade; the negotiated
  // sub-protocol is known on `open` (ws@1 rejects a 101 whose protocol does not match).
  emit(Object.assign({ event: 'connection', n }, publicPart(ws.url)));
  ws.on('open', () => emit({ event: 'open', n, protocol: ws.protocol || null }));
  ws.on('message', (data, flags) => {
    const binary = !!(flags && flags.binary);
    messages++;
    bytes += binary ? data.length : Buffer.byteLength(data, 'utf8');
    ws.send(data, { binary }, (err) => {
      if (err) {
        emit({ event: 'send-error', n, error: String(err) });
      }
    });
  });
  ws.on('error', (err) => {
    emit({ event: 'connection-error', n, error: String(err && err.message ? err.message : err) });
  });
  ws.on('close', (code, reason) => {
    closedConnections++;
    emit({ event: 'closed', n, code, reason: reason || '', messages, bytes });
    if (opts.exitAfterConnections > 0 && closedConnections >= opts.exitAfterConnections) {
      stopping = true;
      server.close();
      emit({ event: 'done', connections: closedConnections });
      setImmediate(() => process.exit(0));
    }
  });
});

/**
 * Path and query of the rendezvous address without the relay's own sb-hc-* parameters (the
 * address is a secret; what is left is the sender's suffix and query, PROTOCOL.md 5.2).
 */
function publicPart(address) {
  if (typeof address !== 'string') {
    return {};
  }
  const q = address.indexOf('?');
  const pathPart = q === -1 ? address : address.slice(0, q);
  const query = q === -1 ? '' : address.slice(q + 1);
  return {
    scheme: pathPart.split(':')[0],
    path: pathPart.replace(/^[a-z]+:\/\/[^/]*/i, ''),
    query: query.split('&').filter((p) => p && !p.startsWith('sb-hc-')).join('&'),
  };
}

function audienceOf(token) {
  const m = /[ &]sr=([^&]*)/.exec(token);
  return m ? decodeURIComponent(m[1]) : null;
}
