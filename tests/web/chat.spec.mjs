// The web client end to end: the real binary, headless Chromium, two users.
//
// Run by tests/web/run.sh, which provides CHAT_SERVICE_BIN, CHAT_WEB_NODE_DIR
// (where playwright-core is installed), CHAT_WEB_CHROMIUM and
// CHAT_WEB_ARTIFACTS (where screenshots go).
//
// Bob reaches the service through a TCP proxy owned by the test, so that
// "bob goes offline" is a real network drop: Playwright's offline mode
// cuts HTTP but leaves open WebSockets alone, so the proxy kills bob's
// connections and refuses new ones, and the context is also set offline
// (the page sees `offline` / `online` events as it would on a real drop).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run this test with tests/web/run.sh`);
  return value;
};

const require = createRequire(path.join(env('CHAT_WEB_NODE_DIR'), 'package.json'));
const { chromium } = require('playwright-core');

const ARTIFACTS = env('CHAT_WEB_ARTIFACTS');
const WAIT = 15_000;
const ROOM = 'lobby-e2e';

const SECRET = 'web-test-secret-of-reasonable-length';
/** Every service started, stopped at the end. */
const servers = [];
let origin;
let proxy;
let browser;
/** Uncaught page errors and CSP violations, from every page. */
const problems = [];

/** Starts the real binary on a free port with a fresh database, and
 * resolves with its address. */
async function startServer(extraArgs) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-web-'));
  const child = spawn(env('CHAT_SERVICE_BIN'), ['serve', '--listen', '127.0.0.1:0', ...extraArgs], {
    cwd: dataDir,
    env: {
      PATH: process.env.PATH,
      JWT_SECRET: SECRET,
      DATABASE_URL: `sqlite://${path.join(dataDir, 'chat.db')}`,
      LOG_FORMAT: 'json',
      RUST_LOG: 'info',
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  servers.push({ child, dataDir });
  const lines = readline.createInterface({ input: child.stdout });
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the service did not start listening')), 30_000);
    child.once('exit', (code) => reject(new Error(`the service exited (${code}) before listening`)));
    lines.on('line', (line) => {
      let entry;
      try {
        entry = JSON.parse(line);
      } catch {
        return;
      }
      if (entry.fields?.message === 'chat service listening') {
        clearTimeout(timer);
        resolve(entry.fields.addr);
      }
    });
  });
  return addr;
}

/** A TCP proxy in front of the service whose "network" can be cut. */
async function startProxy(target) {
  const [host, port] = [target.slice(0, target.lastIndexOf(':')), Number(target.slice(target.lastIndexOf(':') + 1))];
  const sockets = new Set();
  let online = true;
  const listener = net.createServer((client) => {
    if (!online) {
      client.destroy();
      return;
    }
    const upstream = net.connect(port, host);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    }
    client.pipe(upstream).pipe(client);
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  listener.listen(0, '127.0.0.1');
  await once(listener, 'listening');
  return {
    origin: `http://127.0.0.1:${listener.address().port}`,
    cut() {
      online = false;
      for (const s of sockets) s.destroy();
    },
    restore() {
      online = true;
    },
    close() {
      this.cut();
      listener.close();
    },
  };
}

before(async () => {
  const addr = await startServer(['--dev-tokens']);
  origin = `http://${addr}`;
  proxy = await startProxy(addr);
  browser = await chromium.launch({
    executablePath: env('CHAT_WEB_CHROMIUM'),
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
  proxy?.close();
  for (const { child, dataDir } of servers) {
    if (child.exitCode === null) {
      child.kill('SIGTERM');
      await once(child, 'exit');
    }
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
});

/** A browser context (its own storage: another user) with one page. */
async function openPage(base) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (/Content.Security.Policy|Refused to/i.test(msg.text())) problems.push(`console: ${msg.text()}`);
  });
  await page.goto(`${base}/`);
  return { context, page };
}

/** Signs in with a development token minted by the page. */
async function signIn(page, sub, name) {
  await page.locator('#mint-form').waitFor({ state: 'visible', timeout: WAIT });
  await page.fill('#mint-sub', sub);
  await page.fill('#mint-name', name);
  await page.click('#mint-button');
  await page.locator('#chat').waitFor({ state: 'visible', timeout: WAIT });
  await waitConnected(page);
}

async function waitConnected(page) {
  await page.waitForFunction(() => document.querySelector('#status').dataset.state === 'open', null, {
    timeout: WAIT,
  });
}

/** The messages shown, in page order: `[seq, author, body]`. */
function shown(page) {
  return page.$$eval('#message-list li.msg', (items) =>
    items.map((li) => [Number(li.dataset.seq), li.querySelector('.author').textContent, li.querySelector('.body').textContent]),
  );
}

/** Polls `check` until it returns true. */
async function eventually(what, check, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last === true) return;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function send(page, text) {
  await page.fill('#composer-input', text);
  await page.press('#composer-input', 'Enter');
}

/** Messages and "joined"/"left" lines, as the page shows them. */
function timeline(page) {
  return page.$$eval('#message-list li', (items) =>
    items.map((li) => (li.classList.contains('event') ? `— ${li.textContent}` : li.querySelector('.body').textContent)),
  );
}

async function bodiesOf(page) {
  return (await shown(page)).map(([, , body]) => body);
}

async function hasBodies(page, expected) {
  const bodies = await bodiesOf(page);
  return JSON.stringify(bodies) === JSON.stringify(expected) || `shown ${JSON.stringify(bodies)}`;
}

async function present(page, userId) {
  return page.locator(`#presence [data-user-id="${userId}"]`).count().then((n) => n === 1);
}

function screenshot(page, name) {
  return page.screenshot({ path: path.join(ARTIFACTS, name), fullPage: true });
}

test('the dev-token page, two users chatting, a drop and a resume', async (t) => {
  const alice = await openPage(origin);
  const bob = await openPage(proxy.origin);
  const bobSockets = [];
  bob.page.on('websocket', (ws) => bobSockets.push(ws.url()));
  const expected = [];

  await t.test('alice mints a token and creates a room', async () => {
    await signIn(alice.page, 'alice', 'Alice');
    await alice.page.click('details.tool:has(#create-form) summary');
    await alice.page.fill('#create-name', 'Lobby E2E');
    await alice.page.fill('#create-id', ROOM);
    await alice.page.click('#create-form button[type=submit]');
    await eventually('alice in the new room', async () => (await alice.page.textContent('#room-title')) === 'Lobby E2E');
    await waitConnected(alice.page);
    assert.equal(await alice.page.locator(`#rooms [data-room-id="${ROOM}"]`).count(), 1);
  });

  await t.test('bob joins it by id; each sees the other present', async () => {
    await signIn(bob.page, 'bob', 'Bob');
    await bob.page.click('details.tool:has(#join-form) summary');
    await bob.page.fill('#join-id', ROOM);
    await bob.page.press('#join-id', 'Enter');
    await eventually('bob in the room', async () => (await bob.page.textContent('#room-title')) === 'Lobby E2E');
    await waitConnected(bob.page);
    await eventually('bob sees alice present', () => present(bob.page, 'alice'));
    await eventually('alice sees bob present', () => present(alice.page, 'bob'));
    await eventually('alice is told bob joined', async () =>
      (await alice.page.locator('#message-list li.event', { hasText: 'Bob joined' }).count()) === 1,
    );
  });

  await t.test('typing shows on the other side', async () => {
    await alice.page.type('#composer-input', 'hello b', { delay: 30 });
    await eventually('bob sees alice typing', async () => (await bob.page.textContent('#typing')) === 'Alice is typing…');
    assert.equal(await alice.page.textContent('#typing'), '', 'no one sees their own typing');
  });

  await t.test('messages both ways, in order, on both pages', async () => {
    await alice.page.type('#composer-input', 'ob');
    await alice.page.press('#composer-input', 'Enter');
    expected.push('hello bob');
    await eventually('bob sees alice’s message', () => hasBodies(bob.page, expected));
    assert.equal(await bob.page.textContent('#typing'), '', 'the message ends the typing indicator');
    await send(bob.page, 'hi alice <b>not bold</b>');
    expected.push('hi alice <b>not bold</b>');
    await eventually('alice sees bob’s reply', () => hasBodies(alice.page, expected));
    await eventually('bob sees his reply', () => hasBodies(bob.page, expected));
    // User content is text, never markup.
    assert.equal(await alice.page.locator('#message-list b').count(), 0);
    const rows = await shown(alice.page);
    assert.deepEqual(rows.map(([seq, author]) => [seq, author]), [[1, 'Alice'], [2, 'Bob']]);
    await screenshot(alice.page, 'alice-chatting.png');
    await screenshot(bob.page, 'bob-chatting.png');
  });

  await t.test('bob drops off; alice keeps talking; bob comes back and misses nothing', async () => {
    proxy.cut();
    await bob.context.setOffline(true);
    await eventually('bob’s page notices the drop', async () =>
      ['waiting', 'offline', 'connecting'].includes(await bob.page.getAttribute('#status', 'data-state')),
    );
    await eventually('alice sees bob leave', async () => !(await present(alice.page, 'bob')));
    for (let i = 1; i <= 5; i += 1) {
      await send(alice.page, `while you were away ${i}`);
      expected.push(`while you were away ${i}`);
    }
    await eventually('alice’s sends acknowledged', async () =>
      (await hasBodies(alice.page, expected)) === true && (await alice.page.locator('#pending-list li').count()) === 0,
    );
    assert.deepEqual(await bodiesOf(bob.page), expected.slice(0, 2), 'bob got nothing while offline');
    // What bob writes meanwhile waits, and goes out once he is back.
    await send(bob.page, 'written while offline');
    await eventually('bob’s message waits for the connection', async () =>
      /waiting for the connection/.test(await bob.page.textContent('#pending-list li .state')),
    );
    await screenshot(bob.page, 'bob-offline.png');

    const attempts = bobSockets.length;
    proxy.restore();
    await bob.context.setOffline(false);
    await waitConnected(bob.page);
    // It resumed from the last seq it had, with the token as a subprotocol.
    assert.match(bobSockets.at(-1), new RegExp(`/ws/chat/${ROOM}\\?since=2$`));
    assert.ok(bobSockets.length > attempts);
    expected.push('written while offline');
    await eventually('bob catches up', () => hasBodies(bob.page, expected));
    const rows = await shown(bob.page);
    assert.deepEqual(
      rows.map(([seq]) => seq),
      expected.map((_, i) => i + 1),
      'every seq once, in order, no gaps',
    );
    await eventually('alice sees bob back', () => present(alice.page, 'bob'));
    await send(bob.page, 'back!');
    expected.push('back!');
    await eventually('alice sees bob’s return message', () => hasBodies(alice.page, expected));
    await eventually('bob sees it once', () => hasBodies(bob.page, expected));
    assert.deepEqual(await timeline(alice.page), [
      '— Bob joined',
      ...expected.slice(0, 2),
      '— Bob left',
      ...expected.slice(2, 7),
      '— Bob joined',
      'written while offline',
      'back!',
    ]);
    await screenshot(bob.page, 'bob-after-reconnect.png');
    await screenshot(alice.page, 'alice-final.png');
  });

  await t.test('sending too fast is explained, and the messages still go out once, in order', async () => {
    // More than the limit (10 sends per 10 s) at once.
    const burst = Array.from({ length: 11 }, (_, i) => `burst ${i + 1}`);
    for (const text of burst) await send(alice.page, text);
    await eventually('a human rate-limit notice', async () =>
      /sending too fast/.test(await alice.page.textContent('#notice-text')) && (await alice.page.isVisible('#notice')),
    );
    await screenshot(alice.page, 'alice-rate-limited.png');
    await eventually(
      'every burst message delivered once',
      async () => {
        const bodies = await bodiesOf(bob.page);
        const seqs = (await shown(bob.page)).map(([seq]) => seq);
        const ok =
          JSON.stringify(bodies.filter((b) => b.startsWith('burst'))) === JSON.stringify(burst) &&
          seqs.every((seq, i) => seq === i + 1) &&
          (await alice.page.locator('#pending-list li').count()) === 0;
        return ok || `shown ${JSON.stringify(bodies)}`;
      },
      40_000,
    );
  });

  await t.test('a reload shows the same history from REST', async () => {
    const before = await shown(alice.page);
    await bob.page.reload();
    await waitConnected(bob.page);
    await eventually('bob’s history after a reload', async () => {
      const after = await shown(bob.page);
      return JSON.stringify(after) === JSON.stringify(before) || `shown ${JSON.stringify(after)}`;
    });
    await alice.page.emulateMedia({ colorScheme: 'dark' });
    await screenshot(alice.page, 'alice-dark.png');
    await bob.page.setViewportSize({ width: 390, height: 760 });
    await screenshot(bob.page, 'bob-narrow.png');
  });

  await t.test('removed from a private room, bob is told so and not reconnected', async () => {
    await alice.page.click('details.tool:has(#create-form) summary');
    await alice.page.fill('#create-name', 'Secret');
    await alice.page.fill('#create-id', 'secret-e2e');
    await alice.page.selectOption('#create-kind', 'private');
    await alice.page.fill('#create-members', 'bob');
    await alice.page.click('#create-form button[type=submit]');
    await eventually('alice in the private room', async () => (await alice.page.textContent('#room-title')) === 'Secret');
    await bob.page.click('#refresh-rooms');
    await bob.page.click('#rooms [data-room-id="secret-e2e"]');
    await waitConnected(bob.page);
    const status = await alice.page.evaluate(async () => {
      const response = await fetch('/api/v1/rooms/secret-e2e/members/bob', {
        method: 'DELETE',
        headers: { Authorization: `Bearer ${sessionStorage.getItem('chat.token')}` },
      });
      return response.status;
    });
    assert.equal(status, 204);
    await eventually('bob is told he was removed', async () =>
      /You were removed from this room/.test(await bob.page.textContent('#notice-text')),
    );
    const sockets = bobSockets.length;
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(bobSockets.length, sockets, 'no reconnection after 4003');
    assert.equal(await bob.page.getAttribute('#status', 'data-state'), 'closed');
    assert.equal(await bob.page.isDisabled('#composer-input'), true);
    await screenshot(bob.page, 'bob-removed.png');
  });

  await alice.context.close();
  await bob.context.close();
});

test('a long history pages in with "load older", in order', async () => {
  // 60 messages from 6 users over REST (each user may send 10 per 10 s).
  const post = async (pathname, body, token) => {
    const response = await fetch(`${origin}${pathname}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(token && { authorization: `Bearer ${token}` }) },
      body: JSON.stringify(body),
    });
    const text = await response.text();
    assert.ok(response.ok, `${pathname}: ${response.status} ${text}`);
    return JSON.parse(text);
  };
  const tokens = [];
  for (let u = 1; u <= 6; u += 1) tokens.push((await post('/dev/token', { sub: `writer${u}` })).token);
  await post('/api/v1/rooms', { id: 'history-e2e', name: 'History', kind: 'public' }, tokens[0]);
  const bodies = Array.from({ length: 60 }, (_, i) => `line ${i + 1}`);
  for (const [i, body] of bodies.entries()) {
    await post('/api/v1/rooms/history-e2e/messages', { body }, tokens[Math.floor(i / 10)]);
  }

  const { context, page } = await openPage(origin);
  await signIn(page, 'reader', 'Reader');
  await page.click('details.tool:has(#join-form) summary');
  await page.fill('#join-id', 'history-e2e');
  await page.press('#join-id', 'Enter');
  await eventually('the newest 50', () => hasBodies(page, bodies.slice(10)));
  assert.equal(await page.isVisible('#load-older'), true);
  await page.click('#load-older');
  await eventually('all 60, in order', () => hasBodies(page, bodies));
  assert.equal(await page.isVisible('#load-older'), false, 'nothing older than seq 1');
  await context.close();
});

test('without --dev-tokens: no mint button, and a pasted token signs in', async () => {
  const plain = `http://${await startServer([])}`;
  const { context, page } = await openPage(plain);
  await page.locator('#token-form').waitFor({ state: 'visible', timeout: WAIT });
  // The page asked, was told 404, and offers only the paste box.
  assert.equal(await page.isVisible('#mint-form'), false);

  await page.fill('#token-input', 'not-a-token');
  await page.click('#token-form button[type=submit]');
  await eventually('a readable refusal', async () => /doesn’t look like a token/.test(await page.textContent('#signin-error')));

  const token = await new Promise((resolve, reject) => {
    const cli = spawn(env('CHAT_SERVICE_BIN'), ['token', '--sub', 'carol', '--name', 'Carol'], {
      env: { PATH: process.env.PATH, JWT_SECRET: SECRET },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    cli.stdout.on('data', (chunk) => (out += chunk));
    cli.on('exit', (code) => (code === 0 ? resolve(out.trim()) : reject(new Error(`token exited ${code}`))));
  });
  await page.fill('#token-input', token);
  await page.click('#token-form button[type=submit]');
  await waitConnected(page);
  assert.equal(await page.textContent('#room-title'), 'Global');
  await eventually('carol present in global', () => present(page, 'carol'));
  await send(page, 'hello from a pasted token');
  await eventually('the message shown', () => hasBodies(page, ['hello from a pasted token']));
  await context.close();
});

test('the page loads without CSP violations or script errors', () => {
  assert.deepEqual(problems, []);
});
