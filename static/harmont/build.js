/* The build page, kept current without reloading:
 * - job and build states: polls the page's status.json every ~2 s until the build is finished;
 * - a job's log: an EventSource on /v0/jobs/<id>/logs?token=<log token>, the token fetched from
 *   log-token.json and renewed before it expires; ANSI colours rendered; DOM writes batched per
 *   animation frame and capped, so a fast or huge log doesn't freeze the tab; numbered lines
 *   with links, collapsible sections, timestamps and find (see "log panels").
 * Plain JavaScript, no dependencies, no build step.
 */
(function () {
  "use strict";

  var POLL_MS = 2000;
  var MAX_LINES = 5000; // lines kept in the DOM per log panel; the raw log has everything
  var RENEW_MARGIN_MS = 5 * 60 * 1000; // renew a log token this long before it expires
  var RETRY_MS = 2000;

  // ------------------------------------------------------------------ ANSI SGR → HTML

  var HTML_ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, function (c) { return HTML_ESCAPES[c]; });
  }

  // CSI sequences (ESC [ params letter); only SGR ("m") changes anything, the rest (cursor
  // movement, erase line) is dropped. None of these characters is special in HTML, so they
  // survive escaping unchanged.
  var CSI = /\x1b\[([0-9;?]*)([@-~])/g;
  // OSC sequences (window titles, hyperlinks): ESC ] ... BEL or ESC \ — dropped.
  var OSC = /\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)/g;
  // An escape sequence cut off at the end of a chunk: held back until the next chunk.
  var PARTIAL = /\x1b(?:\[[0-9;?]*|\][^\x07\x1b]*)?$/;

  function AnsiConverter() {
    this.bold = false;
    this.fg = null;
    this.bg = null;
    this.pending = "";
  }

  AnsiConverter.prototype.reset = function () {
    this.bold = false;
    this.fg = null;
    this.bg = null;
  };

  AnsiConverter.prototype.apply = function (params) {
    var codes = params === "" ? [0] : params.split(";").map(function (n) { return n === "" ? 0 : parseInt(n, 10); });
    for (var i = 0; i < codes.length; i++) {
      var c = codes[i];
      if (c === 0) this.reset();
      else if (c === 1) this.bold = true;
      else if (c === 21 || c === 22) this.bold = false;
      else if (c >= 30 && c <= 37) this.fg = c - 30;
      else if (c === 39) this.fg = null;
      else if (c >= 40 && c <= 47) this.bg = c - 40;
      else if (c === 49) this.bg = null;
      else if (c >= 90 && c <= 97) this.fg = c - 90 + 8;
      else if (c >= 100 && c <= 107) this.bg = c - 100 + 8;
      else if (c === 38 || c === 48) {
        // 256-colour and true-colour forms: not rendered, but their arguments must not be
        // read as codes of their own ("38;5;1" is not "bold red").
        i += codes[i + 1] === 5 ? 2 : codes[i + 1] === 2 ? 4 : 0;
      }
    }
  };

  AnsiConverter.prototype.wrap = function (text) {
    if (!text) return "";
    var classes = [];
    if (this.bold) classes.push("b");
    if (this.fg !== null) classes.push("f" + this.fg);
    if (this.bg !== null) classes.push("g" + this.bg);
    return classes.length ? '<span class="' + classes.join(" ") + '">' + text + "</span>" : text;
  };

  /* Convert a piece of terminal output to HTML. Colour state carries over from the previous
   * piece, as it does in a terminal. Text is HTML-escaped before anything else happens. */
  AnsiConverter.prototype.push = function (raw) {
    var text = this.pending + raw;
    this.pending = "";
    var cut = PARTIAL.exec(text);
    // A sequence that never ends (a stray ESC ]) must not hold back the rest of the log.
    if (cut && text.length - cut.index < 256) {
      this.pending = cut[0];
      text = text.slice(0, cut.index);
    }
    text = escapeHtml(text.replace(OSC, "").replace(/\r\n/g, "\n").replace(/\r/g, "\n"));
    var out = "";
    var last = 0;
    var match;
    CSI.lastIndex = 0;
    while ((match = CSI.exec(text)) !== null) {
      out += this.wrap(text.slice(last, match.index).replace(/\x1b/g, ""));
      if (match[2] === "m") this.apply(match[1]);
      last = CSI.lastIndex;
    }
    return out + this.wrap(text.slice(last).replace(/\x1b/g, ""));
  };

  window.HarmontAnsi = AnsiConverter;

  var config = document.getElementById("build-page-config");
  if (!config) return;
  config = JSON.parse(config.textContent);

  function fill(template, jobId) { return template.replace("{job_id}", encodeURIComponent(jobId)); }

  function setBadge(badge, state) {
    if (badge && badge.dataset.state !== state) {
      badge.dataset.state = state;
      badge.textContent = state;
    }
  }

  // ------------------------------------------------------------------ log tokens

  var logToken = null; // {token, expiresAt (ms)}
  var tokenRequest = null;
  var renewTimer = null;

  function fetchLogToken() {
    if (!tokenRequest) {
      tokenRequest = fetch(config.logTokenUrl, { credentials: "same-origin", cache: "no-store",
                                                 headers: { Accept: "application/json" } })
        .then(function (response) {
          if (!response.ok) throw new Error("log token: HTTP " + response.status);
          return response.json();
        })
        .then(function (body) {
          logToken = { token: body.token, expiresAt: Date.parse(body.expires_at) };
          scheduleRenewal();
          return logToken.token;
        })
        .finally(function () { tokenRequest = null; });
    }
    return tokenRequest;
  }

  // Renew before expiry, so a panel opened (or a stream reconnecting) later has a valid token.
  function scheduleRenewal() {
    clearTimeout(renewTimer);
    var delay = Math.max(5000, logToken.expiresAt - Date.now() - RENEW_MARGIN_MS);
    renewTimer = setTimeout(function () {
      if (openPanels() > 0) fetchLogToken().catch(function () {});
    }, delay);
  }

  function currentLogToken() {
    if (logToken && logToken.expiresAt - Date.now() > 30000) return Promise.resolve(logToken.token);
    return fetchLogToken();
  }

  // ------------------------------------------------------------------ log panels
  //
  // A panel renders its log as lines, numbered as they stream: a line ends at "\n" (the raw
  // log's lines, as `grep -n` and the API's `?q=` search count them), and a line that goes on
  // across chunks stays one line. Each line is
  //   <span class="line"><a class="ln" href="#job-<id>-L12" data-n="12" data-ts="12:04:05"></a>…output…\n</span>
  // with the number and the time drawn by CSS from the attributes, so that copying the log
  // copies only the log, and a line's textContent is its text. Two elements a line, because a
  // panel holds thousands and every element costs in layout and removal.
  //
  // A line whose text starts with "--- " or "+++ " (Buildkite's convention) opens a section
  // holding the lines up to the next such line: "--- " collapsed, "+++ " expanded. Sections
  // don't nest, so a panel is: loose lines, then sections.
  //
  // Links: `#job-<id>` opens a job's panel; `#job-<id>-L<n>` opens it at line n (and `#L<n>`
  // does, on a build of one job). Each line number is such a link.

  var panels = {};
  var SECTION_HEAD = /^(---|\+\+\+) /;
  // Headers among chunks that are never rendered (see LogPanel.skip): only escapes may precede.
  var SKIPPED_HEAD = /(^|\n)((?:\x1b\[[0-9;?]*[@-~])*(---|\+\+\+) [^\n]*)/g;
  var FIND_MAX_MATCHES = 2000; // highlighted at most; past it the count says "2000+"
  var FIND_DELAY_MS = 80; // typing pauses this long before the log is searched
  // While history is still arriving, the panel is drawn at most this often: a long log's history
  // comes in many frames, and drawing 5,000 lines for each of them would only be thrown away.
  var HISTORY_DRAW_MS = 300;

  function openPanels() {
    return Object.keys(panels).filter(function (id) { return panels[id].open; }).length;
  }

  function countLines(text) {
    var n = 0;
    for (var i = text.indexOf("\n"); i !== -1; i = text.indexOf("\n", i + 1)) n++;
    return n;
  }

  // What a terminal shows of some output: its text without escape sequences.
  function visibleText(raw) { return raw.replace(OSC, "").replace(CSI, "").replace(/\x1b/g, ""); }

  function pad(n) { return n < 10 ? "0" + n : String(n); }

  // A chunk's `ts` (Unix nanoseconds, or null) as the local time of day.
  function clock(ts) {
    if (typeof ts !== "number") return "";
    var date = new Date(ts / 1e6);
    return pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
  }

  function escapeRegExp(text) { return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }

  function LogPanel(li) {
    this.li = li;
    this.jobId = li.dataset.jobId;
    this.anchor = "#job-" + this.jobId + "-L";
    this.section = li.querySelector(".log-panel");
    this.pre = li.querySelector("[data-log]");
    this.note = li.querySelector("[data-log-note]");
    this.noteLine = li.querySelector("[data-log-note-line]");
    this.status = li.querySelector("[data-log-state]");
    this.toggle = li.querySelector("[data-log-toggle]");
    this.findInput = li.querySelector("[data-log-find]");
    this.findCount = li.querySelector("[data-log-find-count]");
    this.tsToggle = li.querySelector("[data-log-ts]");
    this.converter = new AnsiConverter();
    this.queue = [];
    this.queuedLines = 0;
    this.frame = null;
    this.holdTimer = null;
    this.mustClear = false; // chunks were skipped: what the panel shows is older than all that follows
    this.lastSeq = 0;
    this.source = null;
    this.open = false;
    this.done = false;
    this.failures = 0;
    // Lines, as they stream (records: {n, ts, html, tail, plain, decided, head, ended, el, section}).
    this.lineNo = 0; // the number of the last line begun
    this.openRec = null; // the line not ended yet
    this.headRec = null; // the header of the section the next line belongs to
    this.cr = false; // a "\r" ended the last chunk: is it half of a "\r\n"?
    // What is in the DOM.
    this.shown = 0; // line elements, section headers included
    this.sections = []; // {rec, el, headEl, body, lines} in DOM order
    this.current = null; // the section lines go into (the last of this.sections), or null: loose lines
    this.target = null; // a linked line number to scroll to once it has arrived
    // Find.
    this.query = "";
    this.regex = null;
    this.matches = []; // one entry per match: its <mark> elements (a match may span several spans)
    this.currentMatch = -1;
    this.capped = false;
    this.findTimer = null;
    this.bind();
  }

  LogPanel.prototype.bind = function () {
    var panel = this;
    panel.pre.addEventListener("click", function (event) {
      var link = event.target.closest("a.ln");
      if (link) {
        event.preventDefault(); // no jump: the line is in view already
        history.replaceState(null, "", link.getAttribute("href"));
        panel.markLine(link.parentNode, false);
        return;
      }
      var head = event.target.closest(".section-head");
      // A click that ends a text selection is not a toggle.
      if (head && (event.target.closest(".fold") || !String(window.getSelection() || ""))) {
        panel.setSectionOpen(head.parentNode, head.parentNode.lastElementChild.hidden);
      }
    });
    panel.findInput.addEventListener("input", function () {
      clearTimeout(panel.findTimer);
      panel.findTimer = setTimeout(function () { panel.find(panel.findInput.value); }, FIND_DELAY_MS);
    });
    panel.findInput.addEventListener("keydown", function (event) {
      if (event.key === "Enter") {
        event.preventDefault();
        panel.findStep(event.shiftKey ? -1 : 1);
      } else if (event.key === "Escape" && panel.findInput.value) {
        panel.findInput.value = "";
        panel.findNow();
      }
    });
    panel.li.querySelector("[data-log-find-next]").addEventListener("click", function () { panel.findStep(1); });
    panel.li.querySelector("[data-log-find-prev]").addEventListener("click", function () { panel.findStep(-1); });
    panel.tsToggle.addEventListener("click", function () {
      var on = panel.tsToggle.getAttribute("aria-pressed") !== "true";
      panel.tsToggle.setAttribute("aria-pressed", on ? "true" : "false");
      panel.pre.classList.toggle("show-ts", on);
    });
  };

  LogPanel.prototype.show = function () {
    this.open = true;
    this.section.hidden = false;
    this.toggle.setAttribute("aria-expanded", "true");
    this.toggle.textContent = "Hide log";
    if (!this.done && !this.source) this.connect();
  };

  LogPanel.prototype.hide = function () {
    this.open = false;
    this.section.hidden = true;
    this.toggle.setAttribute("aria-expanded", "false");
    this.toggle.textContent = "Log";
    this.disconnect();
  };

  LogPanel.prototype.setStatus = function (text) { this.status.textContent = text; };

  LogPanel.prototype.connect = function () {
    var panel = this;
    panel.setStatus("connecting…");
    currentLogToken().then(function (token) {
      if (!panel.open || panel.done) return;
      var url = fill(config.streamUrl, panel.jobId) + "?token=" + encodeURIComponent(token);
      if (panel.lastSeq > 0) url += "&last_event_id=" + panel.lastSeq; // resume, no duplicates
      var source = new EventSource(url);
      panel.source = source;
      source.addEventListener("open", function () { panel.failures = 0; panel.setStatus("live"); });
      source.addEventListener("history", function (event) {
        var history = JSON.parse(event.data);
        panel.enqueue(history.chunks, !history.last);
      });
      source.addEventListener("chunk", function (event) { panel.enqueue([JSON.parse(event.data)]); });
      source.addEventListener("done", function () {
        // Close at once: left open, EventSource would reconnect after the server closes.
        panel.done = true;
        panel.disconnect();
        panel.setStatus("end of log");
      });
      source.addEventListener("error", function () {
        if (source.readyState !== EventSource.CLOSED) { panel.setStatus("reconnecting…"); return; }
        // Refused (an expired token is a 401): reconnect with a fresh token where we left off.
        panel.disconnect();
        panel.retry();
      });
    }).catch(function () { panel.retry(); });
  };

  LogPanel.prototype.retry = function () {
    var panel = this;
    panel.failures += 1;
    logToken = null;
    if (panel.failures > 5) {
      panel.setStatus("stream unavailable; reload the page or open the raw log");
      return;
    }
    panel.setStatus("reconnecting…");
    setTimeout(function () { if (panel.open && !panel.done && !panel.source) panel.connect(); },
               RETRY_MS * panel.failures);
  };

  LogPanel.prototype.disconnect = function () {
    if (this.source) {
      this.source.close();
      this.source = null;
    }
  };

  /* `more`: history that is still coming (drawn once it is all there, or every HISTORY_DRAW_MS). */
  LogPanel.prototype.enqueue = function (chunks, more) {
    for (var i = 0; i < chunks.length; i++) {
      var chunk = chunks[i];
      if (chunk.seq <= this.lastSeq) continue;
      this.lastSeq = chunk.seq;
      chunk.lines = countLines(chunk.content);
      this.queuedLines += chunk.lines;
      this.queue.push(chunk);
    }
    this.trim();
    var panel = this;
    if (more) {
      if (this.holdTimer === null) this.holdTimer = setTimeout(function () { panel.holdTimer = null; panel.schedule(); },
                                                               HISTORY_DRAW_MS);
      return;
    }
    clearTimeout(this.holdTimer);
    this.holdTimer = null;
    this.schedule();
  };

  LogPanel.prototype.schedule = function () {
    if (this.queue.length && this.frame === null) {
      var panel = this;
      // One DOM write per frame however many chunks arrived in between.
      this.frame = requestAnimationFrame(function () { panel.frame = null; panel.flush(); });
    }
  };

  /* Chunks older than the last MAX_LINES lines would be dropped at once anyway: they are only
   * counted and run through the converter (for its colour state), never rendered; so the queue
   * holds no more than a panel's worth of lines however much arrives at once. */
  LogPanel.prototype.trim = function () {
    if (this.queuedLines <= MAX_LINES) return;
    var queue = this.queue;
    var first = 0;
    var lines = 0;
    for (var k = queue.length - 1; k >= 0; k--) {
      lines += queue[k].lines;
      if (lines > MAX_LINES) { first = k; break; } // chunk k is cut: its newest lines stay
    }
    if (!first) return;
    for (var i = 0; i < first; i++) this.skip(queue[i]);
    this.queue = queue.slice(first);
    this.queuedLines = lines;
    this.mustClear = true;
  };

  LogPanel.prototype.flush = function () {
    var queue = this.queue;
    var cleared = this.mustClear;
    this.queue = [];
    this.queuedLines = 0;
    this.mustClear = false;
    var recs = [];
    for (var j = 0; j < queue.length; j++) this.split(queue[j], recs);
    if (cleared || recs.length) this.render(recs, cleared);
  };

  /* A new line record, numbered; it belongs to the section open now. */
  LogPanel.prototype.begin = function (ts) {
    this.lineNo += 1;
    this.openRec = { n: this.lineNo, ts: ts, html: "", tail: "", plain: "", decided: false, head: null,
                     ended: false, el: null, section: this.headRec };
    return this.openRec;
  };

  /* "\r\n" is one line end, also when a chunk ends between the two. */
  LogPanel.prototype.lineEnds = function (content) {
    var text = this.cr ? "\r" + content : content;
    text = text.replace(/\r\n/g, "\n");
    this.cr = text.charAt(text.length - 1) === "\r";
    return this.cr ? text.slice(0, -1) : text;
  };

  /* Cut a chunk into its lines (records, appended to `recs` in order; the line left open by an
   * earlier chunk comes first, continued). */
  LogPanel.prototype.split = function (chunk, recs) {
    var text = this.lineEnds(chunk.content);
    var meta = chunk.stream_kind === 2;
    var start = 0;
    while (start < text.length) {
      var end = text.indexOf("\n", start);
      var piece = text.slice(start, end === -1 ? text.length : end);
      var rec = this.openRec || this.begin(chunk.ts);
      if (recs[recs.length - 1] !== rec) recs.push(rec);
      var html = this.converter.push(piece);
      if (end !== -1) this.converter.pending = ""; // no escape sequence goes on past a line end
      if (html) {
        if (meta) html = '<span class="meta">' + html + "</span>";
        rec.html += html;
        if (rec.el) rec.tail += html; // what its element still lacks
      }
      if (!rec.decided) this.decide(rec, piece, end !== -1);
      if (end === -1) break;
      rec.ended = true;
      this.openRec = null;
      start = end + 1;
    }
  };

  /* Whether a line starts a section, once its first four characters (or its end) have arrived. */
  LogPanel.prototype.decide = function (rec, piece, ended) {
    rec.plain += visibleText(piece).slice(0, 4 - rec.plain.length);
    if (rec.plain.length < 4 && !ended) return;
    rec.decided = true;
    var head = SECTION_HEAD.exec(rec.plain);
    if (!head) return;
    rec.head = head[1];
    rec.section = rec;
    this.headRec = rec;
  };

  /* A chunk that will not be rendered: its lines are counted and its last section header (if
   * any) remembered, so the lines after it still number and group right. That header is
   * converted on its own, without the colours of the output before it. */
  LogPanel.prototype.skip = function (chunk) {
    var text = this.lineEnds(chunk.content);
    var cut = text.lastIndexOf("\n") + 1; // the unfinished last line goes through split(), as lines do
    var whole = text.slice(0, cut);
    if (whole) {
      this.converter.push(whole);
      this.converter.pending = "";
      var base = this.openRec ? this.lineNo : this.lineNo + 1; // the number of the line at offset 0
      var seen = 0;
      var counted = 0;
      var last = null;
      SKIPPED_HEAD.lastIndex = 0;
      var match;
      while ((match = SKIPPED_HEAD.exec(whole)) !== null) {
        var at = match.index + match[1].length;
        if (at === 0 && this.openRec) continue; // the rest of a line begun earlier
        seen += countLines(whole.slice(counted, at));
        counted = at;
        last = { n: base + seen, text: match[2], kind: match[3] };
      }
      if (last) {
        this.headRec = { n: last.n, ts: chunk.ts, html: new AnsiConverter().push(last.text), tail: "", plain: "",
                         decided: true, head: last.kind, ended: true, el: null, section: null };
        this.headRec.section = this.headRec;
      }
      this.lineNo = base + countLines(whole) - 1;
      this.openRec = null;
    }
    if (cut < text.length) this.split({ content: text.slice(cut), stream_kind: chunk.stream_kind, ts: chunk.ts }, []);
  };

  LogPanel.prototype.lineHtml = function (rec, count) {
    var html = '<span class="line' + (rec.head ? ' section-head" data-count="' + linesLabel(count || 0) : "") + '">' +
      '<a class="ln" href="' + this.anchor + rec.n + '" data-n="' + rec.n + '" data-ts="' + clock(rec.ts) +
      '" tabindex="-1"></a>';
    if (rec.head) {
      html += '<button type="button" class="fold" aria-label="Toggle section" aria-expanded="' +
        (rec.head === "+++") + '"></button>';
    }
    return html + rec.html + (rec.ended ? "\n" : "") + "</span>";
  };

  function linesLabel(n) { return n === 1 ? "1 line" : n + " lines"; }

  LogPanel.prototype.sectionHtml = function (sec) {
    var expanded = sec.rec.head === "+++";
    return '<span class="log-section' + (expanded ? " is-open" : "") + '">' +
      this.lineHtml(sec.rec, sec.lines) +
      '<span class="section-body"' + (expanded ? "" : " hidden") + ">" + sec.body + "</span></span>";
  };

  /* Empty the panel: everything in it is older than what comes next. */
  LogPanel.prototype.clear = function () {
    this.pre.textContent = "";
    this.shown = 0;
    this.sections = [];
    this.current = null;
    this.matches = [];
    this.currentMatch = -1;
    this.capped = false;
    this.dropped();
  };

  LogPanel.prototype.render = function (recs, cleared) {
    var pre = this.pre;
    var follow = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    var start = 0;
    if (recs.length > MAX_LINES) {
      start = recs.length - MAX_LINES;
      cleared = true;
    }
    if (cleared) this.clear();
    var fresh = [];
    var grown = null; // the line the previous frame left open, if it grew
    for (var i = start; i < recs.length; i++) {
      var rec = recs[i];
      if (rec.el && !cleared && !(rec.head && !rec.el.classList.contains("section-head"))) {
        grown = rec.el;
        if (rec.tail) grown.insertAdjacentHTML("beforeend", rec.tail);
        if (rec.ended) {
          grown.appendChild(document.createTextNode("\n"));
          rec.el = null;
        }
      } else {
        if (rec.el && !cleared) this.unrender(rec); // it turned out to start a section
        rec.el = null;
        fresh.push(rec);
      }
      rec.tail = "";
    }
    // After a clear, the section the first line belongs to has its header put back first.
    var context = fresh.length ? fresh[0].section : null;
    if (context && context !== fresh[0] && (!this.current || this.current.rec !== context)) fresh.unshift(context);
    this.append(fresh);
    this.drop();
    if (follow) pre.scrollTop = pre.scrollHeight;
    if (this.query) this.findIn(grown, fresh.length);
    if (this.target !== null) this.reveal();
  };

  /* Take out the element of the line the previous frame left open (it is the last one). */
  LogPanel.prototype.unrender = function (rec) {
    rec.el.remove();
    this.shown -= 1;
    if (this.current) {
      this.current.lines -= 1;
      this.countLabel(this.current);
    }
  };

  LogPanel.prototype.countLabel = function (sec) { sec.headEl.setAttribute("data-count", linesLabel(sec.lines)); };

  /* New lines at the end: those before a new header into the open section (or loose), each
   * header with its lines as a new section; two insertions of HTML however many lines. */
  LogPanel.prototype.append = function (fresh) {
    if (!fresh.length) return;
    var loose = "";
    var looseCount = 0;
    var added = [];
    var sec = null;
    for (var i = 0; i < fresh.length; i++) {
      var rec = fresh[i];
      if (rec.head) {
        sec = { rec: rec, el: null, headEl: null, body: "", lines: 0 };
        added.push(sec);
      } else if (sec) {
        sec.body += this.lineHtml(rec);
        sec.lines += 1;
      } else {
        loose += this.lineHtml(rec);
        looseCount += 1;
      }
    }
    var pre = this.pre;
    if (loose) {
      (this.current ? this.current.body : pre).insertAdjacentHTML("beforeend", loose);
      if (this.current) {
        this.current.lines += looseCount;
        this.countLabel(this.current);
      }
    }
    if (added.length) {
      pre.insertAdjacentHTML("beforeend", added.map(this.sectionHtml, this).join(""));
      var children = pre.children;
      for (var j = 0; j < added.length; j++) {
        var el = children[children.length - added.length + j];
        added[j].el = el;
        added[j].headEl = el.firstElementChild;
        added[j].body = el.lastElementChild;
        this.sections.push(added[j]);
      }
      this.current = added[added.length - 1];
    }
    this.shown += fresh.length;
    // Only an open line needs its element: what arrives next is appended to it.
    var last = fresh[fresh.length - 1];
    if (!last.ended) last.el = last.head ? this.current.headEl : (this.current ? this.current.body : pre).lastElementChild;
  };

  /* Keep at most MAX_LINES lines: the oldest go, loose lines first, then whole sections; of a
   * section cut in two its header stays, so that its remaining lines can still be folded. */
  LogPanel.prototype.drop = function () {
    var excess = this.shown - MAX_LINES;
    if (excess <= 0) return;
    var pre = this.pre;
    var looseEnd = null;
    var count = 0;
    for (var node = pre.firstElementChild; node && count < excess && node.classList.contains("line");
         node = node.nextElementSibling) {
      looseEnd = node;
      count += 1;
    }
    if (looseEnd) this.removeUpTo(pre.firstElementChild, looseEnd);
    excess -= count;
    this.shown -= count;
    while (excess > 0 && this.sections.length) {
      var sec = this.sections[0];
      if (sec !== this.current && sec.lines + 1 <= excess) {
        sec.el.remove();
        this.sections.shift();
        excess -= sec.lines + 1;
        this.shown -= sec.lines + 1;
        continue;
      }
      var k = Math.min(excess, sec.lines);
      if (k > 0) {
        this.removeUpTo(sec.body.firstElementChild, sec.body.children[k - 1]);
        sec.lines -= k;
        this.shown -= k;
        this.countLabel(sec);
      }
      break;
    }
    this.dropped();
    if (this.matches.length) this.forgetDropped();
  };

  LogPanel.prototype.removeUpTo = function (first, last) {
    var range = document.createRange();
    range.setStartBefore(first);
    range.setEndAfter(last);
    range.deleteContents();
  };

  LogPanel.prototype.dropped = function () { this.note.hidden = false; };

  // ------------------------------------------------------------------ sections, links

  LogPanel.prototype.setSectionOpen = function (sectionEl, open) {
    var body = sectionEl.lastElementChild;
    if (body.hidden !== open) return;
    body.hidden = !open;
    sectionEl.classList.toggle("is-open", open);
    sectionEl.firstElementChild.querySelector(".fold").setAttribute("aria-expanded", open ? "true" : "false");
  };

  /* Make a line visible: its section opened, scrolled into the middle of the panel. */
  LogPanel.prototype.bringIntoView = function (node) {
    var sectionEl = node.closest(".log-section");
    if (sectionEl && node.closest(".section-body")) this.setSectionOpen(sectionEl, true);
    node.scrollIntoView({ block: "center" });
  };

  LogPanel.prototype.markLine = function (line, scroll) {
    var previous = this.pre.querySelector(".line.is-target");
    if (previous) previous.classList.remove("is-target");
    line.classList.add("is-target");
    if (scroll) this.bringIntoView(line);
  };

  /* Go to the linked line once it has arrived; say so if it is older than what the panel keeps. */
  LogPanel.prototype.reveal = function () {
    var link = this.pre.querySelector('a.ln[data-n="' + this.target + '"]');
    if (link) {
      this.markLine(link.parentNode, true);
      this.target = null;
    } else if (this.lineNo > this.target) {
      this.noteLine.textContent = " (line " + this.target + " is in it)";
      this.target = null;
    }
  };

  LogPanel.prototype.goToLine = function (n) {
    this.target = n;
    this.noteLine.textContent = "";
    this.reveal();
  };

  // ------------------------------------------------------------------ find

  LogPanel.prototype.findNow = function () {
    clearTimeout(this.findTimer);
    if (this.findInput.value === this.query) return false;
    this.find(this.findInput.value);
    return true;
  };

  /* Next or previous match; a query typed but not searched yet is searched first (and its first
   * match is the one gone to). */
  LogPanel.prototype.findStep = function (direction) {
    if (!this.findNow()) this.step(direction);
  };

  /* Highlight every match of `query` (a plain substring, any case, as the API's `?q=`) in
   * what is loaded, and go to the first. */
  LogPanel.prototype.find = function (query) {
    this.unmark(this.matches);
    this.matches = [];
    this.currentMatch = -1;
    this.capped = false;
    this.query = query;
    this.regex = query ? new RegExp(escapeRegExp(query), "gi") : null;
    if (query) {
      this.markAll(this.pre.querySelectorAll(".line"), 0);
      if (this.matches.length) this.step(1);
    }
    this.showCount();
  };

  /* New output while a find is on: the grown line searched again, the new lines searched. */
  LogPanel.prototype.findIn = function (grown, freshCount) {
    var lcs = this.pre.querySelectorAll(".line");
    var from = lcs.length - freshCount;
    if (grown) {
      var gone = [];
      while (this.matches.length && grown.contains(this.matches[this.matches.length - 1][0])) gone.push(this.matches.pop());
      if (gone.length) {
        if (this.currentMatch >= this.matches.length) this.currentMatch = -1;
        this.unmark(gone);
        this.capped = false;
      }
      from -= 1;
    }
    this.markAll(lcs, Math.max(from, 0));
    this.showCount();
  };

  LogPanel.prototype.forgetDropped = function () {
    var current = this.matches[this.currentMatch];
    this.matches = this.matches.filter(function (marks) { return marks[0].isConnected; });
    this.currentMatch = current ? this.matches.indexOf(current) : -1;
    this.showCount();
  };

  LogPanel.prototype.markAll = function (lcs, from) {
    for (var i = from; i < lcs.length && !this.capped; i++) {
      var lc = lcs[i];
      if (lc.textContent.search(this.regex) === -1) continue;
      var found = markMatches(lc, this.regex, FIND_MAX_MATCHES - this.matches.length);
      for (var j = 0; j < found.length; j++) this.matches.push(found[j]);
      if (this.matches.length >= FIND_MAX_MATCHES) this.capped = true;
    }
  };

  LogPanel.prototype.unmark = function (matches) {
    var parents = [];
    matches.forEach(function (marks) {
      marks.forEach(function (mark) {
        var parent = mark.parentNode;
        if (!parent) return;
        parent.replaceChild(mark.firstChild, mark);
        if (parents.indexOf(parent) === -1) parents.push(parent);
      });
    });
    parents.forEach(function (parent) { parent.normalize(); });
  };

  LogPanel.prototype.step = function (direction) {
    var total = this.matches.length;
    if (!total) return;
    var previous = this.matches[this.currentMatch];
    if (previous) previous.forEach(function (mark) { mark.classList.remove("current"); });
    this.currentMatch = this.currentMatch === -1 ? (direction > 0 ? 0 : total - 1)
                                                 : (this.currentMatch + direction + total) % total;
    var marks = this.matches[this.currentMatch];
    marks.forEach(function (mark) { mark.classList.add("current"); });
    this.bringIntoView(marks[0]);
    this.showCount();
  };

  LogPanel.prototype.showCount = function () {
    var total = this.matches.length;
    var more = this.capped ? "+" : "";
    var text = "";
    if (this.query) {
      if (!total) text = "no matches";
      else if (this.currentMatch >= 0) text = (this.currentMatch + 1) + " of " + total + more;
      else text = total + more + (total === 1 ? " match" : " matches");
    }
    this.findCount.textContent = text;
  };

  /* Wrap each match of `regex` in the text of the line `lc` in <mark class="find">: one per text
   * node it covers, since a match can run across colour spans. Returns the matches' marks, in order. */
  function markMatches(lc, regex, max) {
    var text = lc.textContent;
    var spans = [];
    var match;
    regex.lastIndex = 0;
    while (spans.length < max && (match = regex.exec(text)) !== null) spans.push([match.index, match.index + match[0].length]);
    var nodes = [];
    var walker = document.createTreeWalker(lc, NodeFilter.SHOW_TEXT);
    for (var node = walker.nextNode(), at = 0; node; at += node.data.length, node = walker.nextNode()) {
      nodes.push({ node: node, start: at });
    }
    var result = [];
    // From the last match back: splitting a text node only shortens it from its end, so the
    // offsets of everything before stay right.
    for (var i = spans.length - 1; i >= 0; i--) {
      var marks = [];
      for (var j = nodes.length - 1; j >= 0; j--) {
        var start = nodes[j].start;
        var target = nodes[j].node;
        var end = start + target.data.length;
        if (end <= spans[i][0] || start >= spans[i][1]) continue;
        var to = Math.min(spans[i][1], end) - start;
        var from = Math.max(spans[i][0], start) - start;
        if (to < target.data.length) target.splitText(to);
        if (from > 0) target = target.splitText(from);
        var mark = document.createElement("mark");
        mark.className = "find";
        target.parentNode.replaceChild(mark, target);
        mark.appendChild(target);
        marks.unshift(mark);
      }
      result.unshift(marks);
    }
    return result;
  }

  // ------------------------------------------------------------------ the panels, and links to them

  var jobIds = [];
  Array.prototype.forEach.call(document.querySelectorAll("#jobs .job"), function (li) {
    var panel = new LogPanel(li);
    panels[panel.jobId] = panel;
    jobIds.push(panel.jobId);
    panel.toggle.addEventListener("click", function () {
      if (panel.open) {
        panel.hide();
        var linked = parseHash(location.hash);
        if (linked && linked.jobId === panel.jobId) history.replaceState(null, "", location.pathname + location.search);
      } else {
        panel.show();
        history.replaceState(null, "", "#job-" + panel.jobId); // a link to this build with this log open
      }
    });
  });

  /* `#job-<id>`, `#job-<id>-L<n>`, or (a build of one job) `#L<n>`: {jobId, line (or null)}. */
  function parseHash(hash) {
    var match = /^#job-(.+?)(?:-L([1-9][0-9]{0,9}))?$/.exec(hash);
    if (match) return { jobId: match[1], line: match[2] ? parseInt(match[2], 10) : null };
    match = /^#L([1-9][0-9]{0,9})$/.exec(hash);
    if (match && jobIds.length === 1) return { jobId: jobIds[0], line: parseInt(match[1], 10) };
    return null;
  }

  function followHash() {
    var linked = parseHash(location.hash);
    var panel = linked && panels[linked.jobId];
    if (!panel) return;
    if (!panel.open) panel.show();
    if (linked.line) panel.goToLine(linked.line);
  }

  followHash();
  window.addEventListener("hashchange", followHash);

  // ------------------------------------------------------------------ live states

  var buildBadge = document.querySelector("h1 .badge");
  var cancelForm = document.getElementById("cancel-form");
  var approveForm = document.getElementById("approve-form");
  var pollTimer = null;

  function applyStatus(status) {
    var build = status.build;
    setBadge(buildBadge, build.state);
    var duration = document.querySelector("[data-build-duration]");
    if (duration) duration.textContent = build.duration || "—";
    var error = document.querySelector("[data-build-error]");
    if (error) {
      error.hidden = !build.error_code;
      error.querySelector("[data-build-error-code]").textContent = build.error_code || "";
      error.querySelector("[data-build-error-message]").textContent = build.error_message || "";
    }
    var waiting = document.querySelector("[data-build-waiting]");
    if (waiting) {
      // Admitted (a concurrency slot freed): the note goes.
      waiting.hidden = !build.waiting_reason;
      waiting.textContent = build.waiting_reason || "";
    }
    if (cancelForm && !build.cancelable) cancelForm.hidden = true;
    // Approved or canceled meanwhile (another tab, the API): nothing is held any more.
    if (approveForm && build.state !== "held") approveForm.hidden = true;
    status.jobs.forEach(function (job) {
      var li = document.getElementById("job-" + job.id);
      if (!li) {
        // A new attempt (an automatic retry, or a retry from another tab or the API).
        stopLive("A job was retried; reload the page to follow its new attempt.");
        return;
      }
      var retryForm = li.querySelector("[data-retry-form]");
      if (retryForm) retryForm.hidden = !job.retryable;
      li.dataset.jobState = job.state;
      setBadge(li.querySelector(".job-head .badge"), job.state);
      li.querySelector("[data-job-duration]").textContent = job.duration;
      li.querySelector("[data-job-exit]").textContent = job.exit_code === null ? "" : "exit " + job.exit_code;
      var waiting = li.querySelector("[data-job-waiting]");
      waiting.hidden = !job.waiting_reason;
      waiting.textContent = job.waiting_reason || "";
      var jobError = li.querySelector("[data-job-error]");
      jobError.hidden = !job.error_code;
      jobError.textContent = job.error_code ? job.error_code + ": " + (job.error_message || "") : "";
    });
    document.body.dataset.buildState = build.state;
    // The graph and the timeline (build-graph.js) redraw from the same answer.
    document.dispatchEvent(new CustomEvent("harmont:status", { detail: status }));
    return build.finished;
  }

  function stopLive(message) {
    var note = document.querySelector("[data-live-note]");
    if (note) {
      note.textContent = message;
      note.hidden = false;
    }
  }

  function poll() {
    pollTimer = null;
    if (document.hidden) { // no point redrawing a page nobody looks at
      pollTimer = setTimeout(poll, POLL_MS * 3);
      return;
    }
    fetch(config.statusUrl, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.status === 401 || response.status === 404) {
          // Signed out, or no longer a member: retrying can't help.
          stopLive(response.status === 401 ? "You were signed out; reload the page to sign in and follow this build again."
                                           : "This build is no longer visible to you.");
          return;
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json().then(function (status) {
          if (!applyStatus(status)) pollTimer = setTimeout(poll, POLL_MS);
        });
      })
      .catch(function () { pollTimer = setTimeout(poll, POLL_MS * 5); });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && pollTimer !== null) {
      clearTimeout(pollTimer);
      poll();
    }
  });

  if (!config.finished) pollTimer = setTimeout(poll, POLL_MS);
})();
