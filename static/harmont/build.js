/* The build page, kept current without reloading:
 * - job and build states: polls the page's status.json every ~2 s until the build is finished;
 * - a job's log: an EventSource on /v0/jobs/<id>/logs?token=<log token>, the token fetched from
 *   log-token.json and renewed before it expires; ANSI colours rendered; DOM writes batched per
 *   animation frame and capped, so a fast or huge log doesn't freeze the tab.
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

  var panels = {};

  function openPanels() {
    return Object.keys(panels).filter(function (id) { return panels[id].open; }).length;
  }

  function LogPanel(li) {
    this.li = li;
    this.jobId = li.dataset.jobId;
    this.section = li.querySelector(".log-panel");
    this.pre = li.querySelector("[data-log]");
    this.note = li.querySelector("[data-log-note]");
    this.status = li.querySelector("[data-log-state]");
    this.toggle = li.querySelector("[data-log-toggle]");
    this.converter = new AnsiConverter();
    this.queue = [];
    this.frame = null;
    this.batches = []; // [{node, lines}] in DOM order, so the oldest can be dropped cheaply
    this.lines = 0;
    this.lastSeq = 0;
    this.source = null;
    this.open = false;
    this.done = false;
    this.failures = 0;
  }

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
      source.addEventListener("history", function (event) { panel.enqueue(JSON.parse(event.data).chunks); });
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

  LogPanel.prototype.enqueue = function (chunks) {
    for (var i = 0; i < chunks.length; i++) {
      var chunk = chunks[i];
      if (chunk.seq <= this.lastSeq) continue;
      this.lastSeq = chunk.seq;
      this.queue.push(chunk);
    }
    if (this.queue.length && this.frame === null) {
      var panel = this;
      // One DOM write per frame however many chunks arrived in between.
      this.frame = requestAnimationFrame(function () { panel.frame = null; panel.flush(); });
    }
  };

  function countLines(text) {
    var n = 0;
    for (var i = text.indexOf("\n"); i !== -1; i = text.indexOf("\n", i + 1)) n++;
    return n;
  }

  LogPanel.prototype.flush = function () {
    var queue = this.queue;
    this.queue = [];
    // Chunks that would be dropped at once anyway are only run through the converter (to keep
    // its colour state), never rendered.
    var keep = 0;
    var lines = 0;
    for (var k = queue.length - 1; k >= 0; k--) {
      lines += countLines(queue[k].content);
      if (lines > MAX_LINES && keep > 0) break;
      keep++;
    }
    var html = "";
    var added = 0;
    for (var i = 0; i < queue.length; i++) {
      var part = this.converter.push(queue[i].content);
      if (i < queue.length - keep) { this.dropped(); continue; }
      added += countLines(queue[i].content);
      html += queue[i].stream_kind === 2 ? '<span class="meta">' + part + "</span>" : part;
    }
    if (!html) return;
    var pre = this.pre;
    var follow = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    var node = document.createElement("span");
    node.innerHTML = html;
    pre.appendChild(node);
    this.batches.push({ node: node, lines: added });
    this.lines += added;
    while (this.lines > MAX_LINES && this.batches.length > 1) {
      var oldest = this.batches.shift();
      oldest.node.remove();
      this.lines -= oldest.lines;
      this.dropped();
    }
    if (follow) pre.scrollTop = pre.scrollHeight;
  };

  LogPanel.prototype.dropped = function () { this.note.hidden = false; };

  Array.prototype.forEach.call(document.querySelectorAll("#jobs .job"), function (li) {
    var panel = new LogPanel(li);
    panels[panel.jobId] = panel;
    panel.toggle.addEventListener("click", function () {
      if (panel.open) {
        panel.hide();
        if (location.hash === "#job-" + panel.jobId) history.replaceState(null, "", location.pathname + location.search);
      } else {
        panel.show();
        history.replaceState(null, "", "#job-" + panel.jobId); // a link to this build with this log open
      }
    });
  });

  var linked = /^#job-(.+)$/.exec(location.hash);
  if (linked && panels[linked[1]]) panels[linked[1]].show();

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
