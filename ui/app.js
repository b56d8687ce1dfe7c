// agentline inbox: the person's side of agentline in one small script.
// No framework and no build step. Everything an agent wrote is put on the
// page with textContent only, never parsed as markup: agent text is hostile
// input.
'use strict';

(function () {
  const KEY_STORAGE = 'agentline.key';
  const LAST_MESSAGE_CHARS = 200;

  const $ = (id) => document.getElementById(id);

  const state = {
    key: null,
    sessions: new Map(), // id -> session as GET /api/v1/sessions gives it
    nextBefore: null, // cursor of the next (older) page of sessions
    olderLoaded: false, // the person loaded pages past the first
    openId: null, // session shown in the detail panel
    timeline: [], // its messages, in seq order
    gen: 0, // counts timeline resets
    loading: 0, // timeline loads in flight; events for it wait in queued
    queued: [],
    loaded: false, // the first list arrived: later questions are new
    lastEventId: null, // resume point of the event stream
    stream: null, // AbortController of the running stream
    refreshTimer: 0,
  };

  // ---- small helpers ----

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function cutChars(s, n) {
    const chars = Array.from(s);
    return chars.length > n ? chars.slice(0, n).join('') : s;
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return '';
    const s = (Date.now() - t) / 1000;
    if (s < 45) return 'just now';
    if (s < 3600) return Math.round(s / 60) + ' min ago';
    if (s < 86400) return Math.round(s / 3600) + ' h ago';
    return new Date(t).toLocaleDateString();
  }

  function clock(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    const hm = { hour: '2-digit', minute: '2-digit' };
    if (d.toDateString() === new Date().toDateString()) return d.toLocaleTimeString([], hm);
    return d.toLocaleString([], { month: 'short', day: 'numeric', ...hm });
  }

  const STATUS_LABELS = {
    ACTIVE: 'active',
    AWAITING_INPUT: 'waiting for you',
    COMPLETED: 'ended',
    PAUSED: 'paused',
    STALE: 'stale',
    FAILED: 'failed',
    KILLED: 'killed',
    DISCONNECTED: 'disconnected',
  };

  function statusBadge(status) {
    const s = el('span', 'status status-' + String(status).toLowerCase(), STATUS_LABELS[status] || status);
    s.title = status;
    return s;
  }

  function shortId(id) {
    return String(id).slice(0, 8);
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  class HTTPError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  // api calls the JSON API with the key in the Authorization header (never
  // in a URL: URLs end up in logs and histories).
  async function api(method, path, body) {
    const opts = { method, headers: { Authorization: 'Bearer ' + state.key }, cache: 'no-store' };
    if (body !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(path, opts);
    let data = null;
    try {
      data = await r.json();
    } catch (e) {
      data = null;
    }
    if (!r.ok) {
      const detail = (data && typeof data.detail === 'string') ? data.detail : 'HTTP ' + r.status;
      if (r.status === 401 && state.key && !state.signingIn) signOut('The key was refused (revoked or expired). Paste a new one.');
      throw new HTTPError(r.status, detail);
    }
    return data;
  }

  // ---- sign in and out ----

  async function signIn(key) {
    state.key = key;
    state.signingIn = true; // a refused key keeps the pasted text, so it can be corrected
    try {
      await api('GET', '/api/v1/sessions?limit=1');
    } catch (e) {
      state.key = null;
      state.signingIn = false;
      if (e.status === 403) return 'That is an agent key: it may write but not read. Paste a person key (agentline token -scope person).';
      if (e.status === 401) return 'That key was refused: ' + e.message;
      return 'Could not reach agentline: ' + e.message;
    }
    state.signingIn = false;
    try {
      localStorage.setItem(KEY_STORAGE, key);
    } catch (e) {
      // Private mode without storage: the key lasts until the tab closes.
    }
    showInbox();
    return '';
  }

  function signOut(message) {
    try {
      localStorage.removeItem(KEY_STORAGE);
    } catch (e) { /* nothing stored */ }
    state.key = null;
    if (state.stream) state.stream.abort();
    state.stream = null;
    state.sessions.clear();
    state.nextBefore = null;
    state.olderLoaded = false;
    state.openId = null;
    state.timeline = [];
    state.queued = [];
    state.loaded = false;
    state.lastEventId = null;
    $('questions').replaceChildren();
    $('sessions').replaceChildren();
    $('timeline').replaceChildren();
    $('keys').replaceChildren();
    $('keys-box').open = false;
    $('inbox').hidden = true;
    $('signout').hidden = true;
    $('notify').hidden = true;
    $('channels-toggle').hidden = true;
    $('away-box').hidden = true;
    $('away').checked = false;
    $('channels').hidden = true;
    $('channel-list').replaceChildren();
    $('channel-secret-box').hidden = true;
    $('channel-secret').textContent = '';
    $('conn').hidden = true;
    $('signin').hidden = false;
    $('key').value = '';
    $('signin-error').textContent = message || '';
    document.body.classList.remove('viewing');
  }

  function showInbox() {
    $('signin').hidden = true;
    $('inbox').hidden = false;
    $('signout').hidden = false;
    $('channels-toggle').hidden = false;
    $('signin-error').textContent = '';
    loadPresence();
    updateNotifyButton();
    render();
    refresh();
    stream();
  }

  // ---- loading ----

  // refresh re-reads the first page of sessions and every session waiting
  // for an answer (so no question hides on a later page), and the open
  // session's new messages. It runs after every (re)connect of the stream,
  // since session events are not replayed.
  async function refresh() {
    if (!state.key) return;
    try {
      const [page, waiting] = await Promise.all([
        api('GET', '/api/v1/sessions?limit=50'),
        api('GET', '/api/v1/sessions?status=AWAITING_INPUT&limit=200'),
      ]);
      const fresh = new Map();
      for (const s of page.sessions.concat(waiting.sessions)) fresh.set(s.id, s);
      // Keep sessions of older pages the person loaded. Every open question
      // is in the waiting list, so theirs are answered by now.
      for (const [id, s] of state.sessions) {
        if (!fresh.has(id)) {
          s.open_question = null;
          fresh.set(id, s);
        }
      }
      state.sessions = fresh;
      if (!state.olderLoaded) state.nextBefore = page.next_before;
      render();
      state.loaded = true;
      if (state.openId) loadTimeline(false);
      followLink();
    } catch (e) {
      // The stream's reconnect tries again.
    }
  }

  function scheduleRefresh() {
    clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(refresh, 300);
  }

  async function loadOlder() {
    if (!state.nextBefore) return;
    const page = await api('GET', '/api/v1/sessions?limit=50&before=' + encodeURIComponent(state.nextBefore));
    for (const s of page.sessions) if (!state.sessions.has(s.id)) state.sessions.set(s.id, s);
    state.nextBefore = page.next_before;
    state.olderLoaded = true;
    render();
  }

  // loadTimeline reads the open session's messages after the last one shown
  // (all of them when reset), page by page.
  async function loadTimeline(reset) {
    const id = state.openId;
    if (!id) return;
    if (reset) {
      state.gen++; // loads started before this one are dropped
      state.timeline = [];
      state.queued = [];
      $('timeline').replaceChildren();
      $('timeline-error').textContent = '';
    }
    const gen = state.gen;
    state.loading++;
    try {
      for (;;) {
        const after = state.timeline.length ? state.timeline[state.timeline.length - 1].seq : 0;
        const data = await api('GET', '/api/v1/sessions/' + encodeURIComponent(id) + '/messages?after=' + after + '&limit=500');
        if (state.openId !== id || state.gen !== gen) return;
        for (const m of data.messages) addToTimeline(m);
        const s = state.sessions.get(id);
        if (s) {
          s.status = data.status;
          s.agent_type = data.agent_type;
        } else {
          state.sessions.set(id, { id, agent_type: data.agent_type, status: data.status, last_activity_at: '', last_message: null, open_question: null });
        }
        const diff = data.git_diff;
        $('diff-box').hidden = !diff;
        $('diff').textContent = diff || '';
        if (data.next_after === null) break;
      }
      renderDetailHead();
    } catch (e) {
      if (state.openId === id) $('timeline-error').textContent = 'Could not load this session: ' + e.message;
    } finally {
      state.loading--;
      if (state.loading === 0) {
        // Events that came during the load, in order; addToTimeline skips
        // what the load already showed.
        const queued = state.queued;
        state.queued = [];
        for (const m of queued) if (m.session_id === state.openId) addToTimeline(m);
      }
    }
  }

  // ---- the event stream ----

  // stream follows GET /api/v1/events, read with fetch so the key travels in
  // a header. After a drop it reconnects with Last-Event-ID (backing off up
  // to 30 s), so no message is missed or shown twice.
  async function stream() {
    if (state.stream) state.stream.abort();
    const ctrl = new AbortController();
    state.stream = ctrl;
    let backoff = 1000;
    while (!ctrl.signal.aborted && state.key) {
      let watchdog = 0;
      try {
        const headers = { Authorization: 'Bearer ' + state.key, Accept: 'text/event-stream' };
        if (state.lastEventId !== null) headers['Last-Event-ID'] = String(state.lastEventId);
        const r = await fetch('/api/v1/events', { headers, signal: ctrl.signal, cache: 'no-store' });
        if (r.status === 401 || r.status === 403) {
          signOut(r.status === 401 ? 'The key was refused (revoked or expired). Paste a new one.' : 'This key may not read: paste a person key.');
          return;
        }
        if (!r.ok || !r.body) throw new Error('HTTP ' + r.status);
        setConn('live');
        backoff = 1000;
        refresh(); // the headers came: the stream is following, so a re-read misses nothing
        const reader = r.body.getReader();
        const decoder = new TextDecoder();
        let buf = '';
        // A silent connection (no keepalive for 45 s) is dead: start over.
        const arm = () => {
          clearTimeout(watchdog);
          watchdog = setTimeout(() => reader.cancel(), 45000);
        };
        arm();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          arm();
          buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            handleEventBlock(block);
          }
        }
      } catch (e) {
        if (ctrl.signal.aborted) return;
      } finally {
        clearTimeout(watchdog);
      }
      if (ctrl.signal.aborted || !state.key) return;
      setConn('reconnecting…');
      await sleep(backoff + Math.random() * 500);
      backoff = Math.min(backoff * 2, 30000);
    }
  }

  function setConn(text) {
    const c = $('conn');
    c.hidden = false;
    c.textContent = text;
    c.classList.toggle('live', text === 'live');
  }

  function handleEventBlock(block) {
    let event = 'message';
    let id = null;
    const data = [];
    for (const line of block.split('\n')) {
      if (line === '' || line.startsWith(':')) continue; // comment: keepalive
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
      else if (field === 'id') id = value;
    }
    if (data.length) {
      let payload;
      try {
        payload = JSON.parse(data.join('\n'));
      } catch (e) {
        return;
      }
      if (event === 'message') onMessage(payload);
      else if (event === 'session') onSession(payload);
      else if (event === 'decision') onDecision(payload);
    }
    // Only after the event is handled: a reconnect resumes after it.
    if (id !== null && /^\d+$/.test(id)) state.lastEventId = id;
  }

  function onMessage(m) {
    const s = state.sessions.get(m.session_id);
    if (!s) {
      scheduleRefresh(); // a new session: read it whole
    } else {
      s.last_message = cutChars(m.content, LAST_MESSAGE_CHARS);
      s.last_sender = m.sender_type;
      s.last_activity_at = m.created_at;
      const asks = m.sender_type === 'AGENT' && m.requires_user_input && s.status !== 'COMPLETED';
      // A person's message never decides an approval: it stays open.
      const keep = m.sender_type === 'USER' && s.open_question && s.open_question.kind === 'approval';
      if (!keep) s.open_question = asks ? openQuestionOf(m) : null;
      if (asks) s.status = 'AWAITING_INPUT';
    }
    if (m.session_id === state.openId) {
      if (state.loading) state.queued.push(m);
      else addToTimeline(m);
    }
    render();
  }

  function openQuestionOf(m) {
    return {
      id: m.id, content: m.content, kind: m.kind, options: m.options, allow_text: m.allow_text,
      tool_name: m.tool_name, tool_input: m.tool_input,
    };
  }

  // onDecision: an approval was decided (here or on another device).
  function onDecision(ev) {
    const s = state.sessions.get(ev.session_id);
    if (s && s.open_question && s.open_question.id === ev.id) s.open_question = null;
    const entry = document.querySelector('#timeline li[data-id="' + CSS.escape(ev.id) + '"]');
    if (entry) markDecision(entry, ev.decision, ev.decision_message);
    render();
  }

  function markDecision(li, decision, message) {
    let d = li.querySelector('.decision');
    if (!d) {
      d = el('p', 'decision');
      li.append(d);
    }
    const words = { allow: 'Allowed', allow_session: 'Allowed for this session', deny: 'Denied' };
    d.textContent = (words[decision] || decision) + (message ? ': ' + message : '');
  }

  function onSession(ev) {
    const s = state.sessions.get(ev.id);
    if (!s) {
      scheduleRefresh();
      return;
    }
    s.status = ev.status;
    s.agent_type = ev.agent_type;
    s.title = ev.title;
    s.ended_at = ev.ended_at;
    s.last_activity_at = ev.last_activity_at;
    if (ev.status === 'COMPLETED') s.open_question = null;
    render();
  }

  // ---- notifications ----

  function updateNotifyButton() {
    $('notify').hidden = !('Notification' in window) || Notification.permission !== 'default' || !state.key;
  }

  function notifyQuestion(s) {
    if (!('Notification' in window) || Notification.permission !== 'granted') return;
    const q = s.open_question;
    try {
      const n = new Notification('Question from ' + s.agent_type, {
        body: cutChars(q.content, 180),
        tag: 'question-' + q.id,
      });
      n.onclick = () => {
        window.focus();
        openSession(s.id);
        n.close();
      };
    } catch (e) {
      // Some browsers only notify from a service worker; the page still shows it.
    }
  }

  // ---- rendering ----

  function sortedSessions() {
    return Array.from(state.sessions.values()).sort((a, b) =>
      (b.last_activity_at || '').localeCompare(a.last_activity_at || '') || (b.id < a.id ? -1 : 1));
  }

  function render() {
    renderQuestions();
    renderSessions();
    renderDetailHead();
  }

  // renderQuestions adds and removes question cards but keeps the ones that
  // stay, so an answer being typed is never wiped by an update.
  function renderQuestions() {
    const list = $('questions');
    // Approvals first (an agent is blocked on each), then questions; waiting longest first.
    const open = sortedSessions().filter((s) => s.open_question).reverse();
    open.sort((a, b) => (b.open_question.kind === 'approval') - (a.open_question.kind === 'approval'));
    const want = new Set(open.map((s) => s.open_question.id));
    for (const card of Array.from(list.children)) {
      if (!want.has(card.dataset.question)) card.remove();
    }
    const have = new Map(Array.from(list.children).map((c) => [c.dataset.question, c]));
    let prev = null;
    for (const s of open) {
      let card = have.get(s.open_question.id);
      if (!card) {
        card = questionCard(s);
        if (state.loaded) notifyQuestion(s); // new since the page opened
      }
      const where = prev ? prev.nextSibling : list.firstChild;
      if (card !== where) list.insertBefore(card, where);
      prev = card;
    }
    $('no-questions').hidden = open.length > 0;
    $('question-count').textContent = open.length ? String(open.length) : '';
  }

  function questionCard(s) {
    const q = s.open_question;
    const li = el('li', 'card question' + (q.kind === 'approval' ? ' approval' : ''));
    li.dataset.question = q.id;
    li.dataset.session = s.id;
    const head = el('div', 'row');
    const who = el('button', 'link', s.agent_type + ' · ' + shortId(s.id));
    who.type = 'button';
    who.addEventListener('click', () => openSession(s.id));
    head.append(who, el('span', 'meta', ago(s.last_activity_at)));
    li.append(head, ...answerControls(s, q, 'card'));
    return li;
  }

  // answerControls are what the person answers q with: an approval's tool
  // and input (as text) with Allow / Allow for this session / Deny; a
  // question's option buttons and (unless allow_text is false) a text box.
  // Everything goes to POST /api/v1/questions/ID/answer: the first answer
  // wins, a late one says what was decided.
  function answerControls(s, q, where) {
    const note = el('span', 'meta');
    note.setAttribute('role', 'status');
    const done = () => {
      const cur = state.sessions.get(s.id);
      if (cur && cur.open_question && cur.open_question.id === q.id) {
        cur.open_question = null;
        if (cur.status === 'AWAITING_INPUT') cur.status = 'ACTIVE';
      }
      render();
      if (state.openId === s.id) loadTimeline(false);
    };
    const answer = async (body, buttons) => {
      for (const b of buttons) b.disabled = true;
      note.textContent = 'Sending…';
      try {
        await api('POST', '/api/v1/questions/' + encodeURIComponent(q.id) + '/answer', body);
        note.textContent = '';
        done();
        return true;
      } catch (err) {
        note.textContent = (err.status === 409 ? 'Too late: ' : 'Not sent: ') + err.message;
        if (err.status === 409) setTimeout(done, 1500);
        return false;
      } finally {
        for (const b of buttons) b.disabled = false;
      }
    };
    if (q.kind === 'approval') {
      const title = el('p', 'text');
      title.append('Allow ', el('strong', 'tool', q.tool_name || '?'), '?');
      let input = '';
      try {
        input = JSON.stringify(q.tool_input, null, 2);
      } catch (e) {
        input = String(q.tool_input);
      }
      const pre = el('pre', 'tool-input', input); // text, never markup
      const actions = el('div', 'actions');
      const allow = el('button', 'primary', 'Allow');
      const session = el('button', '', 'Allow for this session');
      const deny = el('button', 'danger', 'Deny');
      const buttons = [allow, session, deny];
      for (const b of buttons) b.type = 'button';
      allow.dataset.decision = 'allow';
      session.dataset.decision = 'allow_session';
      deny.dataset.decision = 'deny';
      const fieldId = 'deny-' + where + '-' + q.id;
      const label = el('label', '', 'Message with Deny (optional)');
      label.htmlFor = fieldId;
      const why = el('input', 'deny-message');
      why.id = fieldId;
      why.type = 'text';
      why.maxLength = 2000;
      allow.addEventListener('click', () => answer({ decision: 'allow' }, buttons));
      session.addEventListener('click', () => answer({ decision: 'allow_session' }, buttons));
      deny.addEventListener('click', () => {
        const body = { decision: 'deny' };
        if (why.value.trim()) body.message = why.value.trim();
        answer(body, buttons);
      });
      actions.append(allow, session, deny, note);
      return [title, pre, label, why, actions];
    }
    const out = [el('p', 'text', q.content)];
    const options = Array.isArray(q.options) ? q.options : [];
    const optionButtons = [];
    if (options.length) {
      const row = el('div', 'actions options');
      for (const o of options) {
        const b = el('button', 'option', o);
        b.type = 'button';
        b.dataset.option = o;
        b.addEventListener('click', () => answer({ option: o }, optionButtons));
        optionButtons.push(b);
        row.append(b);
      }
      out.push(row);
    }
    if (q.allow_text === false) {
      out.push(note);
      return out;
    }
    const form = el('form', 'reply');
    form.noValidate = true;
    const fieldId = 'answer-' + where + '-' + q.id;
    const label = el('label', '', 'Answer');
    label.htmlFor = fieldId;
    const box = el('textarea');
    box.id = fieldId;
    box.rows = 2;
    const actions = el('div', 'actions');
    const send = el('button', 'primary', 'Send');
    send.type = 'submit';
    actions.append(send, el('span', 'meta hint-keys', 'Ctrl+Enter sends'), note);
    form.append(label, box, actions);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      if (!box.value.trim()) {
        note.textContent = 'Write an answer first.';
        return;
      }
      if (await answer({ text: box.value }, [send, ...optionButtons])) box.value = '';
    });
    out.push(form);
    return out;
  }

  function renderSessions() {
    const list = $('sessions');
    const items = sortedSessions().map((s) => {
      const li = el('li', 'session' + (s.id === state.openId ? ' selected' : ''));
      const b = el('button', 'session-button');
      b.type = 'button';
      b.dataset.session = s.id;
      const top = el('span', 'row');
      top.append(el('span', 'agent', s.agent_type), statusBadge(s.status), el('span', 'meta when', ago(s.last_activity_at)));
      if (s.title) top.append(el('span', 'meta title', s.title)); // Claude Code's working directory
      const last = el('span', 'last');
      if (s.last_message && s.last_sender === 'USER') last.append(el('strong', 'you', 'You: '));
      last.append(s.last_message || '');
      b.append(top, last);
      b.addEventListener('click', () => openSession(s.id));
      li.append(b);
      return li;
    });
    list.replaceChildren(...items);
    $('no-sessions').hidden = items.length > 0;
    $('more').hidden = !state.nextBefore;
  }

  function renderDetailHead() {
    const s = state.openId && state.sessions.get(state.openId);
    $('detail-empty').hidden = !!state.openId;
    $('detail-body').hidden = !state.openId;
    if (!s) return;
    $('detail-title').textContent = s.agent_type + ' · ' + shortId(s.id);
    $('detail-status').replaceChildren(statusBadge(s.status));
    const parts = [];
    if (s.started_at) parts.push('started ' + clock(s.started_at));
    if (s.ended_at) parts.push('ended ' + clock(s.ended_at));
    else if (s.last_activity_at) parts.push('last activity ' + ago(s.last_activity_at));
    $('detail-meta').textContent = parts.join(' · ');
    const ended = s.status === 'COMPLETED';
    $('end').disabled = ended;
    $('feedback-form').hidden = ended;
    $('end-box').hidden = ended;
    if (ended) $('end-confirm').hidden = true;
    // A session waiting for an answer shows the Answer box (or the approval
    // buttons) right here, kept while it stays the same question.
    const box = $('detail-question');
    const q = !ended && s.open_question;
    if (!q) {
      box.replaceChildren();
      box.hidden = true;
      delete box.dataset.question;
    } else if (box.dataset.question !== q.id) {
      box.dataset.question = q.id;
      box.replaceChildren(el('h3', '', q.kind === 'approval' ? 'Waiting for your decision' : 'Waiting for your answer'), ...answerControls(s, q, 'detail'));
      box.hidden = false;
    }
  }

  function addToTimeline(m) {
    const last = state.timeline[state.timeline.length - 1];
    if (last && m.seq <= last.seq) return; // already shown
    state.timeline.push(m);
    const steps = state.timeline.filter((x) => x.sender_type === 'AGENT' && !x.requires_user_input && x.kind !== 'approval').length;
    let kind;
    let label;
    if (m.sender_type === 'USER') {
      kind = 'user';
      label = 'You';
    } else if (m.kind === 'approval') {
      kind = 'question approval';
      label = 'Approval: ' + (m.tool_name || '');
    } else if (m.requires_user_input) {
      kind = 'question';
      label = 'Question';
    } else {
      kind = 'step';
      label = 'Step ' + steps;
    }
    const follow = lastEntryVisible();
    const li = el('li', 'entry ' + kind);
    li.dataset.seq = String(m.seq);
    li.dataset.id = m.id;
    const head = el('div', 'row');
    head.append(el('span', 'kind', label), el('span', 'meta', clock(m.created_at)));
    li.append(head, el('p', 'text', m.content));
    if (m.kind === 'approval' && m.decision) {
      markDecision(li, m.decision, m.decided_by_rule ? 'by the session rule ' + m.decided_by_rule : m.decision_message);
    } else if (m.kind === 'approval' && !m.requires_user_input && m.decision_message) {
      li.append(el('p', 'decision', m.decision_message)); // closed without a decision (Claude Code's terminal)
    }
    $('timeline').append(li);
    // Follow new entries only when the person is at the end already: never
    // pull the page away from what they are reading.
    if (follow) li.scrollIntoView({ block: 'nearest' });
  }

  // lastEntryVisible reports whether the newest timeline entry is on screen
  // (true when there is none).
  function lastEntryVisible() {
    const last = $('timeline').lastElementChild;
    if (!last) return true;
    const detail = $('detail');
    const scrolls = detail.scrollHeight > detail.clientHeight && getComputedStyle(detail).overflowY === 'auto';
    const bottom = scrolls ? detail.getBoundingClientRect().bottom : window.innerHeight;
    return last.getBoundingClientRect().top < bottom;
  }

  function openSession(id) {
    state.openId = id;
    document.body.classList.add('viewing');
    $('feedback-state').textContent = '';
    $('end-state').textContent = '';
    $('end-confirm').hidden = true;
    $('diff-box').hidden = true;
    render();
    loadTimeline(true);
    window.scrollTo(0, 0);
  }

  function closeSession() {
    state.gen++;
    state.openId = null;
    state.timeline = [];
    $('timeline').replaceChildren();
    document.body.classList.remove('viewing');
    render();
  }

  // ---- deep links ----

  // followLink opens what the address names: #/questions/ID (the link a
  // notification carries) or #/sessions/ID. A question that is no longer
  // open is looked up among the loaded sessions' timelines no further: the
  // inbox simply shows.
  function followLink() {
    const m = /^#\/(questions|sessions)\/([0-9a-fA-F-]{32,36})$/.exec(location.hash);
    if (!m || !state.key) return;
    let sessionId = null;
    if (m[1] === 'sessions') {
      sessionId = m[2];
    } else {
      for (const s of state.sessions.values()) {
        if (s.open_question && s.open_question.id === m[2]) sessionId = s.id;
      }
    }
    if (!sessionId) return;
    history.replaceState(null, '', location.pathname + location.search);
    openSession(sessionId);
    if (m[1] === 'questions') {
      const card = Array.from($('questions').children).find((c) => c.dataset.question === m[2]);
      if (card) {
        card.scrollIntoView({ block: 'center' });
        const box = card.querySelector('textarea');
        if (box) box.focus();
      }
    }
  }

  // ---- notification channels ----

  const EVENT_LABELS = {
    'question.asked': 'questions', 'message.flagged': 'flagged messages', 'session.ended': 'ended sessions',
    'agent.waiting': 'Claude Code waiting', 'agent.idle': 'Claude Code finished its turn',
  };

  // ---- presence (issue 15) ----

  // loadPresence shows the Away switch as the server has it: while it is
  // on, Claude Code's permission prompts wait for a decision from here or
  // the phone; off, they are only recorded.
  async function loadPresence() {
    try {
      const p = await api('GET', '/api/v1/presence');
      $('away').checked = p.away === true;
      $('away-box').hidden = false;
    } catch (e) {
      $('away-box').hidden = true;
    }
  }

  async function setPresence() {
    const want = $('away').checked;
    $('away').disabled = true;
    try {
      const p = await api('PUT', '/api/v1/presence', { away: want });
      $('away').checked = p.away === true;
    } catch (e) {
      $('away').checked = !want;
    } finally {
      $('away').disabled = false;
    }
  }

  async function loadChannels() {
    try {
      const data = await api('GET', '/api/v1/notification-channels');
      renderChannels(data.channels);
      $('channel-error').textContent = '';
    } catch (e) {
      $('channel-error').textContent = 'Could not load the channels: ' + e.message;
    }
  }

  function channelStatus(c) {
    if (c.last_error) {
      return el('span', 'failed', 'last error: ' + c.last_error + (c.failures > 1 ? ' (' + c.failures + ' failures in a row)' : ''));
    }
    if (c.last_delivery_at) return el('span', 'ok', 'last delivered ' + ago(c.last_delivery_at));
    return el('span', 'meta', 'nothing sent yet');
  }

  function renderChannels(channels) {
    const items = channels.map((c) => {
      const li = el('li', 'channel');
      li.dataset.channel = c.id;
      const head = el('div', 'row');
      head.append(el('strong', '', c.kind === 'ntfy' ? 'ntfy' : 'Webhook'), el('span', 'url', c.url));
      const events = el('p', 'meta', 'Sends ' + c.events.map((e) => EVENT_LABELS[e] || e).join(', '));
      const status = el('p', 'status-line');
      status.append(channelStatus(c));
      const actions = el('div', 'actions');
      const test = el('button', 'quiet', 'Send a test');
      test.type = 'button';
      const remove = el('button', 'danger', 'Remove');
      remove.type = 'button';
      const note = el('span', 'meta test-result');
      note.setAttribute('role', 'status');
      actions.append(test, remove, note);
      test.addEventListener('click', async () => {
        test.disabled = true;
        note.textContent = 'Sending…';
        try {
          const r = await api('POST', '/api/v1/notification-channels/' + encodeURIComponent(c.id) + '/test');
          note.textContent = r.delivered ? 'Delivered (HTTP ' + r.status + ')' : 'Not delivered: ' + (r.error || 'HTTP ' + r.status);
          const fresh = await api('GET', '/api/v1/notification-channels');
          const now = fresh.channels.find((x) => x.id === c.id);
          if (now) status.replaceChildren(channelStatus(now));
        } catch (e) {
          note.textContent = 'Test failed: ' + e.message;
        } finally {
          test.disabled = false;
        }
      });
      remove.addEventListener('click', async () => {
        remove.disabled = true;
        try {
          await api('DELETE', '/api/v1/notification-channels/' + encodeURIComponent(c.id));
          loadChannels();
        } catch (e) {
          note.textContent = 'Not removed: ' + e.message;
          remove.disabled = false;
        }
      });
      li.append(head, events, status, actions);
      return li;
    });
    $('channel-list').replaceChildren(...items);
    $('no-channels').hidden = items.length > 0;
  }

  function channelKind() {
    const r = document.querySelector('input[name="channel-kind"]:checked');
    return r ? r.value : 'ntfy';
  }

  function updateChannelForm() {
    const ntfy = channelKind() === 'ntfy';
    $('channel-token-box').hidden = !ntfy;
    $('channel-url').placeholder = ntfy ? 'https://ntfy.example.com/my-secret-topic' : 'https://example.com/agentline-hook';
  }

  // ---- keys ----

  // loadKeys shows the user's keys (GET /api/v1/keys) with a Revoke button
  // on each active one. The list never holds a key, only names and times.
  async function loadKeys() {
    if (!state.key) return;
    try {
      const data = await api('GET', '/api/v1/keys');
      $('keys').replaceChildren(...data.keys.map(keyItem));
      $('keys-error').textContent = '';
    } catch (e) {
      $('keys-error').textContent = 'Could not load the keys: ' + e.message;
    }
  }

  function keyItem(k) {
    const li = el('li', 'key' + (k.active ? '' : ' revoked'));
    li.dataset.key = k.id;
    const top = el('div', 'row');
    top.append(el('span', 'agent', k.name || shortId(k.id)), el('span', 'status', k.scope));
    if (k.current) top.append(el('span', 'meta', 'this browser'));
    const parts = ['created ' + clock(k.created_at), k.last_used_at ? 'last used ' + ago(k.last_used_at) : 'never used'];
    if (k.expires_at) parts.push('expires ' + clock(k.expires_at));
    if (k.revoked_at) parts.push('revoked ' + clock(k.revoked_at));
    else if (!k.active) parts.push('revoked');
    li.append(top, el('p', 'meta', parts.join(' · ')));
    if (k.active) {
      const actions = el('div', 'actions');
      const b = el('button', 'danger', 'Revoke');
      b.type = 'button';
      const note = el('span', 'meta');
      note.setAttribute('role', 'status');
      b.addEventListener('click', async () => {
        const what = k.current ? 'This is the key this browser signed in with: you will be signed out. Revoke it?' : 'Revoke key "' + (k.name || shortId(k.id)) + '"? Whatever uses it is refused from now on.';
        if (!window.confirm(what)) return;
        b.disabled = true;
        note.textContent = 'Revoking…';
        try {
          await api('DELETE', '/api/v1/keys/' + encodeURIComponent(k.id));
          if (k.current) {
            signOut('You revoked the key this browser used.');
            return;
          }
          loadKeys();
        } catch (err) {
          note.textContent = 'Not revoked: ' + err.message;
          b.disabled = false;
        }
      });
      actions.append(b, note);
      li.append(actions);
    }
    return li;
  }

  // ---- wiring ----

  function init() {
    $('signin-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const key = $('key').value.trim();
      if (!key) {
        $('signin-error').textContent = 'Paste your person key first.';
        return;
      }
      $('signin-error').textContent = 'Checking…';
      $('signin-error').textContent = await signIn(key);
    });
    $('signout').addEventListener('click', () => signOut(''));
    $('away').addEventListener('change', setPresence);
    // Ctrl+Enter (Cmd+Enter on a Mac) in an Answer or Feedback box sends it.
    document.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && e.target instanceof HTMLTextAreaElement && e.target.form) {
        e.preventDefault();
        e.target.form.requestSubmit();
      }
    });
    $('notify').addEventListener('click', async () => {
      try {
        await Notification.requestPermission();
      } finally {
        updateNotifyButton();
      }
    });
    $('more').addEventListener('click', () => loadOlder().catch(() => {}));
    $('keys-box').addEventListener('toggle', () => {
      if ($('keys-box').open) loadKeys();
    });
    $('channels-toggle').addEventListener('click', () => {
      const open = $('channels').hidden;
      $('channels').hidden = !open;
      $('channels-toggle').setAttribute('aria-expanded', String(open));
      if (open) loadChannels();
    });
    for (const r of document.querySelectorAll('input[name="channel-kind"]')) r.addEventListener('change', updateChannelForm);
    $('channel-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const kind = channelKind();
      const url = $('channel-url').value.trim();
      const events = Array.from(document.querySelectorAll('input[name="channel-event"]:checked')).map((x) => x.value);
      $('channel-error').textContent = '';
      $('channel-secret-box').hidden = true;
      $('channel-secret').textContent = '';
      if (!url) {
        $('channel-error').textContent = 'Give the URL first.';
        return;
      }
      if (!events.length) {
        $('channel-error').textContent = 'Pick at least one thing to send.';
        return;
      }
      const body = { kind, url, events };
      const token = $('channel-token').value.trim();
      if (kind === 'ntfy' && token) body.token = token;
      $('channel-state').textContent = 'Adding…';
      try {
        const c = await api('POST', '/api/v1/notification-channels', body);
        $('channel-url').value = '';
        $('channel-token').value = '';
        $('channel-state').textContent = 'Added.';
        if (c.secret) {
          $('channel-secret').textContent = c.secret;
          $('channel-secret-box').hidden = false;
        }
        loadChannels();
      } catch (err) {
        $('channel-state').textContent = '';
        $('channel-error').textContent = 'Not added: ' + err.message;
      }
    });
    window.addEventListener('hashchange', followLink);
    $('back').addEventListener('click', closeSession);
    $('feedback-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const id = state.openId;
      const box = $('feedback');
      const content = box.value;
      if (!id) return;
      if (!content.trim()) {
        $('feedback-state').textContent = 'Write something first.';
        return;
      }
      const button = e.submitter || $('feedback-form').querySelector('button');
      button.disabled = true;
      $('feedback-state').textContent = 'Sending…';
      try {
        // mark_as_read false: queued for the agent's next step.
        await api('POST', '/api/v1/messages/user', { agent_instance_id: id, content, mark_as_read: false });
        box.value = '';
        $('feedback-state').textContent = 'Sent: the agent gets it with its next step.';
        loadTimeline(false);
      } catch (err) {
        $('feedback-state').textContent = 'Not sent: ' + err.message;
      } finally {
        button.disabled = false;
      }
    });
    $('end').addEventListener('click', () => {
      if (!state.openId) return;
      $('end-confirm').hidden = false;
      $('end-state').textContent = '';
    });
    $('end-cancel').addEventListener('click', () => {
      $('end-confirm').hidden = true;
    });
    $('end-yes').addEventListener('click', async () => {
      const id = state.openId;
      if (!id) return;
      $('end-confirm').hidden = true;
      $('end').disabled = true;
      $('end-state').textContent = 'Ending…';
      try {
        await api('POST', '/api/v1/sessions/end', { agent_instance_id: id });
        const s = state.sessions.get(id);
        if (s) {
          s.status = 'COMPLETED';
          s.open_question = null;
        }
        $('end-state').textContent = 'Session ended.';
        render();
      } catch (err) {
        $('end-state').textContent = 'Not ended: ' + err.message;
        $('end').disabled = false;
      }
    });
    // Relative times age; redraw them now and then (cards keep their input).
    setInterval(() => {
      if (state.key) render();
    }, 30000);

    let saved = null;
    try {
      saved = localStorage.getItem(KEY_STORAGE);
    } catch (e) {
      saved = null;
    }
    if (saved) {
      state.key = saved;
      showInbox();
    }
  }

  init();
})();
