// Clash of Code chat: the web client. Plain modules, no framework, no build.
//
// How it keeps history exact: a room opens with the newest page of REST
// history, then the WebSocket connects with `since` = the highest seq held,
// so the server replays whatever came in between. Messages are kept by
// seq: a repeat is ignored, a hole is filled from REST (`after_seq`), and
// every reconnect resumes from the last contiguous seq. Sends carry a
// `client_id` and are re-sent with the same id until acknowledged, so a
// drop mid-send neither loses nor doubles a message.
//
// Every piece of user content goes into the page with textContent.

const API = '/api/v1';
const HISTORY_PAGE = 50;
const TYPING_SEND_EVERY_MS = 2000;
const TYPING_SHOW_MS = 3500;
const HEARTBEAT_MS = 15000;
const SILENCE_LIMIT_MS = 40000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 30000;
const RENEW_BEFORE_EXPIRY_S = 120;

// ---------------------------------------------------------------- words

/** What each error code of the contract means to a person. */
const ERROR_TEXT = {
  bad_request: 'The service could not understand that request.',
  invalid_message: 'That message can’t be sent: it is empty or contains characters that aren’t allowed.',
  message_too_long: 'That message is too long (at most 2000 characters).',
  rate_limited: 'You’re sending too fast.',
  unauthorized: 'Your token is invalid or has expired. Sign in again.',
  forbidden: 'You don’t have access to this room.',
  not_found: 'There is no room with that id.',
  conflict: 'A room with that id already exists.',
  payload_too_large: 'That is too much to send at once.',
  unavailable: 'The chat service is temporarily unavailable. Nothing was lost; retrying…',
  internal: 'Something went wrong on the server. Please try again.',
};

/** What each close code of the contract means to a person. */
const CLOSE_TEXT = {
  1000: 'The connection was closed.',
  1001: 'The server is going away. Reconnecting…',
  1006: 'The connection was lost. Reconnecting…',
  1008: 'The connection was idle for too long. Reconnecting…',
  1009: 'Something sent was too large for the server. Reconnecting…',
  1011: 'The server hit an unexpected error. Reconnecting…',
  1012: 'The server is restarting. Reconnecting…',
  1013: 'The server can’t take connections right now (its database is unreachable). Retrying shortly…',
  4001: 'Your sign-in expired.',
  4003: 'You were removed from this room.',
  4008: 'Your connection couldn’t keep up with the room. Reconnecting…',
  4029: 'Too much was sent too quickly. Waiting a little before reconnecting…',
};

function errorText(code, fallback) {
  return ERROR_TEXT[code] ?? fallback ?? 'Something went wrong.';
}

function inSeconds(ms) {
  const s = Math.max(1, Math.ceil(ms / 1000));
  return s === 1 ? 'in 1 second' : `in ${s} seconds`;
}

// ---------------------------------------------------------------- helpers

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function randomId() {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** The claims of a JWT, read without verifying it (display only). */
function readClaims(token) {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const json = atob(parts[1].replace(/-/g, '+').replace(/_/g, '/'));
    const bytes = Uint8Array.from(json, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return typeof claims === 'object' && claims !== null ? claims : null;
  } catch {
    return null;
  }
}

function avatar(user) {
  const name = (user?.name || user?.id || '?').trim();
  const initials = name.split(/\s+/).slice(0, 2).map((w) => [...w][0] ?? '').join('').toUpperCase();
  const node = el('span', 'avatar', initials || '?');
  node.setAttribute('aria-hidden', 'true');
  let hash = 0;
  for (const c of String(user?.id ?? name)) hash = (hash * 31 + c.codePointAt(0)) >>> 0;
  // CSSOM, not a style attribute: allowed by the page's CSP.
  node.style.background = `hsl(${hash % 360} 55% 48%)`;
  return node;
}

function formatTime(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return '';
  const sameDay = date.toDateString() === new Date().toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : date.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
}

class ApiError extends Error {
  constructor(status, code, message, retryAfterMs) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }

  /** A sentence for people. */
  get human() {
    if (this.code === 'rate_limited') {
      return `${ERROR_TEXT.rate_limited} Try again ${inSeconds(this.retryAfterMs ?? 1000)}.`;
    }
    if (this.code === 'network') return 'The service can’t be reached. Check your connection.';
    // Say what was wrong with the token ("token expired", "invalid token
    // signature"): the person pasting it can act on that.
    if (this.code === 'unauthorized') return `Your token was refused (${this.message}). Sign in again with a new one.`;
    return errorText(this.code, this.message);
  }
}

// ---------------------------------------------------------------- session

const session = {
  token: sessionStorage.getItem('chat.token'),
  /** `{sub, name}` when the token was minted here: it can be minted again. */
  devIdentity: JSON.parse(sessionStorage.getItem('chat.devIdentity') ?? 'null'),
  devTokens: false,
  renewTimer: null,

  get claims() {
    return this.token ? readClaims(this.token) : null;
  },
  get userId() {
    const sub = this.claims?.sub;
    return sub === undefined ? null : String(sub);
  },

  set(token, devIdentity) {
    this.token = token;
    this.devIdentity = devIdentity ?? null;
    sessionStorage.setItem('chat.token', token);
    if (devIdentity) sessionStorage.setItem('chat.devIdentity', JSON.stringify(devIdentity));
    else sessionStorage.removeItem('chat.devIdentity');
    this.scheduleRenewal();
  },

  clear() {
    this.token = null;
    this.devIdentity = null;
    sessionStorage.removeItem('chat.token');
    sessionStorage.removeItem('chat.devIdentity');
    clearTimeout(this.renewTimer);
  },

  /** A minted token is minted again before it runs out, and handed to the
   * open connection with a `refresh` frame. */
  scheduleRenewal() {
    clearTimeout(this.renewTimer);
    const exp = Number(this.claims?.exp);
    if (!this.devIdentity || !Number.isFinite(exp)) return;
    const wait = Math.max(5, exp - Date.now() / 1000 - RENEW_BEFORE_EXPIRY_S) * 1000;
    this.renewTimer = setTimeout(async () => {
      try {
        await this.renew();
        current?.refreshToken();
      } catch {
        // The connection will close with 4001 and we try again then.
      }
    }, Math.min(wait, 2 ** 31 - 1));
  },

  async renew() {
    if (!this.devIdentity) throw new Error('not a development token');
    const minted = await mintToken(this.devIdentity.sub, this.devIdentity.name);
    this.set(minted.token, this.devIdentity);
  },
};

async function api(method, path, body, { auth = true } = {}) {
  const headers = { Accept: 'application/json' };
  if (auth && session.token) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, 'network', 'network error');
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const retryAfter = Number(response.headers.get('Retry-After'));
    throw new ApiError(
      response.status,
      data?.code ?? `http_${response.status}`,
      data?.message ?? response.statusText,
      Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter * 1000 : undefined,
    );
  }
  return data;
}

function mintToken(sub, name) {
  return api('POST', '/dev/token', { sub, name: name || undefined }, { auth: false });
}

// ---------------------------------------------------------------- status and notices

function setStatus(state, text) {
  const badge = $('status');
  badge.dataset.state = state;
  badge.textContent = text;
}

let noticeTimer = null;
function notify(text, level = 'warn', sticky = false) {
  clearTimeout(noticeTimer);
  $('notice-text').textContent = text;
  $('notice').dataset.level = level;
  $('notice').hidden = false;
  if (!sticky) noticeTimer = setTimeout(clearNotice, 8000);
}
function clearNotice() {
  $('notice').hidden = true;
}

// ---------------------------------------------------------------- one room

/** The open room: its history, its socket, its presence and typing. */
class RoomView {
  constructor(roomId) {
    this.roomId = roomId;
    this.ws = null;
    this.ready = false;
    this.stopped = false;
    /** seq → list item, for every message shown. */
    this.items = new Map();
    /** Highest seq with every earlier one held (the `since` of a resume). */
    this.lastSeq = 0;
    this.lowestSeq = null;
    this.newestSeq = 0;
    /** client_id → {body, item, timer}: sends not acknowledged yet. */
    this.pending = new Map();
    /** The client_id sent and not yet acknowledged, if any. */
    this.inFlight = null;
    this.holdUntil = 0;
    this.holdTimer = null;
    this.presence = new Map();
    this.typing = new Map();
    this.attempt = 0;
    this.retryTimer = null;
    this.heartbeat = null;
    this.lastHeard = 0;
    this.lastTypingSent = 0;
    this.filling = false;
  }

  // -- life cycle

  async start() {
    $('message-list').replaceChildren();
    $('pending-list').replaceChildren();
    $('presence').replaceChildren();
    $('typing').textContent = '';
    $('room-title').textContent = this.roomId;
    $('room-meta').textContent = '';
    $('load-older').hidden = true;
    clearNotice();
    setComposer(true);
    setStatus('connecting', 'Loading…');
    try {
      const room = await api('GET', `${API}/rooms/${encodeURIComponent(this.roomId)}`);
      this.showRoom(room);
      const page = await api('GET', `${API}/rooms/${encodeURIComponent(this.roomId)}/messages?limit=${HISTORY_PAGE}`);
      if (this.stopped) return;
      this.addPage(page);
      this.scrollToBottom();
    } catch (err) {
      if (this.stopped) return;
      // A direct room is created by connecting to it.
      const directToBe = err.code === 'not_found' && this.roomId.startsWith('dm:');
      const transient = ['network', 'unavailable', 'rate_limited'].includes(err.code);
      if (err instanceof ApiError && !directToBe && !transient) {
        this.fail(err);
        return;
      }
      // The socket's replay still brings the room; history can be paged later.
      if (transient) notify(err.human ?? String(err));
    }
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.countdown);
    clearInterval(this.heartbeat);
    clearTimeout(this.holdTimer);
    for (const t of this.typing.values()) clearTimeout(t.timer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = null;
      ws.close(1000);
    }
  }

  /** A refusal nothing will fix by retrying. */
  fail(err) {
    this.stop();
    setComposer(false);
    if (err.code === 'unauthorized') {
      signOut(err.human);
      return;
    }
    setStatus('closed', 'Not connected');
    $('presence').replaceChildren();
    notify(err.human, 'error', true);
  }

  connect() {
    if (this.stopped) return;
    clearTimeout(this.retryTimer);
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const url = `${scheme}://${location.host}/ws/chat/${encodeURIComponent(this.roomId)}?since=${this.lastSeq}`;
    setStatus('connecting', this.attempt ? 'Reconnecting…' : 'Connecting…');
    let ws;
    try {
      // Browsers cannot set headers: the token rides in the subprotocol list.
      ws = new WebSocket(url, ['chat.v1', `bearer.${session.token}`]);
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.ready = false;
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this.lastHeard = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.onFrame(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.onClose(event.code);
    };
  }

  onClose(code) {
    const wasReady = this.ready;
    this.ws = null;
    this.ready = false;
    clearInterval(this.heartbeat);
    this.clearTyping();
    if (this.stopped) return;
    // An unacknowledged send goes again, with its client_id, once ready.
    this.inFlight = null;
    this.pump();
    if (code === 4003) {
      this.fail({ code: 'removed', human: `${CLOSE_TEXT[4003]} You can pick another room.` });
      loadRooms();
      return;
    }
    if (code === 4001) {
      this.onExpired();
      return;
    }
    if (!wasReady && code === 1006) {
      // A refused handshake looks like 1006 to a browser, which hides the
      // HTTP answer: ask REST why, in the contract's words.
      this.diagnose();
      return;
    }
    if (code !== 1006 || wasReady) notify(CLOSE_TEXT[code] ?? CLOSE_TEXT[1006]);
    this.scheduleReconnect(code === 4029 ? 30000 : code === 1013 ? 5000 : 0);
  }

  async onExpired() {
    if (session.devIdentity) {
      try {
        await session.renew();
        notify('Your sign-in expired; a new development token was minted. Reconnecting…');
        this.connect();
        return;
      } catch {
        // fall through
      }
    }
    this.fail({ code: 'unauthorized', human: `${CLOSE_TEXT[4001]} Paste a new token to continue.` });
  }

  async diagnose() {
    try {
      await api('GET', `${API}/rooms/${encodeURIComponent(this.roomId)}`);
    } catch (err) {
      if (this.stopped) return;
      if (err.code === 'unauthorized') return this.onExpired();
      if (err.code === 'forbidden' || err.code === 'not_found') return this.fail(err);
      if (err.code === 'rate_limited') return this.scheduleReconnect(err.retryAfterMs ?? 5000);
    }
    this.scheduleReconnect();
  }

  /** Exponential backoff with jitter; at least `minimum` ms. */
  scheduleReconnect(minimum = 0) {
    if (this.stopped) return;
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
    const delay = Math.max(minimum, ceiling / 2 + Math.random() * (ceiling / 2));
    this.attempt += 1;
    const until = Date.now() + delay;
    const tick = () => {
      if (this.stopped || this.ws) return;
      if (!navigator.onLine) {
        setStatus('offline', 'Offline');
        return;
      }
      setStatus('waiting', `Reconnecting ${inSeconds(until - Date.now())}`);
    };
    tick();
    clearInterval(this.countdown);
    this.countdown = setInterval(() => (Date.now() >= until ? clearInterval(this.countdown) : tick()), 1000);
    this.retryTimer = setTimeout(() => {
      clearInterval(this.countdown);
      this.connect();
    }, delay);
  }

  /** The network is back: don't wait for the backoff. */
  reconnectNow() {
    if (this.stopped || this.ws) return;
    clearInterval(this.countdown);
    this.connect();
  }

  startHeartbeat() {
    clearInterval(this.heartbeat);
    this.heartbeat = setInterval(() => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      if (Date.now() - this.lastHeard > SILENCE_LIMIT_MS) {
        // Nothing heard, not even a pong: the connection is dead even if
        // the browser has not noticed.
        const dead = this.ws;
        dead.onclose = null;
        dead.close();
        this.onClose(1006);
        return;
      }
      this.send({ type: 'ping' });
    }, HEARTBEAT_MS);
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  refreshToken() {
    if (this.ready) this.send({ type: 'refresh', token: session.token });
  }

  // -- frames

  onFrame(frame) {
    switch (frame.type) {
      case 'ready':
        return this.onReady(frame);
      case 'message':
        return this.onMessage(frame);
      case 'ack':
        return this.onAck(frame);
      case 'message_deleted':
        return this.onDeleted(frame);
      case 'join':
        return this.onJoin(frame.user);
      case 'leave':
        return this.onLeave(frame.user);
      case 'typing':
        return this.onTyping(frame.user);
      case 'error':
        return this.onError(frame);
      case 'refreshed':
        return undefined;
      default:
        return undefined; // pong, and frames added after this client
    }
  }

  onReady(frame) {
    this.ready = true;
    this.attempt = 0;
    clearInterval(this.countdown);
    clearNotice();
    setStatus('open', 'Connected');
    this.showRoom(frame.room);
    this.presence = new Map((frame.presence ?? []).map((u) => [u.id, u]));
    if (frame.user) this.presence.set(frame.user.id, frame.user);
    this.renderPresence();
    this.startHeartbeat();
    // When the replay was cut short (`resumed: false`), the hole shows up
    // at the first replayed message and is filled from REST then.
    this.inFlight = null;
    this.pump();
  }

  onMessage(m) {
    this.place(m);
    if (m.client_id && m.user?.id === session.userId) this.settle(m.client_id);
    this.stopTyping(m.user?.id);
  }

  onAck(ack) {
    const p = this.pending.get(ack.client_id);
    if (!p) return;
    // Normally the message itself arrives next; show it now in any case.
    this.place({ seq: ack.seq, id: ack.id, created_at: ack.created_at, body: p.body, user: me(), client_id: ack.client_id });
    this.settle(ack.client_id);
  }

  onDeleted(d) {
    const item = this.items.get(d.seq);
    if (item) markDeleted(item);
    else this.place({ seq: d.seq, id: d.id, deleted: true, body: '', user: null });
  }

  onJoin(user) {
    if (!user) return;
    const known = this.presence.has(user.id);
    this.presence.set(user.id, user);
    this.renderPresence();
    if (!known) this.event(`${user.name} joined`);
  }

  onLeave(user) {
    if (!user) return;
    this.presence.delete(user.id);
    this.stopTyping(user.id);
    this.renderPresence();
    this.event(`${user.name} left`);
  }

  onTyping(user) {
    if (!user || user.id === session.userId) return;
    const previous = this.typing.get(user.id);
    if (previous) clearTimeout(previous.timer);
    const timer = setTimeout(() => this.stopTyping(user.id), TYPING_SHOW_MS);
    this.typing.set(user.id, { user, timer });
    this.renderTyping();
  }

  onError(frame) {
    const failed = frame.client_id && frame.client_id === this.inFlight;
    if (failed) this.inFlight = null;
    if (frame.code === 'rate_limited' || frame.code === 'unavailable' || frame.code === 'internal') {
      // Nothing was stored: the same send goes again (same client_id) later.
      const wait = frame.code === 'rate_limited' ? (frame.retry_after_ms ?? 1000) : 2000;
      notify(
        frame.code === 'rate_limited'
          ? `${ERROR_TEXT.rate_limited} Your message will be sent ${inSeconds(wait)}.`
          : errorText(frame.code),
      );
      if (failed) this.holdSends(wait);
      return;
    }
    if (frame.code === 'unauthorized' || frame.code === 'forbidden') {
      notify(errorText(frame.code, frame.message), 'error');
      return;
    }
    // bad_request, invalid_message, message_too_long: the send itself is wrong.
    const p = frame.client_id ? this.pending.get(frame.client_id) : null;
    if (p) {
      this.pending.delete(frame.client_id);
      p.item.classList.add('failed');
      setPendingState(p.item, `not sent: ${errorText(frame.code, frame.message)}`);
      const dismiss = el('button', 'link', 'dismiss');
      dismiss.type = 'button';
      dismiss.addEventListener('click', () => p.item.remove());
      p.item.querySelector('.meta').append(dismiss);
    }
    notify(errorText(frame.code, frame.message), 'error');
    if (failed) this.pump();
  }

  // -- sending
  //
  // One send at a time: the next leaves when the previous is acknowledged
  // (or refused), so messages arrive in the order they were typed even
  // through rate limits and reconnects; a person never types faster than
  // an acknowledgement comes back.

  submit(body) {
    const text = body.replace(/\r\n/g, '\n').trim();
    if (!text) return;
    if ([...text].length > 2000) {
      notify(ERROR_TEXT.message_too_long, 'error');
      return;
    }
    const clientId = randomId();
    const item = messageItem({ user: me(), body: text, created_at: new Date().toISOString() });
    item.classList.add('pending', 'mine');
    item.dataset.clientId = clientId;
    $('pending-list').append(item);
    this.pending.set(clientId, { body: text, item });
    this.pump();
    this.scrollToBottom();
  }

  /** Sends the oldest unacknowledged message, unless one is on its way. */
  pump() {
    const waiting = this.holdUntil > Date.now();
    for (const p of this.pending.values()) {
      setPendingState(
        p.item,
        !this.ready ? 'waiting for the connection…' : waiting ? `waiting ${inSeconds(this.holdUntil - Date.now())}` : 'sending…',
      );
    }
    if (this.inFlight || waiting || !this.ready) return;
    const next = this.pending.entries().next();
    if (next.done) return;
    const [clientId, p] = next.value;
    if (this.send({ type: 'message', body: p.body, client_id: clientId })) this.inFlight = clientId;
  }

  holdSends(wait) {
    this.holdUntil = Date.now() + wait;
    clearTimeout(this.holdTimer);
    this.holdTimer = setTimeout(() => this.pump(), wait);
    this.pump();
  }

  settle(clientId) {
    const p = this.pending.get(clientId);
    if (!p) return;
    p.item.remove();
    this.pending.delete(clientId);
    if (this.inFlight === clientId) this.inFlight = null;
    if (!this.pending.size && this.holdUntil) {
      this.holdUntil = 0;
      clearNotice(); // the "sending too fast" notice is out of date
    }
    this.pump();
  }

  typed() {
    const now = Date.now();
    if (now - this.lastTypingSent < TYPING_SEND_EVERY_MS || !this.ready) return;
    this.lastTypingSent = now;
    this.send({ type: 'typing' });
  }

  // -- history

  /** Adds a REST page of messages. */
  addPage(page) {
    const messages = page?.messages ?? [];
    for (const m of messages) this.place(m);
  }

  async loadOlder() {
    if (this.lowestSeq === null || this.lowestSeq <= 1) return;
    const box = $('messages');
    const before = box.scrollHeight - box.scrollTop;
    try {
      const page = await api(
        'GET',
        `${API}/rooms/${encodeURIComponent(this.roomId)}/messages?before_seq=${this.lowestSeq}&limit=${HISTORY_PAGE}`,
      );
      this.addPage(page);
      box.scrollTop = box.scrollHeight - before;
    } catch (err) {
      notify(err.human ?? String(err));
    }
  }

  /** Fetches every message between `lastSeq` and the first held one above it. */
  async fillGap() {
    if (this.filling) return;
    this.filling = true;
    try {
      for (;;) {
        const above = [...this.items.keys()].filter((s) => s > this.lastSeq + 1);
        if (!above.length || this.items.has(this.lastSeq + 1)) break;
        const upTo = Math.min(...above);
        const page = await api(
          'GET',
          `${API}/rooms/${encodeURIComponent(this.roomId)}/messages?after_seq=${this.lastSeq}&before_seq=${upTo}&limit=200`,
        );
        const before = this.lastSeq;
        this.addPage(page);
        if (this.lastSeq === before) break; // nothing new: stop rather than spin
      }
    } catch (err) {
      notify(err.human ?? String(err));
    } finally {
      this.filling = false;
    }
  }

  /** Shows a message at its place in seq order, once. */
  place(m) {
    if (typeof m.seq !== 'number' || this.items.has(m.seq)) return;
    const box = $('messages');
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    const item = messageItem(m);
    if (m.deleted) markDeleted(item);
    if (m.user?.id && m.user.id === session.userId) item.classList.add('mine');
    const list = $('message-list');
    if (m.seq > this.newestSeq) {
      // The usual case: after everything, "joined"/"left" lines included.
      list.append(item);
    } else {
      // An older page or a filled hole: right after the message before it.
      let before = list.lastElementChild;
      while (before && !(before.dataset.seq && Number(before.dataset.seq) < m.seq)) before = before.previousElementSibling;
      if (before) before.after(item);
      else list.prepend(item);
    }
    this.items.set(m.seq, item);
    this.newestSeq = Math.max(this.newestSeq, m.seq);
    if (this.lowestSeq === null || m.seq < this.lowestSeq) {
      this.lowestSeq = m.seq;
      if (this.lastSeq === 0 || this.lastSeq < m.seq - 1) this.lastSeq = Math.max(this.lastSeq, m.seq - 1);
    }
    while (this.items.has(this.lastSeq + 1)) this.lastSeq += 1;
    // Seqs start at 1 with no holes: anything above 1 has older messages.
    $('load-older').hidden = !(this.lowestSeq > 1);
    if (m.seq > this.lastSeq + 1 && this.ready) this.fillGap();
    if (atBottom) this.scrollToBottom();
  }

  scrollToBottom() {
    const box = $('messages');
    box.scrollTop = box.scrollHeight;
  }

  /** A line such as "bob joined", after the newest message. */
  event(text) {
    const item = el('li', 'event', text);
    $('message-list').append(item);
    this.scrollToBottom();
  }

  // -- room, presence and typing

  showRoom(room) {
    if (!room) return;
    $('room-title').textContent = room.name || room.id;
    $('room-meta').textContent = `${room.kind ?? ''} · ${room.id}`;
    document.title = `${room.name || room.id} · Clash of Code chat`;
  }

  renderPresence() {
    const people = [...this.presence.values()].sort((a, b) => a.name.localeCompare(b.name));
    const nodes = people.map((user) => {
      const node = el('span', 'person');
      node.dataset.userId = user.id;
      node.title = user.id;
      node.append(avatar(user), document.createTextNode(user.id === session.userId ? `${user.name} (you)` : user.name));
      return node;
    });
    $('presence').replaceChildren(...nodes);
    $('presence').setAttribute('aria-label', `${people.length} here now`);
  }

  stopTyping(userId) {
    const entry = this.typing.get(userId);
    if (!entry) return;
    clearTimeout(entry.timer);
    this.typing.delete(userId);
    this.renderTyping();
  }

  clearTyping() {
    for (const id of [...this.typing.keys()]) this.stopTyping(id);
  }

  renderTyping() {
    const names = [...this.typing.values()].map((t) => t.user.name);
    let text = '';
    if (names.length === 1) text = `${names[0]} is typing…`;
    else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
    else if (names.length > 2) text = 'Several people are typing…';
    $('typing').textContent = text;
  }
}

function me() {
  const claims = session.claims ?? {};
  const id = session.userId ?? '?';
  return { id, name: claims.name || id };
}

function messageItem(m) {
  const item = el('li', 'msg');
  if (typeof m.seq === 'number') item.dataset.seq = String(m.seq);
  if (m.id) item.dataset.id = m.id;
  const meta = el('div', 'meta');
  meta.append(el('span', 'author', m.user?.name ?? 'deleted'));
  const time = el('time', '', formatTime(m.created_at));
  if (m.created_at) {
    time.dateTime = m.created_at;
    time.title = new Date(m.created_at).toLocaleString();
  }
  meta.append(time, el('span', 'state'));
  item.append(avatar(m.user ?? { id: '?', name: '?' }), meta, el('div', 'body', m.body ?? ''));
  return item;
}

function markDeleted(item) {
  item.classList.add('deleted');
  item.querySelector('.body').textContent = 'This message was deleted.';
}

function setPendingState(item, text) {
  item.querySelector('.state').textContent = text;
}

function setComposer(enabled) {
  $('composer-input').disabled = !enabled;
  $('send').disabled = !enabled;
}

// ---------------------------------------------------------------- rooms

let current = null;

async function loadRooms() {
  try {
    const { rooms } = await api('GET', `${API}/rooms`);
    renderRooms(rooms);
  } catch (err) {
    if (err.code === 'unauthorized') signOut(err.human);
    else notify(err.human ?? String(err));
  }
}

function renderRooms(rooms) {
  const items = rooms.map((room) => {
    const li = el('li');
    const button = el('button');
    button.type = 'button';
    button.dataset.roomId = room.id;
    button.append(el('span', 'name', room.kind === 'global' ? '# global' : `# ${room.name || room.id}`), el('span', 'kind', room.kind));
    if (current?.roomId === room.id) button.setAttribute('aria-current', 'true');
    button.addEventListener('click', () => openRoom(room.id));
    li.append(button);
    return li;
  });
  $('rooms').replaceChildren(...items);
}

function markCurrentRoom() {
  for (const button of $('rooms').querySelectorAll('button')) {
    if (button.dataset.roomId === current?.roomId) button.setAttribute('aria-current', 'true');
    else button.removeAttribute('aria-current');
  }
}

function openRoom(roomId) {
  if (current?.roomId === roomId && !current.stopped) return;
  current?.stop();
  current = new RoomView(roomId);
  if (decodeURIComponent(location.hash.slice(1)) !== roomId) history.replaceState(null, '', `#${encodeURIComponent(roomId)}`);
  markCurrentRoom();
  current.start();
}

// ---------------------------------------------------------------- sign-in

function showSignin(message) {
  $('chat').hidden = true;
  $('whoami').hidden = true;
  $('signin').hidden = false;
  setStatus('idle', 'Not connected');
  const error = $('signin-error');
  error.textContent = message ?? '';
  error.hidden = !message;
}

function signOut(message) {
  current?.stop();
  current = null;
  session.clear();
  showSignin(message);
}

async function signIn(token, devIdentity) {
  const claims = readClaims(token);
  if (!claims || claims.sub === undefined) {
    showSignin('That doesn’t look like a token: a JWT has three parts separated by dots.');
    return;
  }
  session.set(token, devIdentity);
  try {
    const { rooms } = await api('GET', `${API}/rooms`);
    $('signin').hidden = true;
    $('chat').hidden = false;
    $('whoami').hidden = false;
    const user = me();
    $('whoami-avatar').replaceWith(Object.assign(avatar(user), { id: 'whoami-avatar' }));
    $('whoami-name').textContent = `${user.name} (${user.id})`;
    renderRooms(rooms);
    const wanted = decodeURIComponent(location.hash.slice(1)) || 'global';
    openRoom(wanted);
  } catch (err) {
    session.clear();
    showSignin(err.human ?? String(err));
  }
}

async function detectDevTokens() {
  try {
    const status = await api('GET', '/dev/token');
    session.devTokens = Boolean(status?.enabled);
  } catch {
    session.devTokens = false;
  }
  $('mint-form').hidden = !session.devTokens;
}

// ---------------------------------------------------------------- wiring

/** Once `request` (a room creation) succeeds: close its form, open the room. */
async function enterCreatedRoom(form, request) {
  try {
    const room = await request;
    form.reset();
    form.closest('details').open = false;
    await loadRooms();
    openRoom(room.id);
  } catch (err) {
    notify(err.human ?? String(err), 'error');
  }
}

function wire() {
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    signIn($('token-input').value.trim().replace(/^Bearer\s+/i, ''));
  });

  $('mint-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const sub = $('mint-sub').value.trim();
    const name = $('mint-name').value.trim();
    $('mint-button').disabled = true;
    try {
      const minted = await mintToken(sub, name);
      await signIn(minted.token, { sub, name });
    } catch (err) {
      showSignin(err.human ?? String(err));
    } finally {
      $('mint-button').disabled = false;
    }
  });

  $('sign-out').addEventListener('click', () => signOut());
  $('refresh-rooms').addEventListener('click', loadRooms);
  $('notice-close').addEventListener('click', clearNotice);
  $('load-older').addEventListener('click', () => current?.loadOlder());

  $('join-form').addEventListener('submit', (event) => {
    event.preventDefault();
    openRoom($('join-id').value.trim());
    event.target.reset();
    event.target.closest('details').open = false;
  });

  $('create-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const body = { name: $('create-name').value.trim(), kind: $('create-kind').value };
    const id = $('create-id').value.trim();
    if (id) body.id = id;
    const members = $('create-members').value.split(',').map((s) => s.trim()).filter(Boolean);
    if (members.length) body.members = members;
    enterCreatedRoom(event.target, api('POST', `${API}/rooms`, body));
  });

  $('dm-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    enterCreatedRoom(event.target, api('POST', `${API}/dm/${encodeURIComponent($('dm-user').value.trim())}`));
  });

  const input = $('composer-input');
  const sendNow = () => {
    if (!current || !input.value.trim()) return;
    current.submit(input.value);
    input.value = '';
    input.style.height = '';
  };
  $('composer').addEventListener('submit', (event) => {
    event.preventDefault();
    sendNow();
  });
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendNow();
    }
  });
  input.addEventListener('input', () => {
    input.style.height = 'auto';
    input.style.height = `${input.scrollHeight}px`;
    if (input.value.trim()) current?.typed();
  });

  window.addEventListener('offline', () => {
    if (current && !current.ws) setStatus('offline', 'Offline');
  });
  window.addEventListener('online', () => current?.reconnectNow());
  window.addEventListener('hashchange', () => {
    const wanted = decodeURIComponent(location.hash.slice(1));
    if (wanted && session.token && wanted !== current?.roomId) openRoom(wanted);
  });
}

async function main() {
  wire();
  await detectDevTokens();
  if (session.token) {
    const exp = Number(session.claims?.exp);
    if (session.devIdentity && exp < Date.now() / 1000 + 30) {
      await session.renew().catch(() => {});
    }
    await signIn(session.token, session.devIdentity);
  } else {
    showSignin();
  }
}

main();
