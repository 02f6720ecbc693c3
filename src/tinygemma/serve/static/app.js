// tinygemma studio: plain JavaScript, no build step, nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let controller = null; // aborts the running story (the server then stops generating)

// -- story page ---------------------------------------------------------------------------------
function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function setRunning(running) {
  $("tell").disabled = running;
  $("stop").disabled = !running;
  $("story").classList.toggle("running", running);
}

function showError(message) {
  $("story-error").textContent = message;
  $("story-error").hidden = !message;
}

async function tell() {
  if (controller) return;
  const prompt = $("prompt").value;
  const body = {
    prompt, stream: true, stream_options: { include_usage: true },
    temperature: number("temperature"), top_k: number("top_k"), top_p: number("top_p"),
    max_tokens: number("max_tokens"),
  };
  const seed = number("seed");
  if (seed !== null) body.seed = seed;
  // TinyStories-Instruct instructions: API extension fields, sent only when filled in
  for (const k of ["words", "summary", "sentence"]) if ($(k).value.trim()) body[k] = $(k).value.trim();
  const features = [...document.querySelectorAll("#features input:checked")].map((c) => c.value);
  if (features.length) body.features = features;
  for (const k of Object.keys(body)) if (body[k] === null || Number.isNaN(body[k])) delete body[k];

  $("story-prompt").textContent = prompt;
  $("story-text").textContent = "";
  $("story-stats").textContent = "";
  showError("");
  controller = new AbortController();
  setRunning(true);
  const t0 = performance.now();
  let tokens = 0, finish = null, usage = null;
  const stats = () => {
    const s = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : tokens;
    $("story-stats").textContent = `${n} tokens · ${(n / Math.max(s, 1e-3)).toFixed(1)} tokens/s` +
      (finish ? ` · ${finish === "length" ? "reached the length limit" : finish}` : "");
  };
  try {
    const resp = await fetch("/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => null);
      throw new Error(err && err.error ? err.error.message : `HTTP ${resp.status}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          if (msg.usage) usage = msg.usage;
          for (const c of msg.choices || []) {
            if (c.text) {
              $("story-text").textContent += c.text;
              tokens += 1;
            }
            if (c.finish_reason) finish = c.finish_reason === "stop" ? "the end" : c.finish_reason;
          }
          stats();
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else showError(e.message);
  } finally {
    controller = null;
    setRunning(false);
    stats();
  }
}

function stop() {
  if (controller) controller.abort();
}

// -- training page ------------------------------------------------------------------------------
const run = { next: "", records: [], report: null, timer: null };

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-2 || a >= 1e5)) return v.toExponential(1);
  return Number(v.toPrecision(3)).toString();
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

// series: [{name, color, points: [[x, y], ...], dots}]
function drawChart(canvas, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  const pts = series.flatMap((s) => s.points);
  if (pts.length === 0) {
    ctx.fillStyle = "#6b7385";
    ctx.fillText("no data yet", w / 2 - 30, h / 2);
    return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.05 || Math.abs(y1) * 0.05 || 1;
  y0 -= pad;
  y1 += pad;
  const L = 52, R = 10, T = 18, B = 22;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (w - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (h - T - B);
  ctx.strokeStyle = "#eceef3";
  ctx.fillStyle = "#6b7385";
  ctx.lineWidth = 1;
  for (const t of niceTicks(y0, y1, 4)) {
    ctx.beginPath(); ctx.moveTo(L, Y(t)); ctx.lineTo(w - R, Y(t)); ctx.stroke();
    ctx.fillText(fmt(t), 4, Y(t) + 4);
  }
  for (const t of niceTicks(x0, x1, 5)) {
    ctx.beginPath(); ctx.moveTo(X(t), T); ctx.lineTo(X(t), h - B); ctx.stroke();
    ctx.fillText(fmt(t), X(t) - 10, h - 6);
  }
  let lx = L + 6;
  for (const s of series) {
    if (s.points.length === 0) continue;
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.dots || s.points.length === 1) {
      for (const [x, y] of s.points) { ctx.beginPath(); ctx.arc(X(x), Y(y), 2.5, 0, 2 * Math.PI); ctx.fill(); }
    }
    const label = `${s.name} ${fmt(s.points[s.points.length - 1][1])}`;
    ctx.fillRect(lx, 6, 10, 3);
    ctx.fillText(label, lx + 14, 11);
    lx += ctx.measureText(label).width + 30;
  }
}

function series(key, name, color, dots = false) {
  const points = run.records.filter((r) => typeof r[key] === "number" && typeof r.step === "number")
    .map((r) => [r.step, r[key]]);
  return { name, color, points, dots };
}

function drawTraining() {
  drawChart($("chart-loss"), [series("train_loss", "train", "#2f6fde"), series("val_loss", "val", "#e8710a", true),
    series("eval_train_loss", "train (eval)", "#7baaf7", true)]);
  drawChart($("chart-lr"), [series("lr", "lr", "#188038")]);
  drawChart($("chart-grad"), [series("grad_norm", "grad norm", "#a142f4")]);
  drawChart($("chart-speed"), [series("tokens_per_s", "tokens/s", "#c5221f")]);
  const last = run.records[run.records.length - 1];
  const lastVal = [...run.records].reverse().find((r) => typeof r.val_loss === "number");
  if (!last) {
    $("run-summary").textContent = `run ${info.run}: no metrics yet (waiting for metrics.jsonl)`;
    return;
  }
  const parts = [`run ${info.run}`, `step ${last.step}`];
  if (typeof last.tokens === "number") parts.push(`${fmt(last.tokens)} tokens`);
  if (typeof last.train_loss === "number") parts.push(`train loss ${fmt(last.train_loss)}`);
  if (lastVal) parts.push(`val loss ${fmt(lastVal.val_loss)} (step ${lastVal.step})`);
  if (typeof last.mfu === "number") parts.push(`MFU ${(100 * last.mfu).toFixed(1)}%`);
  if (typeof last.elapsed_s === "number") parts.push(`${(last.elapsed_s / 60).toFixed(1)} min`);
  $("run-summary").textContent = parts.join(" · ");
}

async function refreshTraining() {
  try {
    const resp = await fetch(`/api/metrics?since=${encodeURIComponent(run.next)}`);
    if (!resp.ok) return;
    const data = await resp.json();
    if (data.restarted) run.records = [];
    run.records.push(...data.records);
    run.next = data.next;
    const report = data.report;
    if (report && (!run.report || report.mtime !== run.report.mtime || report.name !== run.report.name)) {
      $("report").src = `/api/report?v=${encodeURIComponent(report.mtime)}`;
      $("report").hidden = false;
      $("no-report").hidden = true;
      $("report-name").textContent = report.name;
    }
    run.report = report;
    if (!$("page-training").hidden) drawTraining();
  } catch (e) {
    $("run-summary").textContent = `cannot reach the server (${e.message})`;
  }
}

// -- navigation ---------------------------------------------------------------------------------
function route() {
  const training = location.hash === "#training" && info && info.run;
  $("page-story").hidden = !!training;
  $("page-training").hidden = !training;
  $("tab-story").classList.toggle("active", !training);
  $("tab-training").classList.toggle("active", !!training);
  if (training) drawTraining();
}

async function init() {
  $("tell").addEventListener("click", tell);
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) tell();
  });
  info = await (await fetch("/api/info")).json();
  $("model-info").textContent = `${info.model} · ${(info.params / 1e6).toFixed(1)}M parameters · ` +
    `context ${info.context_length}`;
  $("max_tokens").max = info.max_tokens;
  if (Number($("max_tokens").value) > info.max_tokens) $("max_tokens").value = info.max_tokens;
  for (const text of info.examples) {
    const b = document.createElement("button");
    b.className = "example";
    b.textContent = text;
    b.addEventListener("click", () => {
      if (controller) return;
      $("prompt").value = text;
      tell();
    });
    $("examples").appendChild(b);
  }
  if (info.run) {
    $("tab-training").hidden = false;
    await refreshTraining();
    // a run in progress keeps appending to metrics.jsonl: poll for new lines
    run.timer = setInterval(refreshTraining, 5000);
  }
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", () => { if (!$("page-training").hidden) drawTraining(); });
  route();
}

document.addEventListener("DOMContentLoaded", init);
