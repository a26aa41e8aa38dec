// Drives runwatch's /agui with the official AG-UI client, one scenario per user, all at once.
//
//   node drive.mjs <config.json>
//
// config: {url, tokens: {<scenario>: <JWT>}, agent_module, scale}. Prints one JSON object:
// {<scenario>: {ok, error?, streams: [...], ...}}; tests/test_agui.py asserts on it.
//
// Every stream is checked here, on the bytes runwatch sent (captured by the agent's fetch):
// each SSE frame has `id: <run_id>:<seq>`, seqs never go back; each event passes the
// official zod schema (@ag-ui/core's EventSchemas) and the official verifier (verifyEvents,
// also run by HttpAgent.runAgent itself); exactly one terminal event, and it is the last;
// every TOOL_CALL_RESULT follows a TOOL_CALL_START of its call in the same stream. The client
// must print no warning (its enforcement stage warns about anything it strips).

import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { randomUUID } from "node:crypto";
import { from, lastValueFrom, toArray } from "rxjs";
import { verifyEvents } from "@ag-ui/client";
import { EventSchemas } from "@ag-ui/core/schemas";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const here = dirname(fileURLToPath(import.meta.url));
// The shipped module imports "@ag-ui/client": a verbatim copy next to node_modules resolves it.
mkdirSync(join(here, ".shipped"), { recursive: true });
const shipped = join(here, ".shipped", "runwatch-agent.mjs");
copyFileSync(config.agent_module, shipped);
const { RunwatchHttpAgent } = await import(shipped);

const warnings = [];
for (const level of ["warn", "error"]) {
  const original = console[level];
  console[level] = (...args) => {
    warnings.push(`${level}: ${args.map(String).join(" ")}`);
    original(...args);
  };
}

const TERMINAL = new Set(["RUN_FINISHED", "RUN_ERROR"]);
const FRAME_ID = /^([0-9A-Z]{26}):(\d+)$/;

function parseFrames(text) {
  const frames = [];
  for (const block of text.split("\n\n")) {
    if (!block.trim()) continue;
    let id;
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("id:")) id = line.slice(3).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (data.length) frames.push({ id, event: JSON.parse(data.join("\n")) });
  }
  return frames;
}

// The checks of the header comment, on one stream's raw text; returns a summary.
async function checkStream(text) {
  const frames = parseFrames(text);
  const events = frames.map((f) => f.event);
  let runId;
  let lastSeq = -1;
  for (const { id, event } of frames) {
    const match = FRAME_ID.exec(id ?? "");
    if (!match) throw new Error(`frame ${event.type} has SSE id ${JSON.stringify(id)}`);
    if (runId !== undefined && match[1] !== runId) throw new Error(`ids name two runs: ${id}`);
    runId = match[1];
    const seq = Number(match[2]);
    if (seq < lastSeq) throw new Error(`SSE id seq goes back: ${lastSeq} then ${seq}`);
    lastSeq = seq;
    EventSchemas.parse(event);
  }
  await lastValueFrom(verifyEvents()(from(events)).pipe(toArray()));
  const terminals = events.filter((e) => TERMINAL.has(e.type));
  if (terminals.length !== 1) throw new Error(`${terminals.length} terminal events`);
  if (!TERMINAL.has(events.at(-1).type)) throw new Error(`last event is ${events.at(-1).type}`);
  if (events[0].type !== "RUN_STARTED") throw new Error(`first event is ${events[0].type}`);
  const started = new Set();
  for (const e of events) {
    if (e.type === "TOOL_CALL_START") started.add(e.toolCallId);
    if (e.type === "TOOL_CALL_RESULT" && !started.has(e.toolCallId)) {
      throw new Error(`TOOL_CALL_RESULT for ${e.toolCallId} without its TOOL_CALL_START`);
    }
  }
  return { run_id: runId, last_seq: lastSeq, events, types: events.map((e) => e.type) };
}

// An agent whose every response body is also kept as text, stream by stream.
function makeAgent(scenario, threadId = randomUUID()) {
  const bodies = [];
  const fetchAndKeep = async (url, init) => {
    const response = await fetch(url, init);
    const type = response.headers.get("content-type") ?? "";
    if (!response.ok || !response.body || !type.startsWith("text/event-stream")) return response;
    const [mine, theirs] = response.body.tee();
    const record = { url, text: "", done: false };
    bodies.push(record);
    (async () => {
      const decoder = new TextDecoder();
      const reader = mine.getReader();
      try {
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          record.text += decoder.decode(value, { stream: true });
        }
      } catch {
        // the stream was aborted: what arrived is kept
      }
      record.done = true;
    })();
    return new Response(theirs, { status: response.status, headers: response.headers });
  };
  const agent = new RunwatchHttpAgent({
    url: `${config.url}/agui`,
    headers: { Authorization: `Bearer ${config.tokens[scenario]}` },
    threadId,
    fetch: fetchAndKeep,
  });
  return { agent, bodies };
}

function userMessage(agent, text) {
  agent.addMessage({ id: randomUUID(), role: "user", content: text });
}

async function settled(bodies) {
  for (let i = 0; i < 500 && !bodies.every((b) => b.done); i++) {
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function runOnce(scenario, text, props = {}, subscriber = {}, params = {}) {
  const { agent, bodies } = makeAgent(scenario);
  userMessage(agent, text);
  const runId = params.runId ?? randomUUID();
  const result = await agent.runAgent({ runId, forwardedProps: props }, subscriber);
  await settled(bodies);
  const streams = [];
  for (const body of bodies) streams.push(await checkStream(body.text));
  return { agent, runId, result, streams, messages: agent.messages, bodies };
}

const sleep = (s) => new Promise((r) => setTimeout(r, s * 1000 * config.scale));

const scenarios = {
  async golden() {
    return runOnce("golden", "what is 6*7");
  },
  async fail_tool() {
    return runOnce("fail_tool", "fail tool");
  },
  async parallel() {
    return runOnce("parallel", "two at once", { agent: "parallel" });
  },
  async crash() {
    return runOnce("crash", "crash");
  },
  async timeout() {
    return runOnce("timeout", "wait 30");
  },
  async cancel() {
    let answer;
    const out = await runOnce("cancel", "wait 10", {}, {
      onToolCallEndEvent: async ({ agent, input }) => {
        answer = await agent.cancel(input.runId);
      },
    });
    return { ...out, cancel_answer: answer };
  },
  async streamed() {
    return runOnce("streamed", "stream it", { agent: "streamer" });
  },
  async retry() {
    const runId = randomUUID();
    const first = await runOnce("retry", "what is 2+3", {}, {}, { runId });
    const again = await runOnce("retry", "a different text", {}, {}, { runId });
    return { ...again, first_streams: first.streams };
  },
  async resume() {
    // Drop the stream after the first text chunk, pick the run up with Last-Event-ID; while
    // its tool call is open, a second client (a fresh page) connects by runId too.
    const threadId = randomUUID();
    const { agent, bodies } = makeAgent("resume", threadId);
    userMessage(agent, "tell me in two parts");
    const runId = randomUUID();
    let dropped = 0;
    const dropping = {
      onTextMessageContentEvent: () => {
        dropped += 1;
        if (dropped === 1) agent.abortRun();
      },
    };
    let firstError;
    try {
      await agent.runAgent({ runId, forwardedProps: { agent: "slow" } }, dropping);
    } catch (err) {
      firstError = String(err);
    }
    await settled(bodies);
    const droppedText = bodies[0].text;
    const lastEventId = agent.lastEventId;
    await sleep(0.2);
    const page = makeAgent("resume", threadId);
    let pageRun;
    const reconnected = await agent.connectAgent(
      {},
      {
        onToolCallStartEvent: () => {
          pageRun ??= page.agent.connectAgent({ runId });
        },
      },
    );
    const pageResult = await pageRun;
    await settled([...bodies, ...page.bodies]);
    const streams = [];
    for (const body of bodies.slice(1)) streams.push(await checkStream(body.text));
    const pageStreams = [];
    for (const body of page.bodies) pageStreams.push(await checkStream(body.text));
    return {
      runId,
      first_error: firstError,
      dropped_frames: parseFrames(droppedText).map((f) => ({ id: f.id, type: f.event.type })),
      last_event_id: lastEventId,
      streams,
      messages: agent.messages,
      new_messages: reconnected.newMessages,
      page_streams: pageStreams,
      page_messages: page.agent.messages,
      page_new_messages: pageResult?.newMessages,
    };
  },
};

const results = {};
await Promise.all(
  Object.entries(scenarios).map(async ([name, run]) => {
    try {
      const out = await run();
      delete out.agent;
      delete out.bodies;
      results[name] = { ok: true, ...out };
    } catch (err) {
      results[name] = { ok: false, error: String(err?.stack ?? err) };
    }
  }),
);
results.warnings = warnings;
process.stdout.write(JSON.stringify(results));
