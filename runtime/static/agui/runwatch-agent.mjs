// RunwatchHttpAgent: @ag-ui/client's HttpAgent for runwatch's /agui endpoint, with resume and
// cancel (docs/agui.md). For a bundler or Node (it imports "@ag-ui/client"):
//
//   import { RunwatchHttpAgent } from "./runwatch-agent.mjs";
//   const agent = new RunwatchHttpAgent({
//     url: "https://runwatch.example.com/agui",
//     headers: { Authorization: `Bearer ${token}` },
//   });
//   await agent.runAgent({ runId, forwardedProps: { agent: "demo" } });
//   // the connection dropped mid-run? pick the run up where it is:
//   await agent.connectAgent();           // Last-Event-ID of the last stream
//   await agent.connectAgent({ runId });  // or by runId, e.g. from a fresh page
//   await agent.cancel(runId);            // closing a stream is not a cancel
//
// connect() POSTs to <url>/connect; runwatch answers RUN_STARTED, a MESSAGES_SNAPSHOT rebuilt
// from its audit store (text streamed so far included), the starts of what is still open, then
// the run's live events to its terminal event. Every SSE frame runwatch sends has
// `id: <run_id>:<seq>`; the agent keeps the last one it saw and sends it as Last-Event-ID.

import { HttpAgent, enforceOutgoingInput, runHttpRequest, transformHttpEventStream } from "@ag-ui/client";

export class RunwatchHttpAgent extends HttpAgent {
  constructor(config) {
    super(config);
    /** The SSE id of the last frame received: `<run_id>:<seq>`. */
    this.lastEventId = undefined;
    const fetchResponse = this.fetch;
    // A plain function, so that a clone (which copies `fetch`) records into itself.
    this.fetch = async function (url, init) {
      return this.rememberEventIds(await fetchResponse(url, init));
    };
  }

  run(input) {
    this.lastEventId = undefined;
    return super.run(input);
  }

  connect(input) {
    const headers = {
      ...this.headers,
      "Content-Type": "application/json",
      Accept: "text/event-stream",
    };
    if (this.lastEventId !== undefined) {
      headers["Last-Event-ID"] = this.lastEventId;
    }
    // The previous run's controller may have been aborted (that is how its stream dropped).
    this.abortController = new AbortController();
    const body = JSON.stringify(enforceOutgoingInput(input));
    const signal = this.abortController.signal;
    const events = runHttpRequest(() =>
      this.fetch(`${this.url}/connect`, { method: "POST", headers, body, signal }),
    );
    return transformHttpEventStream(events, this.debugLogger);
  }

  /** Cancel a run (by the runId it was started with); resolves to runwatch's answer. */
  async cancel(runId) {
    const response = await this.fetch(`${this.url}/cancel`, {
      method: "POST",
      headers: { ...this.headers, "Content-Type": "application/json" },
      body: JSON.stringify({ threadId: this.threadId, runId }),
    });
    if (!response.ok) {
      throw new Error(`HTTP ${response.status}: ${await response.text()}`);
    }
    return response.json();
  }

  clone() {
    const cloned = super.clone();
    cloned.lastEventId = this.lastEventId;
    return cloned;
  }

  // Reads the `id:` lines of the SSE stream as it passes (the client's parser ignores them).
  rememberEventIds(response) {
    const type = response.headers.get("content-type") || "";
    if (!response.ok || !response.body || !type.startsWith("text/event-stream")) {
      return response;
    }
    const decoder = new TextDecoder();
    let tail = "";
    const track = new TransformStream({
      transform: (chunk, controller) => {
        tail += decoder.decode(chunk, { stream: true });
        const lines = tail.split("\n");
        tail = lines.pop();
        for (const line of lines) {
          if (line.startsWith("id:")) {
            this.lastEventId = line.slice(3).trim();
          }
        }
        controller.enqueue(chunk);
      },
    });
    return new Response(response.body.pipeThrough(track), {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  }
}
