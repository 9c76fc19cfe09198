'use strict';
// hyco-https HTTP listener with a few fixed routes, for the HTTP relaying tests.
//
//   node https-listener.js --url 'ws://127.0.0.1:PORT/$hc/compat?sb-hc-action=listen'
//                          [--token TOKEN | --key KEY [--key-name NAME] [--token-fn]]
//                          [--entity compat] [--lifetime SECONDS]
//
// Routes (matched on the request path after the leading /{entity}, query ignored):
//   GET  /small          200 text/plain "hello from hyco-https\n", x-hyco-kit: small
//   GET  /large?size=N   200 N bytes of binaryPayload(N, 0) (lib/common.js), header
//                        x-hyco-kit-sha256 = sha256 hex of the body, written in 16 KiB chunks
//   POST /echo           200 the request body unchanged (content-type copied), header
//                        x-hyco-kit-sha256 = sha256 hex of the body received
//   GET  /status         204 with reason phrase "Kit Reason", x-hyco-kit: status
//   ANY  /headers        200 application/json {"method","url","headers"} as seen by the listener
//   anything else        404 text/plain
//
// stdout: {"event":"ready"} on the first `listening`, {"event":"request","method","url"} per
// request, {"event":"error",...} on control-channel errors. Exit: 1 error, 3 lifetime exceeded.
// Note: hyco-https cannot serve WebSocket senders (PROTOCOL.md section 9 item 5).

const https = require('hyco-https');
const {
  binaryPayload, emit, fail, lifetimeGuard, parseArgs, resolveToken, sha256, statusFromError,
} = require('./lib/common');

const opts = parseArgs(process.argv.slice(2), {
  url: process.env.HYCO_URL || '',
  token: '',
  key: '',
  keyName: '',
  tokenTtl: 0,
  tokenFn: false,
  entity: 'compat',
  lifetime: 60,
});
lifetimeGuard(opts.lifetime);

if (!opts.url) {
  fail('--url is required');
}
const first = resolveToken(opts, opts.url, https.createRelayToken);
if (!first) {
  fail('a token is required: --token/HYCO_TOKEN or --key/HYCO_KEY');
}
emit({ event: 'token', source: first.source });

const CHUNK = 16 * 1024;

function route(req) {
  const target = new URL(req.url, 'http://listener.invalid');
  let path = target.pathname;
  const prefix = '/' + opts.entity;
  if (path === prefix || path.startsWith(prefix + '/')) {
    path = path.slice(prefix.length) || '/';
  }
  return { path, query: target.searchParams };
}

function handle(req, res) {
  emit({ event: 'request', method: req.method, url: req.url });
  const { path, query } = route(req);
  const chunks = [];
  req.on('data', (chunk) => chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk)));
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    if (req.method === 'GET' && path === '/small') {
      const text = 'hello from hyco-https\n';
      res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8', 'x-hyco-kit': 'small' });
      res.end(text);
    } else if (req.method === 'GET' && path === '/large') {
      const size = Number(query.get('size') || '1048576');
      if (!Number.isInteger(size) || size < 0) {
        res.writeHead(400, { 'content-type': 'text/plain' });
        res.end('bad size\n');
        return;
      }
      const data = binaryPayload(size, 0);
      res.writeHead(200, {
        'content-type': 'application/octet-stream',
        'x-hyco-kit-sha256': sha256(data),
      });
      for (let off = 0; off < data.length; off += CHUNK) {
        res.write(data.subarray(off, Math.min(off + CHUNK, data.length)));
      }
      res.end();
    } else if (req.method === 'POST' && path === '/echo') {
      res.writeHead(200, {
        'content-type': req.headers['content-type'] || 'application/octet-stream',
        'x-hyco-kit-sha256': sha256(body),
      });
      res.end(body);
    } else if (req.method === 'GET' && path === '/status') {
      res.writeHead(204, 'Kit Reason', { 'x-hyco-kit': 'status' });
      res.end();
    } else if (path === '/headers') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers, body_length: body.length }));
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end(`no route for ${req.method} ${path}\n`);
    }
  });
}

// Never pass `id` (PROTOCOL.md section 9).
const server = https.createRelayedServer(
  {
    server: opts.url,
    token: opts.tokenFn ? () => resolveToken(opts, opts.url, https.createRelayToken).token : first.token,
  },
  handle,
);

let listeningCount = 0;
let errorCount = 0;
server.on('listening', () => {
  listeningCount++;
  emit(listeningCount === 1 ? { event: 'ready' } : { event: 'listening', count: listeningCount });
});
server.on('error', (err) => {
  errorCount++;
  if (errorCount <= 20 || errorCount % 100 === 0) {
    emit({ event: 'error', count: errorCount, status: statusFromError(err), message: String(err && err.message ? err.message : err) });
  }
});
server.listen();
