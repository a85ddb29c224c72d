// The OneStep page: a one-step student and a multi-step teacher on the same seed and class, side by side, each
// with its measured latency. Plain JavaScript, no external resources: the API serves this file under a
// Content-Security-Policy that allows only same-origin scripts, styles and requests, and data: images.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  let served = [];  // the models of GET /v1/models
  const warmed = new Set();  // models this page has already called once
  const asked = new Set();  // model|seed|label already requested: Triton's response cache may answer a repeat

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if ($("key").value) h["X-API-Key"] = $("key").value;
    return h;
  }

  function setStatus(text, isError) {
    $("status").className = isError ? "error" : "";
    $("status").textContent = text;
  }

  // One request: {ok, status, data, retryAfter, serverTiming, roundTripMs}; status 0 = no answer at all.
  async function call(path, init) {
    const t0 = performance.now();
    let r;
    try {
      r = await fetch(path, {...init, cache: "no-store"});
    } catch (e) {
      return {ok: false, status: 0, data: null};
    }
    let data, parsed = true;
    try {
      data = await r.json();
    } catch (e) {
      data = {detail: r.statusText || "the response is not JSON"};
      parsed = false;
    }
    return {ok: r.ok && parsed, status: r.ok && !parsed ? 502 : r.status, data,
            retryAfter: r.headers.get("Retry-After"), serverTiming: r.headers.get("Server-Timing"),
            roundTripMs: performance.now() - t0};
  }

  function retrySeconds(value) {
    if (value === null || value === undefined || value === "") return null;
    if (/^\d+$/.test(value.trim())) return Number(value.trim());
    const when = Date.parse(value);  // Retry-After may also be an HTTP date
    return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
  }

  function detailText(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {  // validation errors: [{loc, msg}]
      return detail.map((e) => `${(e.loc || []).filter((x) => x !== "body").join(".")}: ${e.msg}`).join("; ");
    }
    return JSON.stringify(detail);
  }

  // What a failed request means for the person looking at the page.
  function explain(res) {
    if (res.status === 0) return "API unreachable";
    if (res.status === 401 || res.status === 403) return "wrong or missing API key";
    if (res.status === 429 || res.status === 503) {
      const s = retrySeconds(res.retryAfter);
      return s === null ? "server busy, retry in a few seconds" : `server busy, retry in ${s} s`;
    }
    return `HTTP ${res.status}: ${detailText(res.data && res.data.detail)}`;
  }

  // W3C Server-Timing: 'parse;dur=0.120, queue;dur=0.010, triton;dur=7.900, encode;dur=0.300, total;dur=8.500'
  function parseServerTiming(header) {
    const out = {};
    for (const part of (header || "").split(",")) {
      const [name, ...params] = part.trim().split(";");
      for (const p of params) {
        const [k, v] = p.trim().split("=");
        if (name && k === "dur" && v !== undefined && Number.isFinite(Number(v))) out[name.trim()] = Number(v);
      }
    }
    return out;
  }

  const byName = (name) => served.find((m) => m.name === name) || null;
  const namesOf = (m) => (m.class_names && m.class_names.length === (m.num_classes || 0)) ? m.class_names
    : Array.from({length: m.num_classes || 0}, (_, k) => `class ${k}`);

  function describe(m) {
    const how = m.role === "teacher" && m.sampler ? `${m.sampler}, ${m.steps} steps` : (m.method || m.role);
    return `${m.name} (${m.nfe} NFE, ${how})`;
  }

  function fillModels(select, models, noneText, allowNone) {
    const previous = select.value;
    select.replaceChildren();
    for (const m of models) select.add(new Option(describe(m), m.name));
    if (allowNone || !models.length) select.add(new Option(models.length ? "(none)" : noneText, ""));
    const keep = Array.from(select.options).some((o) => o.value === previous && previous !== "");
    select.value = keep ? previous : (models.length ? models[0].name : "");
    select.disabled = !models.length;
  }

  // Teachers with another class set than the student cannot take the same label: offered, but disabled.
  function fitTeachers() {
    const s = byName($("student").value);
    for (const o of $("teacher").options) {
      const t = byName(o.value);
      if (!t) continue;
      o.disabled = !!s && (t.num_classes || 0) !== (s.num_classes || 0);
      o.textContent = describe(t) + (o.disabled ? " - other classes than the student" : "");
    }
    const chosen = $("teacher").selectedOptions[0];
    if (chosen && chosen.disabled) {
      const first = Array.from($("teacher").options).find((o) => !o.disabled);
      $("teacher").value = first ? first.value : "";
    }
  }

  function fillClasses() {
    const m = byName($("student").value) || byName($("teacher").value);
    const names = m ? namesOf(m) : [];
    const previous = $("label").value;
    $("label").replaceChildren();
    if (!names.length) {
      $("label").add(new Option("(unconditional)", ""));
      $("label").disabled = true;
      return;
    }
    names.forEach((name, k) => $("label").add(new Option(name, String(k))));
    $("label").value = previous !== "" && Number(previous) < names.length ? previous : "0";
    $("label").disabled = false;
  }

  function studentChanged() {
    fitTeachers();
    fillClasses();
  }

  async function loadModels() {
    const res = await call("v1/models", {headers: headers(false)});
    if (!res.ok) {
      setStatus("cannot list models: " + explain(res), true);
      return;
    }
    served = res.data.models || [];
    fillModels($("student"), served.filter((m) => m.role === "student"), "(no student served)", false);
    fillModels($("teacher"), served.filter((m) => m.role === "teacher"), "(no teacher served)", true);
    studentChanged();
    if (!served.length) setStatus("the server lists no models", true);
    else if ($("status").textContent.startsWith("cannot list models")) setStatus("", false);
  }

  function clearResults() {
    for (const id of ["student-result", "teacher-result"]) {
      $(id).replaceChildren();
      $(id).hidden = true;
      delete $(id).dataset.serverMs;
      delete $(id).dataset.roundTripMs;
    }
    $("ratio").textContent = "";
  }

  function ms(x) {
    return x < 10 ? x.toFixed(1) : x.toFixed(0);
  }

  function showResult(role, m, res, seedText, className, repeated) {
    const fig = $(`${role}-result`);
    const caption = document.createElement("figcaption");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = m.name;
    caption.append(name, ` ${role}, ${m.nfe} NFE`, document.createElement("br"));
    fig.dataset.model = m.name;
    if (!res.ok) {
      const why = document.createElement("span");
      why.className = "failed";
      why.textContent = "no image: " + explain(res);
      caption.append(why);
      fig.replaceChildren(caption);
      fig.hidden = false;
      return null;
    }
    const im = res.data.images[0];
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${im.data}`;
    img.alt = `${role} ${m.name}: ${className === null ? "unconditional" : className}, seed ${seedText}`;
    const timing = parseServerTiming(res.serverTiming);
    const server = "total" in timing ? timing.total : (res.data.timings_ms || {}).total;
    const latency = document.createElement("span");
    latency.className = "latency";
    latency.textContent = `server ${server === undefined ? "?" : ms(server) + " ms"}, ` +
      `round trip ${ms(res.roundTripMs)} ms`;
    caption.append(latency);
    if (repeated) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "asked before: the server may have answered from its response cache";
      caption.append(document.createElement("br"), note);
    }
    fig.replaceChildren(img, caption);
    if (server !== undefined) fig.dataset.serverMs = String(server);
    fig.dataset.roundTripMs = String(res.roundTripMs);
    fig.hidden = false;
    return {server, roundTrip: res.roundTripMs};
  }

  async function generate(ev) {
    ev.preventDefault();
    const seedText = $("seed").value.trim().replace(/^0+(?=\d)/, "");
    if (!/^\d+$/.test(seedText)) {
      setStatus("the seed must be a whole number, 0 or more", true);
      return;
    }
    const student = byName($("student").value), teacher = byName($("teacher").value);
    if (!student && !teacher) {
      setStatus("no model to run: choose a student or a teacher", true);
      return;
    }
    const label = $("label").value === "" ? null : Number($("label").value);
    const className = label === null ? null : $("label").selectedOptions[0].textContent;
    $("go").disabled = true;
    clearResults();
    const times = {};
    try {
      // one after the other, so neither image's latency includes the other's work
      for (const [role, m] of [["student", student], ["teacher", teacher]]) {
        if (!m) continue;
        const body = {model: m.name, format: "png"};
        if (label !== null) body.label = label;
        // the seed goes in as typed: seeds above 2^53 would lose digits as a JavaScript number
        const request = (seed) => ({method: "POST", headers: headers(true),
                                    body: JSON.stringify(body).replace(/}$/, `,"seed":${seed}}`)});
        let res = null;
        if (!warmed.has(m.name)) {
          // the first call pays for connections being set up on the way, not for the model; another seed, so
          // that the measured request is not a response-cache hit
          const other = seedText === "0" ? "1" : "0";
          setStatus(`warming up ${m.name}...`, false);
          const warm = await call("v1/generate", request(other));
          if (warm.ok) {
            warmed.add(m.name);
            asked.add(`${m.name}|${other}|${label}`);
          } else {
            res = warm;  // a failed warm-up (key, busy, unreachable): its answer is the answer
          }
        }
        const key = `${m.name}|${seedText}|${label}`;
        if (res === null) {
          setStatus(`generating with ${m.name}...`, false);
          res = await call("v1/generate", request(seedText));
        }
        times[role] = showResult(role, m, res, seedText, className, asked.has(key));
        if (res.ok) asked.add(key);
        if (!res.ok) {
          setStatus(`${explain(res)} (${m.name}, HTTP ${res.status || "no answer"})`, true);
          return;
        }
      }
      const what = `seed ${seedText}` + (className === null ? "" : `, class "${className}"`);
      if (times.student && times.teacher) {
        const ratio = (a, b) => (a !== undefined && b ? (a / b).toFixed(1) + "x" : "?");
        $("ratio").textContent = `teacher / student: ${ratio(times.teacher.server, times.student.server)} ` +
          `server time, ${ratio(times.teacher.roundTrip, times.student.roundTrip)} round trip ` +
          `(${teacher.nfe} vs ${student.nfe} NFE)`;
      }
      setStatus(`done: ${what}`, false);
    } finally {
      $("go").disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("student").addEventListener("change", studentChanged);
    $("teacher").addEventListener("change", () => { if (!byName($("student").value)) fillClasses(); });
    $("key").addEventListener("change", loadModels);
    $("form").addEventListener("submit", generate);
    loadModels();
  });
})();
