// runwatch chat page: plain JS, no framework, no network beyond this server.
// Speaks the /ws protocol: connect, chat, ack, resume, cancel, ping; reconnects and resumes.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = {
    socket: null,
    token: null,
    manualToken: null,
    heartbeat: null,
    backoff: 250,
    threadId: localStorage.getItem("runwatch.thread") || null,
    runs: new Map(), // run_id -> {card, lastSeq, pending: Map(seq->event), done, prompt}
    pendingChats: new Map(), // client_msg_id -> {frame, card}
    ackTimers: new Map(),
  };

  function setStatus(s, text) {
    const el = $("conn-status");
    el.dataset.state = s;
    el.textContent = text || s;
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text; // never innerHTML: user and agent text is data
    return node;
  }

  function randomId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return String(Date.now()) + Math.random().toString(16).slice(2);
  }

  async function getToken() {
    if (state.manualToken) return state.manualToken;
    const user = $("user").value.trim() || "dev";
    localStorage.setItem("runwatch.user", user);
    const r = await fetch("/dev/token", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user }),
    });
    if (r.status === 404) {
      $("token-box").hidden = false;
      throw new Error("no dev mode");
    }
    if (!r.ok) throw new Error("token request failed: " + r.status);
    return (await r.json()).token;
  }

  function send(frame) {
    if (state.socket && state.socket.readyState === WebSocket.OPEN && state.socket.authed) {
      state.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  // ---- run cards --------------------------------------------------------------------

  function runCard(runId, prompt) {
    let run = state.runs.get(runId);
    if (run) return run;
    const card = el("article", "run");
    card.dataset.runId = runId;
    card.dataset.status = "running";
    const head = el("header");
    const title = el("span", "prompt", prompt || "(resumed run)");
    const badge = el("span", "badge", "running");
    const cancel = el("button", "cancel", "Cancel");
    cancel.type = "button";
    cancel.addEventListener("click", () => send({ type: "cancel", run_id: runId }));
    head.append(title, badge, cancel);
    const timeline = el("ol", "timeline");
    card.append(head, timeline);
    $("runs").append(card);
    run = { card, title, badge, cancel, timeline, lastSeq: 0, pending: new Map(), done: false, tools: new Map(), answer: null };
    state.runs.set(runId, run);
    return run;
  }

  function finish(run, status, label) {
    run.done = true;
    run.card.dataset.status = status;
    run.badge.textContent = label;
    run.cancel.remove();
  }

  function render(run, ev) {
    const d = ev.data || {};
    switch (ev.type) {
      case "agent_started":
        if (d.input && run.title.textContent === "(resumed run)") run.title.textContent = d.input;
        break;
      case "agent_thinking": {
        const li = el("li", "thinking", d.text);
        li.dataset.step = d.step;
        run.timeline.append(li);
        break;
      }
      case "tool_executing": {
        const li = el("li", "tool");
        li.dataset.toolCallId = d.tool_call_id;
        li.dataset.status = "running";
        const args = JSON.stringify(d.args || {});
        li.append(el("span", "name", d.tool), el("span", "args", args.length > 80 ? args.slice(0, 80) + "…" : args), el("span", "state", "running"));
        run.tools.set(d.tool_call_id, li);
        run.timeline.append(li);
        break;
      }
      case "tool_completed": {
        const li = run.tools.get(d.tool_call_id) || el("li", "tool");
        li.dataset.status = d.status;
        const st = li.querySelector(".state") || li.appendChild(el("span", "state"));
        if (d.status === "ok") {
          const res = JSON.stringify(d.result);
          st.textContent = "done in " + d.duration_ms + " ms" + (res ? ": " + (res.length > 100 ? res.slice(0, 100) + "…" : res) : "");
        } else {
          st.textContent = "failed: " + (d.error || "error");
        }
        break;
      }
      case "text_delta":
        if (!run.answer) { run.answer = el("p", "final-report", ""); run.card.append(run.answer); }
        run.answer.textContent += d.text;
        break;
      case "final_report":
        if (!run.answer) { run.answer = el("p", "final-report", ""); run.card.append(run.answer); }
        run.answer.textContent = d.text;
        break;
      case "agent_completed":
        finish(run, "completed", "done in " + Math.round(d.duration_ms) + " ms");
        break;
      case "agent_error": {
        const status = d.code === "cancelled" ? "cancelled" : "error";
        run.card.append(el("p", "error-box", d.code + ": " + d.message + (d.retryable ? " (retryable)" : "")));
        finish(run, status, d.code);
        break;
      }
    }
  }

  function onEvent(ev) {
    const run = runCard(ev.run_id);
    if (ev.seq <= run.lastSeq || run.pending.has(ev.seq)) return; // duplicate: (run_id, seq)
    run.pending.set(ev.seq, ev);
    while (run.pending.has(run.lastSeq + 1)) {
      const next = run.pending.get(run.lastSeq + 1);
      run.pending.delete(run.lastSeq + 1);
      run.lastSeq = next.seq;
      render(run, next);
    }
    scheduleAck(ev.run_id);
    window.scrollTo(0, document.body.scrollHeight);
  }

  function scheduleAck(runId) {
    if (state.ackTimers.has(runId)) return;
    state.ackTimers.set(runId, setTimeout(() => {
      state.ackTimers.delete(runId);
      const run = state.runs.get(runId);
      if (run && run.lastSeq > 0) send({ type: "ack", run_id: runId, seq: run.lastSeq });
    }, 20));
  }

  // ---- the socket -------------------------------------------------------------------

  async function connect() {
    setStatus(state.socket ? "reconnecting" : "connecting", state.socket ? "reconnecting…" : "connecting…");
    let token;
    try {
      token = await getToken();
    } catch (e) {
      if (String(e.message) === "no dev mode" && !state.manualToken) { setStatus("offline", "token needed"); return; }
      return retry();
    }
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(proto + "//" + location.host + "/ws");
    state.socket = ws;
    ws.authed = false;
    ws.onopen = () => ws.send(JSON.stringify({ type: "connect", token, client: "runwatch-web/0.1" }));
    ws.onmessage = (msg) => {
      let frame;
      try { frame = JSON.parse(msg.data); } catch (e) { return; }
      if (frame.type === "connected") return onConnected(ws, frame);
      if (frame.type === "run_accepted") return onAccepted(frame);
      if (frame.type === "error") return onError(frame);
      if (frame.type === "pong" || frame.type === "resumed") return;
      if (typeof frame.seq === "number") onEvent(frame);
    };
    ws.onclose = (e) => {
      if (state.socket !== ws) return;
      ws.authed = false;
      clearInterval(state.heartbeat);
      if (e.code === 4429) { setStatus("offline", "too many tabs open"); state.backoff = 5000; }
      retry();
    };
  }

  function retry() {
    setStatus("reconnecting", "reconnecting…");
    const delay = state.backoff * (0.5 + Math.random());
    state.backoff = Math.min(state.backoff * 2, 5000);
    setTimeout(connect, delay);
  }

  function onConnected(ws, frame) {
    ws.authed = true;
    state.backoff = 250;
    setStatus("connected", "connected as " + frame.user_id);
    clearInterval(state.heartbeat);
    state.heartbeat = setInterval(() => send({ type: "ping" }), (frame.heartbeat_s || 20) * 1000);
    // Resume every run we know that has not ended, then every active run we do not know.
    for (const [runId, run] of state.runs) {
      if (!run.done) send({ type: "resume", run_id: runId, after_seq: run.lastSeq });
    }
    for (const active of frame.active_runs || []) {
      if (!state.runs.has(active.run_id)) {
        runCard(active.run_id);
        send({ type: "resume", run_id: active.run_id, after_seq: 0 });
      }
    }
    // Chats never accepted: same client_msg_id, so the server starts nothing twice.
    for (const pending of state.pendingChats.values()) send(pending.frame);
  }

  function onAccepted(frame) {
    const pending = state.pendingChats.get(frame.client_msg_id);
    state.pendingChats.delete(frame.client_msg_id);
    state.threadId = frame.thread_id;
    localStorage.setItem("runwatch.thread", frame.thread_id);
    const run = runCard(frame.run_id, pending ? pending.frame.text : undefined);
    if (pending && pending.placeholder) pending.placeholder.replaceWith(run.card);
  }

  function onError(frame) {
    const pending = frame.ref && state.pendingChats.get(frame.ref);
    if (pending) {
      state.pendingChats.delete(frame.ref);
      if (pending.placeholder) {
        pending.placeholder.dataset.status = "error";
        pending.placeholder.append(el("p", "error-box", frame.code + ": " + frame.message));
      }
      if (frame.code === "not_found") { state.threadId = null; localStorage.removeItem("runwatch.thread"); }
      return;
    }
    if (frame.ref && state.runs.has(frame.ref) && frame.code === "not_found") {
      finish(state.runs.get(frame.ref), "error", "not found");
    }
  }

  function sendChat(text) {
    const frame = { type: "chat", text, client_msg_id: randomId(), agent: $("agent").value };
    if (state.threadId) frame.thread_id = state.threadId;
    const placeholder = el("article", "run");
    placeholder.dataset.status = "sending";
    placeholder.append(el("header", "", ""), el("span", "prompt", text));
    $("runs").append(placeholder);
    state.pendingChats.set(frame.client_msg_id, { frame, placeholder });
    send(frame); // if the socket is down, it is sent after the reconnect
  }

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("message").value.trim();
    if (!text) return;
    $("message").value = "";
    sendChat(text);
  });
  $("new-chat").addEventListener("click", () => {
    state.threadId = null;
    localStorage.removeItem("runwatch.thread");
    $("runs").replaceChildren();
    state.runs.clear();
  });
  $("user").value = localStorage.getItem("runwatch.user") || "dev";
  $("user").addEventListener("change", () => {
    state.threadId = null;
    localStorage.removeItem("runwatch.thread");
    if (state.socket) state.socket.close(1000);
  });
  $("use-token").addEventListener("click", () => {
    state.manualToken = $("token").value.trim();
    $("token-box").hidden = true;
    connect();
  });

  window.runwatchChat = {
    socket: () => state.socket,
    dropSocket: () => { if (state.socket) state.socket.close(4000, "dropped by test"); },
  };
  connect();
})();
