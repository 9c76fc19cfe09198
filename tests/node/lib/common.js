'use strict';
// Shared helpers of the Node interop kit (see tests/node/README.md).
//
// Every script speaks one JSON object per line on stdout ({"event": ...}); diagnostics go to
// stderr. Scripts never sleep to signal readiness: they print {"event":"ready"} from the
// client library's own event, and they exit by themselves (lifetime guard).

const crypto = require('crypto');

/** Parse `--name value` / `--flag` arguments; `--name=value` works too. */
function parseArgs(argv, spec) {
  const out = {};
  for (const [name, def] of Object.entries(spec)) {
    out[name] = def;
  }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith('--')) {
      fail(`unexpected argument ${JSON.stringify(arg)}`);
    }
    let name = arg.slice(2);
    let value;
    const eq = name.indexOf('=');
    if (eq >= 0) {
      value = name.slice(eq + 1);
      name = name.slice(0, eq);
    }
    const key = name.replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(key in spec)) {
      fail(`unknown option --${name}`);
    }
    if (typeof spec[key] === 'boolean') {
      out[key] = value === undefined ? true : value !== 'false';
      continue;
    }
    if (value === undefined) {
      if (i + 1 >= argv.length) {
        fail(`option --${name} needs a value`);
      }
      value = argv[++i];
    }
    out[key] = typeof spec[key] === 'number' ? Number(value) : value;
    if (typeof spec[key] === 'number' && !Number.isFinite(out[key])) {
      fail(`option --${name} needs a number, got ${JSON.stringify(value)}`);
    }
  }
  return out;
}

function emit(obj) {
  // stdout is a pipe in the tests: writes to pipes are synchronous on Linux, so a line written
  // right before process.exit() is not lost.
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(message, code) {
  emit({ event: 'fatal', error: String(message) });
  process.exit(code === undefined ? 1 : code);
}

/** Exit with 3 after `seconds` whatever happens; unref'd so it never keeps the process alive. */
function lifetimeGuard(seconds) {
  setTimeout(() => {
    emit({ event: 'timeout', after_seconds: seconds });
    process.exit(3);
  }, seconds * 1000).unref();
  process.on('uncaughtException', (err) => {
    fail(err && err.stack ? err.stack : err, 1);
  });
  process.on('unhandledRejection', (err) => {
    fail(err && err.stack ? err.stack : err, 1);
  });
}

/**
 * The token to present: explicit (--token or HYCO_TOKEN), or signed here with Microsoft's own
 * createRelayToken(uri, keyName, key) (key from --key or HYCO_KEY; the audience it produces is
 * `http://host:port/path`, PROTOCOL.md 3.2). Returns null when neither is given.
 */
function resolveToken(opts, uri, createRelayToken) {
  const token = opts.token || process.env.HYCO_TOKEN || '';
  if (token) {
    return { token, source: 'given' };
  }
  const key = opts.key || process.env.HYCO_KEY || '';
  if (key) {
    const keyName = opts.keyName || process.env.HYCO_KEY_NAME || 'RootManageSharedAccessKey';
    const ttl = opts.tokenTtl > 0 ? opts.tokenTtl : undefined;
    return { token: createRelayToken(uri, keyName, key, ttl), source: 'createRelayToken' };
  }
  return null;
}

/** Deterministic payload: byte i = (i * 131 + (i >>> 8) + seed) & 0xff. */
function binaryPayload(size, seed) {
  const buf = Buffer.allocUnsafe(size);
  for (let i = 0; i < size; i++) {
    buf[i] = (i * 131 + (i >>> 8) + seed) & 0xff;
  }
  return buf;
}

/** Deterministic text of exactly `size` UTF-8 bytes, with multi-byte characters in it. */
function textPayload(size, seed) {
  const pieces = [];
  let bytes = 0;
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789 ';
  let i = seed;
  while (bytes < size) {
    const left = size - bytes;
    if (left >= 3 && i % 17 === 0) {
      pieces.push('\u2713'); // check mark, 3 bytes in UTF-8
      bytes += 3;
    } else if (left >= 2 && i % 13 === 0) {
      pieces.push('\u00e9'); // e acute, 2 bytes
      bytes += 2;
    } else {
      pieces.push(alphabet[i % alphabet.length]);
      bytes += 1;
    }
    i++;
  }
  return pieces.join('');
}

function sha256(data) {
  return crypto.createHash('sha256').update(data).digest('hex');
}

/**
 * ws@1 "unexpected server response (401)" / ws@6 "Unexpected server response: 401" -> 401;
 * null if there is no status in the message.
 */
function statusFromError(err) {
  const m = /server response(?: \(|: )(\d{3})/i.exec(String(err && err.message ? err.message : err));
  return m ? Number(m[1]) : null;
}

module.exports = {
  binaryPayload,
  emit,
  fail,
  lifetimeGuard,
  parseArgs,
  resolveToken,
  sha256,
  statusFromError,
  textPayload,
};
