// The page at /: photos in, the service's answer out, and the loaded models on accuracy against MACs.
// Plain DOM code, no library. The API key, when the service asks for one, lives in `key` below and nowhere
// else: no localStorage, no cookie, gone when the tab closes. Every URL is relative, so the page also works
// behind a path prefix.
(function () {
  "use strict";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let key = null;
  let models = []; // the serving models from /models
  let defaultModel = null;
  let files = [];
  let answered = new Set(); // the model(s) that answered last: ringed on the chart

  // --- small helpers ---------------------------------------------------------------------------------
  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (key) h["X-API-Key"] = key;
    return h;
  }

  function make(tag, props, parent) {
    const e = document.createElement(tag);
    Object.assign(e, props || {});
    if (parent) parent.appendChild(e);
    return e;
  }

  function svg(tag, attrs, parent) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  function ms(v) {
    return v == null ? "–" : (v < 10 ? v.toFixed(1) : v.toFixed(0)) + " ms";
  }

  function macs(m) {
    const g = m.macs / 1e9;
    return g >= 0.1 ? g.toFixed(2) + " G" : (m.macs / 1e6).toFixed(1) + " M";
  }

  function accuracyOf(m) {
    const a = m.accuracy || {};
    if (a.measured && a.measured.top1 != null) return { top1: a.measured.top1, source: "measured" };
    if (a.reference && a.reference.top1 != null) return { top1: a.reference.top1, source: "published" };
    return null;
  }

  function p50(m) {
    return m.latency ? m.latency.p50_ms : null;
  }

  function showMessage(text, info) {
    const box = $("message");
    box.textContent = text;
    box.className = info ? "message info" : "message";
    box.hidden = !text;
  }

  function askKey(note) {
    $("key-note").textContent = note;
    $("key-form").hidden = false;
    $("key").focus();
  }

  // What a refusal means, in words; the service's own message follows.
  async function explain(response) {
    let said = "";
    try {
      const body = await response.json();
      said = typeof body.error === "string" ? body.error : (body.error && body.error.message) || "";
    } catch (e) {
      said = "";
    }
    const tail = said ? " The service said: " + said : "";
    switch (response.status) {
      case 401:
        return "This service asks for an API key (401 Unauthorized): type it in the box above." + tail;
      case 413:
        return "Too large (413): the upload is bigger than this service accepts (EFFNET_MAX_BODY_MB), " +
          "or the photos hold too many pixels together. Send fewer or smaller photos." + tail;
      case 415:
        return "Not an image type the service reads (415 Unsupported Media Type): send JPEG, PNG, WebP, " +
          "GIF, BMP or TIFF photos." + tail;
      case 503: {
        const wait = response.headers.get("Retry-After");
        return "The service cannot take this request now (503 Service Unavailable): it is loading, " +
          "overloaded or shutting down." + tail + (wait ? " Try again in " + wait + " s (Retry-After)." : "");
      }
      case 400:
        return "The service could not read this as an image (400)." + tail;
      case 404:
        return "Not found (404)." + tail;
      default:
        return "The service answered HTTP " + response.status + "." + tail;
    }
  }

  // --- models: the table, the picker, the chart ------------------------------------------------------
  async function loadModels() {
    let response;
    try {
      response = await fetch("models", { headers: headers() });
    } catch (e) {
      showMessage("Could not reach the service: " + e.message);
      return;
    }
    if (response.status === 401) {
      askKey(key ? "That key was refused (401 Unauthorized): type it again."
        : "This service asks for an API key (401 Unauthorized: EFFNET_API_KEY is set). " +
          "Type it to see the models and classify photos.");
      showMessage(await explain(response));
      return;
    }
    if (!response.ok) {
      showMessage(await explain(response));
      return;
    }
    $("key-form").hidden = true;
    const body = await response.json();
    models = body.models.filter((m) => m.status === "ready" && m.macs != null);
    defaultModel = body.default;
    fillPicker();
    fillTable();
    drawChart();
    updateSend();
  }

  function fillPicker() {
    const select = $("model");
    const before = select.value;
    select.textContent = "";
    for (const m of models) {
      const acc = accuracyOf(m);
      const text = m.name + " — " + m.resolution + " px, " + macs(m) + "MACs, " +
        (acc ? acc.top1.toFixed(1) + "% " + acc.source : "no accuracy figure") +
        (m.pretrained ? "" : ", RANDOM weights");
      make("option", { value: m.name, textContent: text }, select);
    }
    make("option", { value: "auto", textContent: "auto — the most accurate model within a latency budget" }, select);
    const names = models.map((m) => m.name).concat("auto");
    select.value = names.includes(before) ? before : (names.includes(defaultModel) ? defaultModel : names[0]);
    $("budget-label").hidden = select.value !== "auto";
  }

  function fillTable() {
    const body = $("models").tBodies[0];
    body.textContent = "";
    for (const m of models) {
      const row = make("tr", {}, body);
      row.dataset.model = m.name;
      const acc = accuracyOf(m);
      const cells = [
        [m.name + (m.name === defaultModel ? " (default)" : ""), ""],
        [m.resolution + " px", "num"],
        [(m.params / 1e6).toFixed(2) + " M", "num"],
        [macs(m), "num"],
        [acc ? acc.top1.toFixed(1) + "% (" + acc.source + ")" : "none", ""],
        [m.pretrained ? "pretrained" : "random (untrained)", m.pretrained ? "" : "random"],
        [ms(p50(m)), "num"],
      ];
      for (const [text, cls] of cells) make("td", { textContent: text, className: cls }, row);
    }
  }

  function niceStep(span) {
    const raw = span / 5;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const f of [1, 2, 5, 10]) if (f * mag >= raw) return f * mag;
    return 10 * mag;
  }

  function drawChart() {
    const box = $("chart");
    box.textContent = "";
    if (!models.length) {
      box.textContent = "No model serves yet.";
      return;
    }
    const W = 640, H = 330, L = 52, R = 130, T = 16, plotBottom = 236, noneY = 262;
    const chart = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "ImageNet top-1 accuracy against multiply-adds, one point per loaded model" }, box);
    const gmacs = models.map((m) => m.macs / 1e9);
    const lo = Math.log10(Math.min(...gmacs) / 1.5), hi = Math.log10(Math.max(...gmacs) * 1.5);
    const x = (v) => L + (Math.log10(v) - lo) / (hi - lo) * (W - L - R);
    const accs = models.map(accuracyOf).filter(Boolean).map((a) => a.top1);
    let ylo = accs.length ? Math.floor(Math.min(...accs) - 2) : 0;
    let yhi = accs.length ? Math.ceil(Math.max(...accs) + 2) : 100;
    const step = niceStep(yhi - ylo);
    ylo = Math.floor(ylo / step) * step;
    yhi = Math.ceil(yhi / step) * step;
    const y = (v) => plotBottom - (v - ylo) / (yhi - ylo) * (plotBottom - T);

    const axes = svg("g", { class: "axis" }, chart);
    for (let v = ylo; v <= yhi + 1e-9; v += step) {
      svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }, axes);
      svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, axes).textContent = (+v.toFixed(1)) + "%";
    }
    for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
      for (const f of [1, 2, 5]) {
        const v = f * Math.pow(10, e);
        if (Math.log10(v) < lo || Math.log10(v) > hi) continue;
        svg("line", { x1: x(v), x2: x(v), y1: T, y2: plotBottom, class: "grid" }, axes);
        svg("text", { x: x(v), y: noneY + 28, "text-anchor": "middle" }, axes).textContent = +v.toPrecision(2) + "G";
      }
    }
    svg("line", { x1: L, x2: W - R, y1: plotBottom, y2: plotBottom }, axes);
    svg("line", { x1: L, x2: L, y1: T, y2: plotBottom }, axes);
    svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "axis-title" }, axes)
      .textContent = "GMACs per image (log scale)";
    svg("text", { x: 4, y: noneY + 4, class: "axis-title" }, axes).textContent = "no acc.";

    const points = svg("g", { class: "points" }, chart);
    for (const m of models) {
      const acc = accuracyOf(m);
      const g = svg("g", { class: "point" + (answered.has(m.name) ? " answered" : ""), "data-model": m.name }, points);
      const cx = x(m.macs / 1e9), cy = acc ? y(acc.top1) : noneY;
      if (answered.has(m.name)) svg("circle", { cx: cx, cy: cy, r: 10, class: "ring" }, g);
      svg("circle", { cx: cx, cy: cy, r: 5, class: "pt " + (acc ? acc.source : "none") }, g);
      svg("title", {}, g).textContent = m.name + ": " + macs(m) + "MACs, " +
        (acc ? acc.top1.toFixed(1) + "% top-1 (" + acc.source + ")" : "no accuracy figure") +
        ", p50 " + ms(p50(m)) + (m.pretrained ? "" : ", random weights");
      svg("text", { x: cx + 9, y: cy - 7, class: "pt-label" }, g).textContent = m.name + " · p50 " + ms(p50(m));
    }
  }

  // --- photos in ------------------------------------------------------------------------------------
  function setFiles(list) {
    files = Array.from(list);
    const previews = $("previews");
    previews.textContent = "";
    for (const f of files) {
      if (f.type.startsWith("image/")) make("img", { src: URL.createObjectURL(f), alt: f.name, title: f.name }, previews);
      else make("span", { textContent: f.name }, previews);
    }
    updateSend();
  }

  function updateSend() {
    $("send").disabled = !(files.length && models.length);
  }

  async function classify() {
    const model = $("model").value;
    const params = new URLSearchParams({ model: model, top_k: "5" });
    if (model === "auto") params.set("budget_ms", $("budget").value);
    let init;
    if (files.length === 1) {
      // One photo goes as the body itself, with its own type (the service answers 415 for a non-image type).
      init = { method: "POST", body: files[0], headers: headers({ "Content-Type": files[0].type || "application/octet-stream" }) };
    } else {
      const form = new FormData();
      for (const f of files) form.append("file", f, f.name);
      init = { method: "POST", body: form, headers: headers() };
    }
    $("send").disabled = true;
    showMessage("Classifying " + files.length + " photo" + (files.length > 1 ? "s" : "") + "…", true);
    $("answer").textContent = "";
    let response;
    try {
      response = await fetch("classify?" + params.toString(), init);
    } catch (e) {
      showMessage("Could not reach the service: " + e.message);
      updateSend();
      return;
    }
    if (!response.ok) {
      if (response.status === 401) askKey(key ? "That key was refused (401 Unauthorized): type it again."
        : "This service asks for an API key (401 Unauthorized).");
      showMessage(await explain(response));
      updateSend();
      return;
    }
    const body = await response.json();
    showMessage("");
    render(body);
    answered = new Set(body.results.map((r) => r.model));
    await loadModels(); // fresh p50s, and the chart rings the model that answered
  }

  function render(body) {
    const out = $("answer");
    out.textContent = "";
    const head = make("p", { className: "who" }, out);
    if (body.routing) {
      const r = body.routing;
      head.textContent = "auto chose " + r.chosen + " for a budget of " + r.budget_ms + " ms (estimated p95 " +
        ms(r.estimated_p95_ms) + "): " + r.reason;
    } else if (body.cascade) {
      head.textContent = "cascade " + body.cascade.models.join(" → ") + " (escalate below " + body.cascade.threshold + ")";
    } else {
      head.textContent = "Answered by " + body.model + ".";
    }
    if (!body.pretrained) {
      make("p", { className: "random", textContent: "These weights are random (the model was built without trained " +
        "weights): the labels below are meaningless, they only show the service works." }, out);
    }
    body.results.forEach((res, i) => {
      const box = make("div", { className: "result" }, out);
      box.dataset.model = res.model;
      const f = files[i];
      if (f && f.type.startsWith("image/")) make("img", { src: URL.createObjectURL(f), alt: f.name }, box);
      else make("div", {}, box);
      const text = make("div", {}, box);
      const top = res.predictions[0];
      make("h3", { className: "top1", textContent: top ? top.label : "(no prediction)" }, text);
      make("p", { className: "who", textContent: (f ? f.name + ": " : "") + "answered by " + res.model +
        (res.cascade ? " (path " + res.cascade.path.join(" → ") + ")" : "") }, text);
      const list = make("ol", { className: "top5" }, text);
      for (const p of res.predictions) {
        const li = make("li", {}, list);
        make("span", { className: "label", textContent: p.label }, li);
        make("meter", { min: 0, max: 1, value: p.score }, li);
        make("span", { className: "score", textContent: (100 * p.score).toFixed(1) + "%" }, li);
      }
      const t = res.timing_ms;
      make("p", { className: "timing", textContent: "decode " + ms(t.decode) + " · preprocess " + ms(t.preprocess) +
        " · queue " + ms(t.queue) + " · inference " + ms(t.inference) + " · total " + ms(t.total) }, text);
    });
  }

  // --- wiring -----------------------------------------------------------------------------------------
  $("files").addEventListener("change", (e) => setFiles(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    setFiles(e.dataTransfer.files);
  });
  $("model").addEventListener("change", () => { $("budget-label").hidden = $("model").value !== "auto"; });
  $("send").addEventListener("click", classify);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    key = $("key").value.trim() || null;
    $("key").value = "";
    showMessage("");
    loadModels();
  });
  loadModels();
})();
