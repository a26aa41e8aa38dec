// runwatch Markdown: a strict subset, rendered to DOM nodes. It never parses or emits HTML.
//
// Every piece of text becomes a Text node (createTextNode / textContent), so markup a model or a
// user writes (<script>, <img onerror>, ...) shows as the characters it is and never runs. Links
// keep only http:, https: and mailto: targets and open with rel="noopener noreferrer nofollow".
//
// Blocks: paragraphs (a single newline is a line break, as in chat apps), # headings (shown
// smaller than the page's own), ``` fenced code (an unclosed fence, as while streaming, runs to
// the end), > quotes, - * + and 1. lists (nested by indentation), --- rules, | tables |.
// Inline: `code`, **bold**, __bold__, *italic*, _italic_, ~~strike~~, [text](url), <url>, bare
// https:// URLs, and backslash escapes.
//
// Usage: runwatchMarkdown.render(text) -> DocumentFragment.
"use strict";

(function () {
  const SAFE_URL = /^(https?:\/\/|mailto:)[^\s]+$/i;
  const BARE_URL = /^https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"\]]/i;
  const FENCE = /^ {0,3}(```+|~~~+)\s*([\w+#.-]*)\s*$/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$/;
  const MAX_DEPTH = 8; // nested quotes and lists: bounded, whatever the input

  function h(tag, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function safeUrl(url) {
    const trimmed = url.trim();
    return SAFE_URL.test(trimmed) ? trimmed : null;
  }

  function link(url, children) {
    const a = h("a");
    a.href = url;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    for (const child of children) a.append(child);
    return a;
  }

  // ---- inline ---------------------------------------------------------------------------------

  // The index of the closing `marker` for an opening at `from`, or -1.
  function closing(text, marker, from) {
    let i = from;
    while (i < text.length) {
      const at = text.indexOf(marker, i);
      if (at < 0) return -1;
      if (text[at - 1] !== "\\" && at > from) return at;
      i = at + 1;
    }
    return -1;
  }

  function wordChar(c) {
    return c !== undefined && /[\p{L}\p{N}_]/u.test(c);
  }

  function inline(text, depth) {
    const out = [];
    let plain = "";
    const flush = () => {
      if (plain) out.push(document.createTextNode(plain));
      plain = "";
    };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      const rest = text.slice(i);
      if (c === "\\" && i + 1 < text.length && /[\\`*_{}\[\]()#+\-.!|~<>]/.test(text[i + 1])) {
        plain += text[i + 1];
        i += 2;
        continue;
      }
      if (c === "`") {
        const ticks = rest.match(/^`+/)[0];
        const end = text.indexOf(ticks, i + ticks.length);
        if (end > 0) {
          flush();
          const code = h("code");
          code.textContent = text.slice(i + ticks.length, end).replace(/^ (.*) $/s, "$1");
          out.push(code);
          i = end + ticks.length;
          continue;
        }
      }
      if (depth < MAX_DEPTH && (rest.startsWith("**") || rest.startsWith("__") || rest.startsWith("~~"))) {
        const marker = rest.slice(0, 2);
        const leftOk = marker !== "__" || !wordChar(text[i - 1]);
        const end = leftOk ? closing(text, marker, i + 2) : -1;
        if (end > i + 2 && !/\s/.test(text[i + 2]) && !/\s/.test(text[end - 1])) {
          flush();
          const node = h(marker === "~~" ? "del" : "strong");
          node.append(...inline(text.slice(i + 2, end), depth + 1));
          out.push(node);
          i = end + 2;
          continue;
        }
      }
      if (depth < MAX_DEPTH && (c === "*" || c === "_")) {
        const leftOk = c === "*" || !wordChar(text[i - 1]);
        const end = leftOk ? closing(text, c, i + 1) : -1;
        const rightOk = end > 0 && (c === "*" || !wordChar(text[end + 1]));
        if (end > i + 1 && rightOk && !/\s/.test(text[i + 1]) && !/\s/.test(text[end - 1])) {
          flush();
          const em = h("em");
          em.append(...inline(text.slice(i + 1, end), depth + 1));
          out.push(em);
          i = end + 1;
          continue;
        }
      }
      if (c === "[") {
        const m = rest.match(/^\[([^\]\n]{1,500})\]\(([^()\s]{1,2000})(?:\s+"[^"\n]*")?\)/);
        if (m) {
          flush();
          const url = safeUrl(m[2]);
          const label = depth < MAX_DEPTH ? inline(m[1], depth + 1) : [document.createTextNode(m[1])];
          if (url) out.push(link(url, label));
          else out.push(...label); // an unsafe target (javascript:, data:, ...): the text only
          i += m[0].length;
          continue;
        }
      }
      if (c === "<") {
        const m = rest.match(/^<((?:https?:\/\/|mailto:)[^\s<>]{1,2000})>/i);
        if (m) {
          flush();
          out.push(link(m[1], [document.createTextNode(m[1])]));
          i += m[0].length;
          continue;
        }
      }
      if ((c === "h" || c === "H") && !wordChar(text[i - 1])) {
        const m = rest.match(BARE_URL);
        if (m) {
          flush();
          out.push(link(m[0], [document.createTextNode(m[0])]));
          i += m[0].length;
          continue;
        }
      }
      plain += c;
      i += 1;
    }
    flush();
    return out;
  }

  // A paragraph: its lines, with a line break between them.
  function paragraph(lines) {
    const p = h("p");
    lines.forEach((line, n) => {
      if (n) p.append(h("br"));
      p.append(...inline(line.trim(), 0));
    });
    return p;
  }

  // ---- blocks ---------------------------------------------------------------------------------

  function cells(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
    return s.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
  }

  function table(lines) {
    const t = h("table");
    const head = h("thead");
    const row = h("tr");
    for (const cell of cells(lines[0])) {
      const th = h("th");
      th.append(...inline(cell, 0));
      row.append(th);
    }
    head.append(row);
    const body = h("tbody");
    for (const line of lines.slice(2)) {
      const tr = h("tr");
      for (const cell of cells(line)) {
        const td = h("td");
        td.append(...inline(cell, 0));
        tr.append(td);
      }
      body.append(tr);
    }
    t.append(head, body);
    const wrap = h("div", "md-table");
    wrap.append(t);
    return wrap;
  }

  function list(lines, start, depth) {
    // Items at the indentation of the first line; deeper lines belong to the item above them.
    const first = lines[start].match(ITEM);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const node = h(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    let i = start;
    while (i < lines.length) {
      const m = lines[i].match(ITEM);
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
      const li = h("li");
      const body = [m[3]];
      const nested = [];
      i += 1;
      while (i < lines.length && lines[i].trim() !== "") {
        const sub = lines[i].match(ITEM);
        if (sub && sub[1].length <= indent) break; // the next item of this list, or of a parent
        if (sub || nested.length) {
          nested.push(lines[i].slice(Math.min(indent + 2, lines[i].search(/\S/))));
        } else {
          body.push(lines[i]); // a continuation line of this item
        }
        i += 1;
      }
      li.append(...paragraph(body).childNodes);
      if (nested.length) li.append(blocks(nested, depth + 1));
      node.append(li);
    }
    return { node, next: i };
  }

  function blocks(lines, depth) {
    const frag = document.createDocumentFragment();
    let i = 0;
    let para = [];
    const endParagraph = () => {
      if (para.length) frag.append(paragraph(para));
      para = [];
    };
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(FENCE);
      if (fence) {
        endParagraph();
        const code = [];
        i += 1;
        while (i < lines.length && !(lines[i].trim().startsWith(fence[1]) && lines[i].trim().replace(/[`~]/g, "") === "")) {
          code.push(lines[i]);
          i += 1;
        }
        i += 1; // the closing fence (or the end, while it streams)
        const pre = h("pre");
        const el = h("code");
        if (fence[2]) el.dataset.lang = fence[2];
        el.textContent = code.join("\n");
        pre.append(el);
        frag.append(pre);
        continue;
      }
      if (line.trim() === "") {
        endParagraph();
        i += 1;
        continue;
      }
      const heading = line.match(HEADING);
      if (heading) {
        endParagraph();
        const node = h("h" + Math.min(heading[1].length + 2, 6), "md-h");
        node.append(...inline(heading[2], 0));
        frag.append(node);
        i += 1;
        continue;
      }
      if (RULE.test(line) && !(para.length && /^\s*-+\s*$/.test(line))) {
        endParagraph();
        frag.append(h("hr"));
        i += 1;
        continue;
      }
      if (depth < MAX_DEPTH && QUOTE.test(line)) {
        endParagraph();
        const quoted = [];
        while (i < lines.length && QUOTE.test(lines[i])) {
          quoted.push(lines[i].match(QUOTE)[1]);
          i += 1;
        }
        const bq = h("blockquote");
        bq.append(blocks(quoted, depth + 1));
        frag.append(bq);
        continue;
      }
      if (depth < MAX_DEPTH && ITEM.test(line) && (para.length === 0 || !/^\s/.test(line))) {
        endParagraph();
        const { node, next } = list(lines, i, depth);
        frag.append(node);
        i = next;
        continue;
      }
      if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes("-")) {
        endParagraph();
        const rows = [line, lines[i + 1]];
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim() !== "") {
          rows.push(lines[i]);
          i += 1;
        }
        frag.append(table(rows));
        continue;
      }
      para.push(line);
      i += 1;
    }
    endParagraph();
    return frag;
  }

  function render(text) {
    return blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), 0);
  }

  window.runwatchMarkdown = { render };
})();
