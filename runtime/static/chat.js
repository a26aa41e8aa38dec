// runwatch chat page: plain JavaScript, no framework, no build step, no network beyond this server.
//
// It speaks the /ws protocol (docs/protocol.md): `connect` first, then `chat` → `run_accepted` and
// the run's events; a cumulative `ack` per run shortly after each event (acks measure delivery
// latency); `resume` of every unfinished run after a reconnect; `cancel`; `ping` every
// `heartbeat_s`. Events are de-duplicated by (run_id, seq) and rendered strictly in seq order.
//
// Safety: everything the user or an agent typed is inserted with textContent, never innerHTML;
// answers are Markdown rendered by markdown.js, which builds DOM nodes and never parses HTML.
//
// Threads: the sidebar lists the user's threads from GET /api/me/threads (the audit store), and
// opening one replays its runs over /ws with `resume` from seq 0. The agent menu offers only the
// agents GET /api/me/agents says can run here.
//
// Test hooks: window.runwatchChat = { socket(), dropSocket(offlineMs?), stats() }.
"use strict";

(function () {
  const CLIENT_NAME = "runwatch-web/0.1";
  const ACK_DELAY_MS = 20; // batch acks a little, but well inside the ~50 ms budget
  const BACKOFF_MIN_MS = 250;
  const BACKOFF_MAX_MS = 5000;
  const TOO_MANY_CONNECTIONS_RETRY_MS = 20000; // 4429: retry slowly
  const GAP_RESUME_MS = 2000; // a hole in seq still open this long after a replay: ask again
  const REMEMBERED_RUNS = 30; // runs of the current thread restored after a page reload
  const USER_ID = /^[A-Za-z0-9_.@:+-]{1,128}$/;
  const USER_RULE = "use 1 to 128 letters, digits or _ . @ : + - (no spaces)";
  const THREADS_PAGE = 30;
  const PROMPT_CLAMP_PX = 190; // a longer message is folded, with "Show all"

  const $ = (id) => document.getElementById(id);
  const ui = {
    user: $("user"),
    userField: $("user-field"),
    userError: $("user-error"),
    agent: $("agent"),
    newChat: $("new-chat"),
    threads: $("threads"),
    toggleThreads: $("toggle-threads"),
    threadList: $("thread-list"),
    threadsEmpty: $("threads-empty"),
    moreThreads: $("more-threads"),
    stop: $("stop"),
    status: $("conn-status"),
    tokenBox: $("token-box"),
    tokenReason: $("token-reason"),
    token: $("token"),
    useToken: $("use-token"),
    notice: $("notice"),
    runs: $("runs"),
    hint: $("hint"),
    composer: $("composer"),
    message: $("message"),
  };

  // localStorage can throw (disabled storage, private modes): the page works without it.
  const storage = {
    get(key) {
      try { return window.localStorage.getItem(key); } catch (e) { return null; }
    },
    set(key, value) {
      try { window.localStorage.setItem(key, value); } catch (e) { /* not remembered */ }
    },
    remove(key) {
      try { window.localStorage.removeItem(key); } catch (e) { /* nothing to forget */ }
    },
  };

  const state = {
    user: "dev",
    socket: null, // the current WebSocket, or null while disconnected
    ready: false, // `connected` received on the current socket
    everConnected: false,
    attempt: 0, // bumps on every connect(); a stale async step sees it changed and stops
    manualToken: null, // pasted by the user when /dev/token is 404
    token: null, // the token of the current connection, for /api/me
    threadsCursor: null,
    threadsTimer: null,
    waitingForToken: false,
    backoff: BACKOFF_MIN_MS,
    retryTimer: null,
    heartbeat: null,
    lastFrameAt: 0,
    offlineUntil: 0, // dropSocket(offlineMs): stay offline until then
    threadId: null,
    generation: 0, // bumps on "New chat"; a late run_accepted of an older chat keeps its thread
    runs: new Map(), // run_id -> run (see newRun)
    pending: new Map(), // client_msg_id -> {frame, view, generation, refused}
    cancels: new Set(), // run ids whose cancel is not known to have reached a server
    stats: { connects: 0, replayed: 0, duplicates: 0, events: 0, gapResumes: 0 },
  };

  // ---- small helpers ----------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text); // data: never HTML
    return node;
  }

  function randomId() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function shorten(text, max) {
    const s = String(text);
    return s.length > max ? s.slice(0, max - 1) + "…" : s;
  }

  function compactJson(value) {
    if (value === undefined) return "";
    if (typeof value === "string") return value;
    try { return JSON.stringify(value); } catch (e) { return String(value); }
  }

  function formatMs(ms) {
    const n = Number(ms);
    if (!Number.isFinite(n)) return "";
    if (n < 1000) return Math.round(n) + " ms";
    if (n < 60000) return (n / 1000).toFixed(1) + " s";
    return Math.floor(n / 60000) + " min " + Math.round((n % 60000) / 1000) + " s";
  }

  function setStatus(name, text) {
    ui.status.dataset.state = name;
    ui.status.textContent = text;
  }

  function showNotice(text) {
    ui.notice.textContent = text || "";
    ui.notice.hidden = !text;
  }

  function nearBottom() {
    const doc = document.documentElement;
    return window.innerHeight + window.scrollY >= doc.scrollHeight - 120;
  }

  function scrollToBottom() {
    window.scrollTo(0, document.documentElement.scrollHeight);
  }

  function updateHint() {
    ui.hint.hidden = ui.runs.querySelector("article.run") !== null;
  }

  // ---- the thread, remembered per user ----------------------------------------------------------

  function threadKey() {
    return "runwatch.thread." + state.user;
  }

  function loadThread() {
    try {
      const saved = JSON.parse(storage.get(threadKey()) || "null");
      if (saved && typeof saved.thread_id === "string") {
        const runs = Array.isArray(saved.runs) ? saved.runs.filter((r) => typeof r === "string") : [];
        return { threadId: saved.thread_id, runs };
      }
    } catch (e) { /* a corrupt entry starts a new thread */ }
    return { threadId: null, runs: [] };
  }

  function saveThread() {
    if (!state.threadId) { storage.remove(threadKey()); return; }
    const runs = [];
    for (const run of state.runs.values()) {
      if (run.threadId === state.threadId) runs.push(run.id);
    }
    storage.set(threadKey(), JSON.stringify({ thread_id: state.threadId, runs: runs.slice(-REMEMBERED_RUNS) }));
  }

  // ---- run cards --------------------------------------------------------------------------------

  // A card's DOM. It exists before its run does: a chat shows at once, its run_id comes later.
  function newView(promptText) {
    const card = el("article", "run");
    card.dataset.status = "pending";
    const head = el("header", "run-head");
    const prompt = el("p", "prompt", promptText === null ? "…" : promptText);
    const more = el("button", "show-more", "Show all");
    more.type = "button";
    more.hidden = true;
    more.addEventListener("click", () => {
      const open = prompt.classList.toggle("expanded");
      more.textContent = open ? "Show less" : "Show all";
      more.setAttribute("aria-expanded", String(open));
    });
    const meta = el("span", "run-meta");
    const badge = el("span", "badge", promptText === null ? "loading…" : "sending…");
    const cancel = el("button", "cancel");
    cancel.type = "button";
    cancel.hidden = true;
    const icon = el("span", "stop-icon");
    icon.setAttribute("aria-hidden", "true");
    cancel.append(icon, " Stop");
    const status = el("div", "run-status");
    status.append(meta, badge, cancel);
    head.append(prompt, more, status);
    const timeline = el("ol", "timeline");
    timeline.setAttribute("aria-live", "polite");
    timeline.setAttribute("aria-label", "Run steps");
    const answer = el("div", "final-report");
    answer.hidden = true;
    answer.setAttribute("aria-live", "polite");
    const error = el("div", "error-box");
    error.setAttribute("role", "alert");
    error.hidden = true;
    card.append(head, timeline, answer, error);
    const view = { card, prompt, more, meta, badge, cancel, timeline, answer, error, promptKnown: promptText !== null };
    if (promptText !== null) requestAnimationFrame(() => foldPrompt(view));
    return view;
  }

  // A long message is shown folded, as text, with a toggle: never as a wall of bold.
  function foldPrompt(view) {
    const long = view.prompt.scrollHeight > PROMPT_CLAMP_PX + 20;
    view.prompt.classList.toggle("folded", long);
    view.more.hidden = !long;
  }

  function setPrompt(view, text) {
    view.prompt.textContent = text;
    view.promptKnown = true;
    requestAnimationFrame(() => foldPrompt(view));
  }

  function newRun(runId, view) {
    const run = {
      id: runId,
      view,
      threadId: null,
      lastSeq: 0, // highest seq rendered; everything up to it is rendered exactly once
      acked: 0,
      buffer: new Map(), // seq -> event received ahead of a gap
      tools: new Map(), // tool_call_id -> row
      done: false,
      restored: false,
      ackTimer: null,
      gapTimer: null,
      text: "", // the answer so far (text_delta chunks, then final_report)
      streaming: false,
      paintQueued: false,
    };
    view.card.dataset.runId = runId;
    view.card.dataset.status = "running";
    view.badge.textContent = "running";
    view.cancel.hidden = false;
    view.cancel.disabled = false;
    view.cancel.setAttribute("aria-label", "Stop this run");
    view.cancel.title = "Stop this run";
    view.cancel.onclick = () => requestCancel(run);
    state.runs.set(runId, run);
    updateStop();
    return run;
  }

  // The run for an event or a listed run we have no card for yet (another tab, a reload).
  function ensureRun(runId) {
    let run = state.runs.get(runId);
    if (!run) {
      const view = newView(null);
      ui.runs.append(view.card);
      updateHint();
      run = newRun(runId, view);
    }
    return run;
  }

  function setThread(run, threadId) {
    run.threadId = threadId;
    run.view.card.dataset.threadId = threadId;
  }

  function finish(run, status, badgeText) {
    run.done = true;
    run.view.card.dataset.status = status;
    run.view.badge.textContent = badgeText;
    run.view.cancel.hidden = true;
    state.cancels.delete(run.id);
    clearTimeout(run.gapTimer);
    run.gapTimer = null;
    run.buffer.clear();
    run.streaming = false;
    paintAnswer(run);
    updateStop();
    refreshThreadsSoon();
  }

  // The composer's Stop button: shown while a run on the page is running; stops them all.
  function runningOnPage() {
    const out = [];
    for (const run of state.runs.values()) {
      if (!run.done && run.view.card.isConnected) out.push(run);
    }
    return out;
  }

  function updateStop() {
    ui.stop.hidden = runningOnPage().length === 0;
  }

  function showRunError(view, text) {
    view.error.textContent = text;
    view.error.hidden = false;
  }

  // The answer as Markdown, repainted at most once a frame while it streams.
  function paintAnswer(run) {
    const box = run.view.answer;
    if (!run.text && !run.streaming) return;
    box.hidden = false;
    box.replaceChildren(window.runwatchMarkdown.render(run.text));
    if (run.streaming) {
      box.dataset.streaming = "true";
      const cursor = el("span", "cursor");
      cursor.setAttribute("aria-hidden", "true");
      let host = box;
      while (host.lastElementChild && /^(P|UL|OL|LI|BLOCKQUOTE|PRE|CODE|H[1-6]|DIV|TABLE|TBODY|TR|TD)$/.test(host.lastElementChild.tagName)) {
        host = host.lastElementChild;
      }
      host.append(cursor);
    } else {
      delete box.dataset.streaming;
    }
  }

  function queuePaint(run) {
    if (run.paintQueued) return;
    run.paintQueued = true;
    requestAnimationFrame(() => {
      run.paintQueued = false;
      paintAnswer(run);
    });
  }

  function markToolStopped(li) {
    li.dataset.status = "cancelled";
    const label = li.querySelector(".tool-state");
    if (label) label.textContent = "stopped";
  }

  function render(run, ev) {
    const d = ev.data && typeof ev.data === "object" ? ev.data : {};
    const view = run.view;
    if (ev.thread_id && !run.threadId) setThread(run, ev.thread_id);
    if (ev.agent) view.meta.textContent = ev.agent;
    switch (ev.type) {
      case "agent_started":
        if (!view.promptKnown && typeof d.input === "string") setPrompt(view, d.input);
        break;
      case "agent_thinking": {
        const li = el("li", "thinking", d.text);
        li.dataset.step = d.step;
        li.title = ev.ts || "";
        view.timeline.append(li);
        break;
      }
      case "tool_executing": {
        const li = el("li", "tool");
        li.dataset.toolCallId = d.tool_call_id;
        li.dataset.status = "running";
        li.title = ev.ts || "";
        const icon = el("span", "tool-icon");
        icon.setAttribute("aria-hidden", "true");
        li.append(
          icon,
          el("code", "tool-name", d.tool),
          el("span", "tool-args", shorten(compactJson(d.args || {}), 80)),
          el("span", "tool-state", "running…"),
        );
        run.tools.set(d.tool_call_id, li);
        view.timeline.append(li);
        break;
      }
      case "tool_completed": {
        let li = run.tools.get(d.tool_call_id);
        if (!li) { // I4 says this cannot happen; show it anyway rather than drop it
          li = el("li", "tool");
          li.dataset.toolCallId = d.tool_call_id;
          li.append(el("span", "tool-icon"), el("code", "tool-name", d.tool), el("span", "tool-state"));
          view.timeline.append(li);
        }
        const ok = d.status === "ok";
        const when = formatMs(d.duration_ms);
        if (!ok && d.error === "cancelled") {
          // The run was stopped while the tool ran: not a failure of the tool.
          markToolStopped(li);
          if (when) li.querySelector(".tool-state").textContent = "stopped after " + when;
          break;
        }
        li.dataset.status = ok ? "ok" : "error";
        li.querySelector(".tool-state").textContent = ok ? "done" + (when ? " in " + when : "") : "failed" + (when ? " after " + when : "");
        const detail = ok ? compactJson(d.result) : (d.error || "error");
        if (detail) li.append(el("span", ok ? "tool-result" : "tool-error", shorten(detail, 160)));
        break;
      }
      case "text_delta":
        run.text += typeof d.text === "string" ? d.text : "";
        run.streaming = true;
        queuePaint(run);
        break;
      case "final_report":
        run.text = typeof d.text === "string" ? d.text : compactJson(d.text);
        run.streaming = false;
        paintAnswer(run);
        break;
      case "agent_completed":
        finish(run, "completed", "done" + (formatMs(d.duration_ms) ? " · " + formatMs(d.duration_ms) : ""));
        break;
      case "agent_error": {
        if (d.code === "cancelled") {
          // Stopped on purpose (here or in another tab): a plain note, not an error.
          finish(run, "cancelled", "stopped");
          for (const li of run.tools.values()) {
            if (li.dataset.status === "running") markToolStopped(li);
          }
          view.error.classList.add("stopped-note");
          view.error.removeAttribute("role");
          showRunError(view, "Stopped. " + (run.text ? "The answer above is incomplete." : "No answer was given."));
          break;
        }
        finish(run, "error", "error");
        showRunError(view, "Error " + d.code + ": " + (d.message || "") +
          (d.retryable ? " (you can try again)" : ""));
        if (d.retryable && view.promptKnown) {
          const again = el("button", "retry", "Ask again");
          again.type = "button";
          again.addEventListener("click", () => { again.disabled = true; sendChat(view.prompt.textContent); });
          view.error.append(" ", again);
        }
        break;
      }
      default:
        break; // an event type this page does not know: counted and acked, not shown
    }
  }

  function onEvent(ev) {
    state.stats.events += 1;
    const run = ensureRun(ev.run_id);
    if (ev.seq <= run.lastSeq || run.buffer.has(ev.seq)) {
      state.stats.duplicates += 1; // at-least-once delivery: (run_id, seq) seen already
      return;
    }
    run.buffer.set(ev.seq, ev);
    const stick = nearBottom();
    while (run.buffer.has(run.lastSeq + 1)) {
      const next = run.buffer.get(run.lastSeq + 1);
      run.buffer.delete(next.seq);
      run.lastSeq = next.seq;
      render(run, next);
      if (run.done) break;
    }
    watchGap(run);
    scheduleAck(run);
    if (stick) scrollToBottom();
  }

  // Events arrive in order per connection, so a hole means some were lost on the way (between
  // replicas): replay from the store at once instead of waiting, and again if it stays open.
  function watchGap(run) {
    if (run.done || run.buffer.size === 0) {
      clearTimeout(run.gapTimer);
      run.gapTimer = null;
      return;
    }
    if (run.gapTimer) return;
    state.stats.gapResumes += 1;
    send({ type: "resume", run_id: run.id, after_seq: run.lastSeq });
    run.gapTimer = setTimeout(() => {
      run.gapTimer = null;
      if (!run.done && run.buffer.size > 0) {
        send({ type: "resume", run_id: run.id, after_seq: run.lastSeq });
        watchGap(run);
      }
    }, GAP_RESUME_MS);
  }

  function scheduleAck(run) {
    if (run.ackTimer || run.lastSeq <= run.acked) return;
    run.ackTimer = setTimeout(() => {
      run.ackTimer = null;
      if (run.lastSeq > run.acked && send({ type: "ack", run_id: run.id, seq: run.lastSeq })) {
        run.acked = run.lastSeq;
      }
    }, ACK_DELAY_MS);
  }

  function requestCancel(run) {
    if (run.done) return;
    state.cancels.add(run.id);
    run.view.cancel.disabled = true;
    run.view.cancel.lastChild.textContent = " Stopping…";
    send({ type: "cancel", run_id: run.id }); // if offline, sent again after the reconnect
  }

  // ---- chats ------------------------------------------------------------------------------------

  function sendChat(text) {
    const frame = { type: "chat", text, client_msg_id: randomId(), agent: ui.agent.value || "demo" };
    if (state.threadId) frame.thread_id = state.threadId;
    const view = newView(text);
    const stick = nearBottom();
    ui.runs.append(view.card);
    updateHint();
    state.pending.set(frame.client_msg_id, { frame, view, generation: state.generation, refused: false });
    send(frame); // when offline it goes out after the reconnect, with the same client_msg_id
    if (stick) scrollToBottom();
  }

  function onAccepted(frame) {
    const pending = state.pending.get(frame.client_msg_id);
    state.pending.delete(frame.client_msg_id);
    if (pending && pending.generation === state.generation && frame.thread_id) {
      state.threadId = frame.thread_id; // later chats continue this thread
    }
    let run = state.runs.get(frame.run_id);
    if (run) {
      // Already shown (its events or `active_runs` came first): keep one card, where the chat was.
      if (pending) {
        if (pending.view.card.isConnected) pending.view.card.replaceWith(run.view.card);
        if (!run.view.promptKnown) setPrompt(run.view, pending.frame.text);
      }
    } else {
      const view = pending ? pending.view : newView(null);
      if (!view.card.isConnected && !pending) ui.runs.append(view.card);
      run = newRun(frame.run_id, view);
    }
    if (frame.thread_id) setThread(run, frame.thread_id);
    saveThread();
    markCurrentThread();
    refreshThreadsSoon();
  }

  function showRefused(pending, frame) {
    pending.refused = true;
    const view = pending.view;
    view.card.dataset.status = "error";
    view.badge.textContent = "not sent";
    view.error.replaceChildren();
    showRunError(view, frame.code + ": " + (frame.message || ""));
    const retry = el("button", "retry", "Retry");
    retry.type = "button";
    retry.addEventListener("click", () => {
      // A refused chat does not use up its client_msg_id: retry with the same one.
      pending.refused = false;
      view.card.dataset.status = "pending";
      view.badge.textContent = "sending…";
      view.error.hidden = true;
      send(pending.frame);
    });
    view.error.append(" ", retry);
  }

  function onError(frame) {
    const ref = typeof frame.ref === "string" ? frame.ref : null;
    const pending = ref && state.pending.get(ref);
    if (pending) {
      if (frame.code === "not_found" && pending.frame.thread_id) {
        // The thread is gone or belongs to someone else: start a new one and send again.
        state.pending.delete(ref);
        if (state.threadId === pending.frame.thread_id) {
          state.threadId = null;
          saveThread();
        }
        const frameAgain = Object.assign({}, pending.frame, { client_msg_id: randomId() });
        delete frameAgain.thread_id;
        pending.frame = frameAgain;
        state.pending.set(frameAgain.client_msg_id, pending);
        send(frameAgain);
        return;
      }
      showRefused(pending, frame);
      return;
    }
    const run = ref && state.runs.get(ref);
    if (run) {
      if (frame.code === "not_found") {
        if (run.restored && run.lastSeq === 0) {
          // A remembered run that retention has purged: forget it quietly.
          run.view.card.remove();
          state.runs.delete(run.id);
          saveThread();
          updateHint();
        } else if (!run.done) {
          finish(run, "error", "error");
          showRunError(run.view, "not_found: " + (frame.message || "no such run"));
        }
      }
      return;
    }
    showNotice("Server says " + frame.code + ": " + (frame.message || ""));
  }

  // ---- the socket -------------------------------------------------------------------------------

  function send(frame) {
    const ws = state.socket;
    if (ws && state.ready && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  class TokenError extends Error {
    constructor(kind, message) {
      super(message);
      this.kind = kind;
    }
  }

  async function getToken() {
    if (state.manualToken) return state.manualToken;
    return fetchDevToken();
  }

  async function fetchDevToken() {
    let response;
    try {
      response = await fetch("/dev/token", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ user: state.user }),
        cache: "no-store",
      });
    } catch (e) {
      throw new TokenError("network", "server unreachable");
    }
    if (response.status === 404) throw new TokenError("no-dev-mode", "not in dev mode");
    if (response.status === 400) throw new TokenError("bad-user", "invalid user name");
    if (!response.ok) throw new TokenError("network", "token request failed: " + response.status);
    const body = await response.json();
    if (!body || typeof body.token !== "string") throw new TokenError("network", "bad token response");
    return body.token;
  }

  function askForToken(message) {
    state.waitingForToken = true;
    ui.userField.hidden = true; // outside dev mode the token, not this field, names the user
    ui.tokenReason.textContent = message;
    ui.tokenBox.hidden = false;
    setStatus("offline", "token needed");
    ui.token.focus();
  }

  async function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    if (state.waitingForToken) return;
    const attempt = ++state.attempt;
    setStatus(state.everConnected ? "reconnecting" : "connecting",
      state.everConnected ? "reconnecting…" : "connecting…");
    let token;
    try {
      token = await getToken();
    } catch (e) {
      if (attempt !== state.attempt) return;
      if (e.kind === "no-dev-mode") {
        askForToken("This server is not in dev mode.");
      } else if (e.kind === "bad-user") {
        showUserError("“" + state.user + "” is not a valid user name: " + USER_RULE + ".");
        setStatus("offline", "invalid user name");
      } else {
        scheduleReconnect();
      }
      return;
    }
    if (attempt !== state.attempt) return; // superseded while the token was on its way
    state.token = token;

    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      ws = new WebSocket(scheme + "//" + window.location.host + "/ws");
    } catch (e) {
      scheduleReconnect();
      return;
    }
    state.socket = ws;
    state.ready = false;
    ws.onopen = () => {
      // The first frame, always: the server refuses anything before it (4401).
      ws.send(JSON.stringify({ type: "connect", token, client: CLIENT_NAME }));
    };
    ws.onmessage = (message) => {
      if (state.socket !== ws) return;
      state.lastFrameAt = Date.now();
      let frame;
      try { frame = JSON.parse(message.data); } catch (e) { return; }
      if (frame && typeof frame === "object") onFrame(frame);
    };
    ws.onclose = (e) => {
      if (state.socket === ws) socketLost(e.code);
    };
  }

  function onFrame(frame) {
    switch (frame.type) {
      case "connected": onConnected(frame); break;
      case "run_accepted": onAccepted(frame); break;
      case "resumed": state.stats.replayed += Number(frame.replayed) || 0; break;
      case "error": onError(frame); break;
      case "pong": break;
      default:
        if (typeof frame.run_id === "string" && Number.isInteger(frame.seq)) onEvent(frame);
    }
  }

  function onConnected(frame) {
    state.ready = true;
    state.everConnected = true;
    state.backoff = BACKOFF_MIN_MS;
    state.stats.connects += 1;
    if (state.manualToken && frame.user_id !== state.user && typeof frame.user_id === "string") {
      // A pasted token names its user: show that user's remembered thread, not the last one's.
      if (state.pending.size === 0) startAsUser(frame.user_id);
      else state.user = frame.user_id;
    }
    showUserError("");
    showNotice("");
    setStatus("connected", "connected as " + frame.user_id);
    // One identity in the header: with a pasted token the user is the token's, not editable.
    ui.userField.hidden = Boolean(state.manualToken);
    if (!state.manualToken) ui.user.value = frame.user_id;
    loadAgents();
    loadThreads(false);

    clearInterval(state.heartbeat);
    const every = Math.max(1, Number(frame.heartbeat_s) || 20) * 1000;
    state.heartbeat = setInterval(() => {
      if (Date.now() - state.lastFrameAt > 2 * every + 5000) {
        dropSocket(0); // nothing heard, not even a pong: the connection is dead
      } else {
        send({ type: "ping" });
      }
    }, every);

    // 1. Every run we know that has not ended: replay from the last seq we rendered.
    for (const run of state.runs.values()) {
      if (!run.done) send({ type: "resume", run_id: run.id, after_seq: run.lastSeq });
    }
    // 2. Runs the server lists that we do not know (a reload, a run_accepted lost in a drop).
    const active = Array.isArray(frame.active_runs) ? frame.active_runs.slice().reverse() : [];
    for (const item of active) { // oldest first, so cards keep their order
      if (!item || typeof item.run_id !== "string") continue;
      const known = state.runs.get(item.run_id);
      if (!known) {
        const run = ensureRun(item.run_id);
        send({ type: "resume", run_id: run.id, after_seq: 0 });
      } else if (known.done && known.lastSeq > 0) {
        send({ type: "ack", run_id: known.id, seq: known.lastSeq }); // our last ack was lost
        known.acked = known.lastSeq;
      }
    }
    // 3. Chats never accepted: the same client_msg_id, so the server never starts one twice.
    for (const pending of state.pending.values()) {
      if (!pending.refused) send(pending.frame);
    }
    // 4. Cancels clicked while offline.
    for (const runId of state.cancels) {
      const run = state.runs.get(runId);
      if (run && !run.done) send({ type: "cancel", run_id: runId });
    }
  }

  function socketLost(code) {
    state.socket = null;
    state.ready = false;
    clearInterval(state.heartbeat);
    state.heartbeat = null;
    if (code === 4401 && state.manualToken) {
      state.manualToken = null;
      askForToken("The token was refused or has expired.");
      return;
    }
    // 4401 in dev mode: the next attempt fetches a fresh token.
    if (code === 4429) {
      const delay = TOO_MANY_CONNECTIONS_RETRY_MS * (0.75 + Math.random() / 2);
      setStatus("reconnecting", "too many connections: retrying in " + Math.round(delay / 1000) + " s");
      showNotice("Too many open connections for this user (close other tabs). Retrying slowly.");
      scheduleReconnect(delay, true);
      return;
    }
    scheduleReconnect();
  }

  function scheduleReconnect(fixedDelay, keepStatus) {
    clearTimeout(state.retryTimer);
    if (!keepStatus) setStatus("reconnecting", "reconnecting…");
    // Exponential backoff with jitter, capped, so a restarting server is not stampeded.
    let delay = fixedDelay !== undefined ? fixedDelay : state.backoff * (0.5 + Math.random() / 2);
    if (fixedDelay === undefined) state.backoff = Math.min(state.backoff * 2, BACKOFF_MAX_MS);
    delay = Math.max(delay, state.offlineUntil - Date.now());
    state.retryTimer = setTimeout(connect, delay);
  }

  // Close the socket as a network drop would: no goodbye expected, reconnect and resume.
  function dropSocket(offlineMs) {
    const ws = state.socket;
    state.offlineUntil = Date.now() + (Number(offlineMs) || 0);
    if (!ws) return;
    state.socket = null; // its late frames and close event are ignored from now on
    try { ws.close(4000, "connection dropped"); } catch (e) { /* already closed */ }
    socketLost(1006);
  }

  // A fresh start: new user, or a pasted token.
  function reconnectNow() {
    const ws = state.socket;
    state.socket = null;
    state.ready = false;
    clearInterval(state.heartbeat);
    if (ws) {
      try { ws.close(1000, "reconnecting"); } catch (e) { /* already closed */ }
    }
    state.backoff = BACKOFF_MIN_MS;
    state.offlineUntil = 0;
    connect();
  }

  // ---- the API: agents and threads (GET /api/me/..., with the connection's token) --------------

  async function api(path) {
    if (!state.token) return null;
    let response;
    try {
      response = await fetch(path, { headers: { Authorization: "Bearer " + state.token }, cache: "no-store" });
    } catch (e) {
      return null; // offline: the list stays as it is and is reloaded on the next connect
    }
    if (!response.ok) return { status: response.status, body: null };
    return { status: response.status, body: await response.json() };
  }

  async function loadAgents() {
    const answer = await api("/api/me/agents");
    if (!answer || !answer.body || !Array.isArray(answer.body.agents)) return;
    const usable = answer.body.agents.filter((a) => a && a.available && typeof a.name === "string");
    if (!usable.length) return;
    const wanted = storage.get("runwatch.agent");
    const names = usable.map((a) => a.name);
    const chosen = names.includes(wanted) ? wanted : (names.includes(answer.body.default) ? answer.body.default : names[0]);
    ui.agent.replaceChildren(...names.map((name) => {
      const option = el("option", null, name);
      option.value = name;
      return option;
    }));
    ui.agent.value = chosen;
    const off = answer.body.agents.filter((a) => a && !a.available).map((a) => a.name + ": " + a.reason);
    ui.agent.title = off.length ? "Not available here: " + off.join("; ") : "";
  }

  function relativeTime(iso) {
    const then = Date.parse(iso);
    if (!Number.isFinite(then)) return "";
    const s = Math.max(0, (Date.now() - then) / 1000);
    if (s < 60) return "just now";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return new Date(then).toLocaleDateString();
  }

  function threadItem(t) {
    const li = el("li", "thread");
    li.dataset.threadId = t.thread_id;
    const button = el("button", "thread-open");
    button.type = "button";
    button.title = t.title;
    button.append(
      el("span", "thread-title", t.title || "(empty message)"),
      el("span", "thread-meta", relativeTime(t.last_run_at) + " · " + t.run_count + (t.run_count === 1 ? " message" : " messages")),
    );
    button.addEventListener("click", () => openThread(t.thread_id));
    li.append(button);
    return li;
  }

  async function loadThreads(more) {
    const user = state.user;
    const query = "?limit=" + THREADS_PAGE + (more && state.threadsCursor ? "&cursor=" + encodeURIComponent(state.threadsCursor) : "");
    const answer = await api("/api/me/threads" + query);
    if (!answer || !answer.body || user !== state.user) return;
    const items = Array.isArray(answer.body.items) ? answer.body.items : [];
    const nodes = items.filter((t) => t && typeof t.thread_id === "string").map(threadItem);
    if (more) ui.threadList.append(...nodes);
    else ui.threadList.replaceChildren(...nodes);
    state.threadsCursor = answer.body.next_cursor || null;
    ui.moreThreads.hidden = !state.threadsCursor;
    ui.threadsEmpty.hidden = ui.threadList.children.length > 0;
    markCurrentThread();
  }

  // After a run starts or ends: refresh the list once things settle (titles, order, counts).
  function refreshThreadsSoon() {
    clearTimeout(state.threadsTimer);
    state.threadsTimer = setTimeout(() => loadThreads(false), 400);
  }

  function markCurrentThread() {
    for (const li of ui.threadList.children) {
      const current = li.dataset.threadId === state.threadId;
      li.classList.toggle("current", current);
      const button = li.querySelector("button");
      if (current) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
  }

  // Bring back an earlier thread: its runs from the store, their events replayed over /ws.
  async function openThread(threadId) {
    closeThreadsPanel();
    if (threadId === state.threadId && ui.runs.querySelector("article.run")) return;
    const answer = await api("/api/me/threads/" + encodeURIComponent(threadId));
    if (!answer) return;
    if (answer.status === 404) {
      showNotice("That chat is no longer stored.");
      loadThreads(false);
      return;
    }
    if (!answer.body || !Array.isArray(answer.body.runs)) return;
    clearConversation();
    state.threadId = threadId;
    for (const item of answer.body.runs) {
      if (!item || typeof item.run_id !== "string") continue;
      let run = state.runs.get(item.run_id);
      if (run) {
        ui.runs.append(run.view.card); // known already: its card comes back as it was
      } else {
        run = ensureRun(item.run_id);
        run.restored = true;
        if (typeof item.input === "string") setPrompt(run.view, item.input);
        send({ type: "resume", run_id: run.id, after_seq: 0 });
      }
      setThread(run, threadId);
    }
    updateHint();
    updateStop();
    saveThread();
    markCurrentThread();
    scrollToBottom();
  }

  function closeThreadsPanel() {
    document.body.classList.remove("threads-open");
    ui.toggleThreads.setAttribute("aria-expanded", "false");
  }

  // ---- page state -------------------------------------------------------------------------------

  function showUserError(text) {
    ui.userError.textContent = text;
    ui.userError.hidden = !text;
    if (text) ui.user.setAttribute("aria-invalid", "true");
    else ui.user.removeAttribute("aria-invalid");
  }

  function clearConversation() {
    // Runs stay known (their events are still de-duplicated and acked); their cards leave the page.
    state.generation += 1;
    state.threadId = null;
    for (const card of ui.runs.querySelectorAll("article.run")) card.remove();
    for (const pending of state.pending.values()) pending.view.card.remove();
    showNotice("");
    updateHint();
    updateStop();
    saveThread();
    markCurrentThread();
  }

  function startAsUser(user) {
    for (const run of state.runs.values()) {
      clearTimeout(run.ackTimer);
      clearTimeout(run.gapTimer);
    }
    state.runs.clear();
    state.pending.clear();
    state.cancels.clear();
    for (const card of ui.runs.querySelectorAll("article.run")) card.remove();
    state.user = user;
    state.generation += 1;
    state.threadsCursor = null;
    ui.threadList.replaceChildren();
    ui.threadsEmpty.hidden = false;
    ui.moreThreads.hidden = true;
    const saved = loadThread();
    state.threadId = saved.threadId;
    // The thread's runs, replayed from the audit store once connected (resume from seq 0).
    for (const runId of saved.runs) {
      const run = ensureRun(runId);
      run.restored = true;
      setThread(run, saved.threadId);
    }
    updateHint();
  }

  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.message.value.trim();
    if (!text) return;
    ui.message.value = "";
    autoGrow();
    sendChat(text);
  });

  ui.message.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.composer.requestSubmit();
    }
  });

  function autoGrow() {
    ui.message.style.height = "auto";
    ui.message.style.height = Math.min(ui.message.scrollHeight, 200) + "px";
  }
  ui.message.addEventListener("input", autoGrow);

  ui.newChat.addEventListener("click", () => {
    clearConversation();
    closeThreadsPanel();
    ui.message.focus();
  });

  ui.moreThreads.addEventListener("click", () => loadThreads(true));

  ui.toggleThreads.addEventListener("click", () => {
    const open = document.body.classList.toggle("threads-open");
    ui.toggleThreads.setAttribute("aria-expanded", String(open));
  });

  ui.stop.addEventListener("click", () => {
    for (const run of runningOnPage()) requestCancel(run);
  });

  ui.agent.addEventListener("change", () => storage.set("runwatch.agent", ui.agent.value));

  ui.user.addEventListener("change", () => {
    const user = ui.user.value.trim() || "dev";
    if (!USER_ID.test(user)) {
      showUserError("“" + user + "” is not a valid user name: " + USER_RULE + ".");
      return;
    }
    showUserError("");
    ui.user.value = user;
    if (user === state.user) return;
    storage.set("runwatch.user", user);
    startAsUser(user);
    reconnectNow();
  });

  ui.useToken.addEventListener("click", () => {
    const token = ui.token.value.trim();
    if (!token) { ui.token.focus(); return; }
    state.manualToken = token;
    state.waitingForToken = false;
    ui.token.value = "";
    ui.tokenBox.hidden = true;
    reconnectNow();
  });

  window.addEventListener("online", () => {
    if (!state.socket && state.retryTimer) connect(); // the network is back: do not wait out the backoff
  });

  window.runwatchChat = {
    socket: () => state.socket,
    dropSocket: (offlineMs) => dropSocket(offlineMs),
    stats: () => Object.assign({ runs: state.runs.size, pending: state.pending.size }, state.stats),
  };

  const savedUser = storage.get("runwatch.user");
  const firstUser = savedUser && USER_ID.test(savedUser) ? savedUser : "dev";
  ui.user.value = firstUser;
  startAsUser(firstUser);
  connect();
})();
