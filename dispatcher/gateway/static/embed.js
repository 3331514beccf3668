/*
 * spinyard embed: show a spinyard app in any page.
 *
 *   <div data-spinyard-app="owner/title"></div>
 *   <script src="https://gateway.example/embed.js"></script>
 *
 * For each such element it sends a page_load event to the gateway this
 * script came from, follows the app's status over Server-Sent Events, shows
 * progress, swaps in the app's <iframe> when it is ready, and sends a
 * heartbeat every 30 s (data-heartbeat-s) while the page is visible and
 * focused and the viewer acted within the last 300 s (data-input-window-s,
 * the app's idle.input_window_s): a beat the app would not count is not sent,
 * so a forgotten tab costs nothing. No dependencies.
 *
 * Element attributes: data-spinyard-app (required), data-heartbeat-s, data-input-window-s,
 * data-height (iframe height, default 600px), data-token (bearer token),
 * data-session (the session id, when the token is bound to one),
 * data-gateway (gateway base URL, default: this script's origin).
 *
 * window.spinyard: embed(el), run(app, inputs, opts) -> Promise<job_id>,
 * watchJob(job_id, onStatus) -> {close()}, preview(result) -> element,
 * setToken(t), session(), base.
 * An app inside the iframe may post {spinyard: "activity"} to its parent to
 * say the viewer is active (input inside a cross-origin iframe is invisible
 * to this page).
 */
(function () {
  "use strict";
  if (window.spinyard && window.spinyard.version) return;
  // A page whose token is bound to a session names it: <div data-session="...">.
  var fixedSession = null;

  var script = document.currentScript;
  var BASE = script && script.src ? new URL(script.src, location.href).origin : location.origin;
  var SESSION_KEY = "spinyard.session";
  var LIVE = { queued: true, pending: true, starting: true, ready: true };
  var ENDED = { stopping: true, stopped: true, failed: true };
  var JOB_DONE = { succeeded: true, failed: true, cancelled: true, timed_out: true };
  var globalToken = (script && script.getAttribute("data-token")) || null;
  var memorySession = null;
  var lastInput = Date.now();

  function randomHex(n) {
    var bytes = new Uint8Array(Math.ceil(n / 2));
    if (window.crypto && window.crypto.getRandomValues) {
      window.crypto.getRandomValues(bytes);
    } else {
      for (var i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    }
    return Array.prototype.map.call(bytes, function (b) {
      return ("0" + b.toString(16)).slice(-2);
    }).join("").slice(0, n);
  }

  /** This tab's session id: kept in sessionStorage, so a reload keeps the same instance. */
  function session() {
    if (fixedSession) return fixedSession;
    try {
      var sid = window.sessionStorage.getItem(SESSION_KEY);
      if (!sid) {
        sid = "s-" + randomHex(20);
        window.sessionStorage.setItem(SESSION_KEY, sid);
      }
      return sid;
    } catch (e) {
      // Storage blocked (sandboxed frame, privacy mode): one id for this page's life.
      memorySession = memorySession || "s-" + randomHex(20);
      return memorySession;
    }
  }

  function headers(token) {
    var h = { "Content-Type": "application/json" };
    if (token) h.Authorization = "Bearer " + token;
    return h;
  }

  /** POST one event; resolves with the 202 body, rejects with an Error carrying .code/.status. */
  function postEvent(base, token, event) {
    event.id = "ev-" + randomHex(32);
    return fetch(base + "/v1/events", {
      method: "POST",
      headers: headers(token),
      body: JSON.stringify(event),
      mode: "cors",
      credentials: "omit",
    }).then(function (resp) {
      return resp.json().catch(function () { return {}; }).then(function (body) {
        if (resp.status === 202) return body;
        var info = (body && body.error) || {};
        var err = new Error(info.message || "the gateway answered " + resp.status);
        err.code = info.code || "http_" + resp.status;
        err.status = resp.status;
        throw err;
      });
    });
  }

  /** URL of a status stream; EventSource cannot send headers, so the token rides in the query. */
  function statusUrl(base, path, params, token) {
    var url = new URL(base + path);
    Object.keys(params).forEach(function (k) { url.searchParams.set(k, params[k]); });
    if (token) url.searchParams.set("token", token);
    return url.toString();
  }

  ["pointerdown", "pointermove", "keydown", "scroll", "wheel", "touchstart"].forEach(function (t) {
    window.addEventListener(t, function () { lastInput = Date.now(); }, { passive: true, capture: true });
  });
  window.addEventListener("message", function (e) {
    if (e.data && e.data.spinyard === "activity") lastInput = Date.now();
  });

  function Embed(el) {
    this.el = el;
    this.app = el.getAttribute("data-spinyard-app");
    this.base = (el.getAttribute("data-gateway") || BASE).replace(/\/+$/, "");
    this.heartbeatS = parseFloat(el.getAttribute("data-heartbeat-s")) || 30;
    this.inputWindowS = parseFloat(el.getAttribute("data-input-window-s")) || 300;
    this.height = el.getAttribute("data-height") || "600px";
    if (el.getAttribute("data-session")) fixedSession = el.getAttribute("data-session");
    this.source = null;
    this.beat = null;
    this.ticker = null;
    this.frame = null;
    this.pointerOver = false;
    this.box = document.createElement("div");
    this.box.className = "spinyard-status";
    this.box.setAttribute("role", "status");
    this.box.style.cssText = "font:14px system-ui,sans-serif;color:#444;padding:1rem;" +
      "border:1px solid #ddd;border-radius:6px;background:#fafafa";
    el.appendChild(this.box);
  }

  Embed.prototype.token = function () {
    return this.el.getAttribute("data-token") || globalToken;
  };

  /** Whole seconds in a message: "within 89.9937 s" reads "within 90 s". */
  function roundSeconds(text) {
    return String(text).replace(/(\d+\.\d+)(\s*s\b)/g, function (_, n, unit) {
      return Math.round(parseFloat(n)) + unit;
    });
  }

  Embed.prototype.say = function (text, action, detail) {
    if (this.frame) { this.frame.remove(); this.frame = null; }
    this.box.style.display = "";
    this.box.textContent = text;
    if (detail) {
      // The app's own log lines, as text (never markup), scrollable, below the message.
      var pre = document.createElement("pre");
      pre.textContent = detail;
      pre.style.cssText = "margin:0.5rem 0;max-height:12rem;overflow:auto;white-space:pre-wrap;" +
        "font:12px ui-monospace,monospace;background:#f0f0f0;padding:0.5rem;border-radius:4px";
      this.box.appendChild(pre);
    }
    if (action) {
      var button = document.createElement("button");
      button.type = "button";
      button.textContent = action.label;
      button.style.marginLeft = "0.75rem";
      button.addEventListener("click", action.run);
      this.box.appendChild(button);
    }
  };

  /** Send a page load, follow status, heartbeat: everything starts here (and on "Start again"). */
  Embed.prototype.start = function () {
    var self = this;
    this.stop();
    this.ended = false;
    this.live = false;
    this.acceptedAt = null;
    this.held = null;
    this.instance = null;
    this.kept = false;
    this.startedAt = Date.now();
    this.say("Loading " + this.app + "…");
    this.listen();
    postEvent(this.base, this.token(), { type: "page_load", app: this.app, session: session() })
      .then(function (answer) {
        if (self.ended) return;
        self.acceptedAt = typeof answer.time === "number" ? answer.time : Date.now() / 1000;
        self.beat = setInterval(function () { self.heartbeat(); }, self.heartbeatS * 1000);
        if (self.held) self.onStatus(self.held.st, self.held.snapshot);
      })
      .catch(function (err) {
        self.stop();
        self.say("Could not load " + self.app + ": " + err.message, {
          label: "Try again", run: function () { self.start(); },
        });
      });
  };

  Embed.prototype.listen = function () {
    var self = this;
    var url = statusUrl(this.base, "/v1/apps/" + this.app + "/status", { session: session() },
      this.token());
    var source = new EventSource(url);
    var first = true; // each connection's first status is the one current as it opened
    this.source = source;
    source.onopen = function () { first = true; };
    source.addEventListener("status", function (e) {
      var st;
      try { st = JSON.parse(e.data); } catch (err) { return; }
      var snapshot = first;
      first = false;
      if (self.acceptedAt === null) { self.held = { st: st, snapshot: snapshot }; return; }
      self.onStatus(st, snapshot);
    });
    source.onerror = function () {
      // A network blip reconnects by itself; an error answer closes the stream for good.
      if (source.readyState === EventSource.CLOSED && self.source === source && !self.ended) {
        self.source = null;
        setTimeout(function () { if (!self.ended && !self.source) self.listen(); }, 5000);
      }
    };
  };

  /** `snapshot`: the status was current when the stream opened, not a change seen since. */
  Embed.prototype.onStatus = function (st, snapshot) {
    var self = this;
    // Before our page load shows up, an old stopped/failed status is history, not news:
    // a snapshot from before the load was accepted (say the failure "Start again" answers),
    // or a change stamped well before it (2 s: the gateway's and handlers' clocks may differ).
    var t = st.time || 0;
    if (!this.live && ENDED[st.state] && ((snapshot && t < this.acceptedAt) || t < this.acceptedAt - 2)) {
      return;
    }
    // After an update, a shared app's status is about the new revision's instance; a page
    // showing an older one keeps it (and its heartbeats name it) until it ends. Only once a
    // status since this page's load named it: a status held from before may be stale.
    if (this.frame && this.kept && st.instance && st.instance !== this.instance) return;
    if (LIVE[st.state]) this.live = true;
    // A queue position published just after this instance started is stale.
    if (st.state === "queued" && st.instance && st.instance === this.begun) return;
    if (st.state === "starting" || st.state === "ready") this.begun = st.instance;
    if (st.state === "queued") {
      this.progress(st.state, st.position);
    } else if (st.state === "pending" || st.state === "starting") {
      this.progress(st.state);
    } else if (st.state === "ready" && st.url) {
      this.instance = st.instance || null;
      this.kept = !!st.instance && (st.time || 0) >= this.acceptedAt;
      this.show(new URL(st.url, this.base + "/").toString());
    } else if (st.state === "stopping") {
      this.say(this.app + " is stopping…");
    } else if (st.state === "stopped" || st.state === "failed") {
      var message = st.state === "failed"
        ? this.app + " failed: " + roundSeconds((st.error && st.error.message) || "unknown error")
        : this.app + " was stopped" + (st.reason ? " (" + st.reason.replace(/_/g, " ") + ")" : "") + ".";
      this.stop();
      this.say(message, { label: "Start again", run: function () { self.start(); } },
        st.state === "failed" ? st.log_tail : null);
    }
  };

  Embed.prototype.progress = function (state, position) {
    var self = this;
    clearInterval(this.ticker);
    var word = state === "starting" ? "Starting " : "Waiting for ";
    var place = state === "queued" && position ? " (number " + position + " in line)" : "";
    var draw = function () {
      var s = Math.round((Date.now() - self.startedAt) / 1000);
      self.say(word + self.app + place + "… " + s + " s");
    };
    draw();
    this.ticker = setInterval(draw, 1000);
  };

  Embed.prototype.show = function (url) {
    var self = this;
    clearInterval(this.ticker);
    if (this.frame && this.frame.getAttribute("src") === url) return;
    if (this.frame) this.frame.remove();
    var frame = document.createElement("iframe");
    frame.src = url;
    frame.title = this.app;
    frame.setAttribute("allow", "fullscreen; clipboard-read; clipboard-write");
    frame.style.cssText = "width:100%;border:0;display:block;height:" + this.height;
    frame.addEventListener("mouseenter", function () { self.pointerOver = true; lastInput = Date.now(); });
    frame.addEventListener("mouseleave", function () { self.pointerOver = false; });
    this.box.style.display = "none";
    this.el.appendChild(frame);
    this.frame = frame;
  };

  Embed.prototype.heartbeat = function () {
    var inFrame = this.frame && document.activeElement === this.frame && this.pointerOver;
    var idle = inFrame ? 0 : Math.max(0, (Date.now() - lastInput) / 1000);
    var visible = document.visibilityState === "visible";
    var focused = document.hasFocus();
    // The gateway's handler counts a beat only from a visible, focused page whose viewer
    // acted recently; one that would not count is not sent.
    if (!visible || !focused || idle > this.inputWindowS) return;
    postEvent(this.base, this.token(), {
      type: "heartbeat",
      app: this.app,
      session: session(),
      visible: visible,
      focused: focused,
      idle_s: Math.round(idle * 10) / 10,
      instance: this.instance || undefined,
    }).catch(function () { /* the next beat tries again */ });
  };

  /** Stop heartbeats and status; the iframe (if any) stays until something replaces it. */
  Embed.prototype.stop = function () {
    this.ended = true;
    clearInterval(this.beat);
    clearInterval(this.ticker);
    this.beat = this.ticker = null;
    if (this.source) { this.source.close(); this.source = null; }
  };

  function embed(el) {
    if (el.__spinyard) return el.__spinyard;
    var handle = new Embed(el);
    el.__spinyard = handle;
    handle.start();
    return handle;
  }

  function scan() {
    var found = document.querySelectorAll("[data-spinyard-app]");
    for (var i = 0; i < found.length; i++) embed(found[i]);
  }

  /** Ask for one run of a job app; resolves with its job id. */
  function run(app, inputs, opts) {
    opts = opts || {};
    var event = { type: "run_request", app: app, session: session(), inputs: inputs || {} };
    if (opts.idempotencyKey) event.idempotency_key = opts.idempotencyKey;
    return postEvent(opts.gateway || BASE, opts.token || globalToken, event)
      .then(function (answer) { return answer.job_id; });
  }

  /** Call onStatus(status) with a job's current status and each change; stops when it ends. */
  function watchJob(jobId, onStatus, opts) {
    opts = opts || {};
    var url = statusUrl(opts.gateway || BASE, "/v1/jobs/" + encodeURIComponent(jobId) + "/status",
      {}, opts.token || globalToken);
    var source = new EventSource(url);
    var moved = false; // past queued: a late queue position update is stale
    source.addEventListener("status", function (e) {
      var st;
      try { st = JSON.parse(e.data); } catch (err) { return; }
      if (st.state === "queued" && moved) return;
      if (st.state !== "queued") moved = true;
      if (JOB_DONE[st.state]) source.close();
      onStatus(st);
    });
    return { close: function () { source.close(); } };
  }

  /*
   * Result previews: what a run produced, shown rather than linked. Everything is read
   * through the result's presigned URL (the object store answers CORS for it), and all
   * of it is put in the page as text or as an <img>, never as markup.
   */
  var PREVIEW_ROWS = 20;
  var PREVIEW_BYTES = 2 * 1024 * 1024;

  function el(tag, css, text) {
    var node = document.createElement(tag);
    if (css) node.style.cssText = css;
    if (text != null) node.textContent = text;
    return node;
  }

  /** RFC 4180 CSV: quoted fields, doubled quotes, CRLF or LF. */
  function parseCsv(text) {
    var rows = [], row = [], field = "", quoted = false;
    for (var i = 0; i < text.length; i++) {
      var c = text[i];
      if (quoted) {
        if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
        else if (c === '"') quoted = false;
        else field += c;
      } else if (c === '"') quoted = true;
      else if (c === ",") { row.push(field); field = ""; }
      else if (c === "\n" || c === "\r") {
        if (c === "\r" && text[i + 1] === "\n") i++;
        row.push(field); rows.push(row); row = []; field = "";
      } else field += c;
    }
    if (field !== "" || row.length) { row.push(field); rows.push(row); }
    return rows;
  }

  function csvTable(rows) {
    var table = el("table", "border-collapse:collapse;font:12px ui-monospace,monospace;margin:.4rem 0");
    rows.slice(0, PREVIEW_ROWS + 1).forEach(function (cells, i) {
      var tr = el("tr");
      cells.forEach(function (cell) {
        tr.appendChild(el(i ? "td" : "th", "border:1px solid #ddd;padding:2px 6px;text-align:right", cell));
      });
      table.appendChild(tr);
    });
    if (rows.length > PREVIEW_ROWS + 1) {
      var more = el("caption", "caption-side:bottom;color:#667085;text-align:left",
        "first " + PREVIEW_ROWS + " of " + (rows.length - 1) + " rows");
      table.appendChild(more);
    }
    return table;
  }

  var COLORS = ["#2f6fed", "#d92d20", "#079455", "#dc6803", "#7a5af8", "#0e9384", "#dd2590", "#475467"];

  /** A line chart (SVG) of columns `chart.y` against `chart.x`, with a legend. */
  function csvChart(rows, chart) {
    var head = rows[0] || [], body = rows.slice(1).filter(function (r) { return r.length === head.length; });
    var xi = head.indexOf(chart.x);
    var series = chart.y.map(function (name) { return { name: name, i: head.indexOf(name) }; })
      .filter(function (s) { return s.i >= 0; });
    if (xi < 0 || !series.length || body.length < 2) return null;
    var num = function (v) { return parseFloat(v); };
    var xs = body.map(function (r) { return num(r[xi]); });
    var all = [];
    series.forEach(function (s) { body.forEach(function (r) { all.push(num(r[s.i])); }); });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min(0, Math.min.apply(null, all)), y1 = Math.max.apply(null, all);
    if (!isFinite(x0 + x1 + y0 + y1) || x1 === x0 || y1 === y0) return null;
    var W = 560, H = 220, P = 36, ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", chart.y.join(", ") + " by " + chart.x);
    svg.style.cssText = "width:100%;max-width:" + W + "px;display:block;margin:.4rem 0";
    var sx = function (v) { return P + (v - x0) / (x1 - x0) * (W - 2 * P); };
    var sy = function (v) { return H - P + (y0 - v) / (y1 - y0) * (H - 2 * P); };
    var axis = document.createElementNS(ns, "path");
    axis.setAttribute("d", "M" + P + " " + (H - P) + "H" + (W - P) + "M" + P + " " + (H - P) + "V" + P);
    axis.setAttribute("stroke", "#98a2b3");
    svg.appendChild(axis);
    [[x0, sx(x0), H - P + 14, "middle"], [x1, sx(x1), H - P + 14, "middle"],
     [y1, P - 4, sy(y1) + 4, "end"], [y0, P - 4, sy(y0) + 4, "end"]].forEach(function (t) {
      var label = document.createElementNS(ns, "text");
      label.setAttribute("x", t[1]); label.setAttribute("y", t[2]);
      label.setAttribute("text-anchor", t[3]); label.setAttribute("font-size", "10");
      label.textContent = String(t[0]);
      svg.appendChild(label);
    });
    series.forEach(function (s, k) {
      var line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", body.map(function (r, j) {
        return sx(xs[j]).toFixed(1) + "," + sy(num(r[s.i])).toFixed(1);
      }).join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", COLORS[k % COLORS.length]);
      line.setAttribute("stroke-width", "2");
      line.setAttribute("data-series", s.name);
      svg.appendChild(line);
      var key = document.createElementNS(ns, "text");
      key.setAttribute("x", W - P); key.setAttribute("y", P + 12 * k);
      key.setAttribute("text-anchor", "end"); key.setAttribute("font-size", "11");
      key.setAttribute("fill", COLORS[k % COLORS.length]);
      key.textContent = s.name;
      svg.appendChild(key);
    });
    return svg;
  }

  /** An element showing one result of a run: its link, and below it what it holds. */
  function preview(result) {
    var box = el("div", "margin:.6rem 0");
    box.className = "spinyard-result";
    var link = el("a", "", result.name || result.key);
    link.href = result.url;
    link.target = "_blank";
    link.rel = "noopener";
    box.append(link, result.size != null ? " (" + result.size + " bytes)" : "");
    var type = (result.type || "").split(";")[0];
    var body = el("div");
    box.appendChild(body);
    if (type.indexOf("image/") === 0) {
      var img = el("img", "max-width:100%;display:block;margin:.4rem 0");
      img.alt = result.name || "";
      img.src = result.url;
      body.appendChild(img);
      return box;
    }
    var text = type === "text/csv" || type === "application/json" || type.indexOf("text/") === 0;
    if (!text || (result.size != null && result.size > PREVIEW_BYTES)) return box;
    fetch(result.url).then(function (r) {
      if (!r.ok) throw new Error(String(r.status));
      return r.text();
    }).then(function (content) {
      if (type === "text/csv") {
        var rows = parseCsv(content);
        var drawn = result.chart ? csvChart(rows, result.chart) : null;
        if (drawn) body.appendChild(drawn);
        body.appendChild(csvTable(rows));
      } else {
        if (type === "application/json") {
          try { content = JSON.stringify(JSON.parse(content), null, 2); } catch (e) { /* as sent */ }
        }
        body.appendChild(el("pre", "background:#f3f4f6;padding:.5rem;border-radius:6px;" +
          "overflow:auto;max-height:16rem;font:12px ui-monospace,monospace", content));
      }
    }).catch(function (err) {
      body.appendChild(el("span", "color:#667085", " (no preview: " + err.message + ")"));
    });
    return box;
  }

  window.spinyard = {
    version: 1,
    base: BASE,
    embed: embed,
    run: run,
    watchJob: watchJob,
    preview: preview,
    session: session,
    setToken: function (t) { globalToken = t || null; },
  };

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", scan);
  } else {
    scan();
  }
})();
