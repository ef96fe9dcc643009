// stockade's live dashboard: polls GET /api/v1/dashboard and redraws the page.
// No framework and no build step. Every string that comes from the API goes into the
// page through textContent (never innerHTML), so it is shown, never interpreted.
(function () {
  "use strict";

  const API = "/api/v1/dashboard";
  const POLL_MS = 2000;
  const TIMEOUT_MS = 10000;
  const TOKEN_KEY = "stockade.token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  // Fixed colours for the runtimes stockade has; any other gets the next free one.
  const SERIES = { process: 0, gvisor: 1, microvm: 2 };
  const SERIES_COUNT = 6;
  const SEVERITIES = ["LOW", "MEDIUM", "HIGH", "CRITICAL"];

  let timer = null;

  const $ = (id) => document.getElementById(id);

  // An element with text (always as text) and optional classes.
  function el(tag, text, ...classes) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (classes.length) node.classList.add(...classes);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function num(value, digits) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
  }

  function shortId(id) {
    const text = String(id ?? "");
    return text.length > 13 ? text.slice(0, 8) + "…" : text;
  }

  function clock(iso) {
    const when = new Date(iso);
    return Number.isNaN(when.getTime()) ? String(iso ?? "–") : when.toLocaleTimeString([], { hour12: false });
  }

  function uptime(seconds) {
    if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    const s = Math.floor(seconds);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const rest = String(s % 60).padStart(2, "0");
    return h ? `${h}h ${String(m).padStart(2, "0")}m` : `${m}m ${rest}s`;
  }

  // A cell with a shortened id, the whole id in its tooltip.
  function idCell(id) {
    const cell = el("td");
    const code = el("code", shortId(id));
    code.title = String(id ?? "");
    cell.append(code);
    return cell;
  }

  function agentCell(agent) {
    return agent === null || agent === undefined ? el("td", "—", "muted") : el("td", agent);
  }

  // Replace a table's rows; an empty list shows one "none" row across the columns.
  function fillTable(id, items, makeRow) {
    const table = $(id);
    const rows = (items || []).map(makeRow);
    if (!rows.length) {
      const cell = el("td", "none", "muted", "empty");
      cell.colSpan = table.tHead.rows[0].cells.length;
      const row = el("tr");
      row.append(cell);
      rows.push(row);
    }
    table.tBodies[0].replaceChildren(...rows);
  }

  function sandboxRow(sb) {
    const row = el("tr");
    row.dataset.sandboxId = String(sb.id ?? "");
    row.append(idCell(sb.id), el("td", sb.kind), agentCell(sb.agent_id), el("td", sb.runtime),
      el("td", uptime(sb.uptime_seconds), "num"));
    return row;
  }

  function executionRow(ex) {
    const row = el("tr");
    row.dataset.executionId = String(ex.execution_id ?? "");
    let outcome = ex.termination_reason || (ex.success ? "completed" : "failed");
    // The program's own exit status, where it chose one: a timeout's or a limit's SIGKILL (-9) says nothing more.
    const ended = !ex.termination_reason || ex.termination_reason === "completed";
    if (!ex.success && ended && ex.exit_code !== null && ex.exit_code !== undefined) outcome += ` (exit ${ex.exit_code})`;
    const seconds = ex.execution_time_seconds;
    const violations = el("td", ex.violations ?? 0, "num");
    if (ex.violations > 0) violations.classList.add("warn");
    row.append(idCell(ex.execution_id), agentCell(ex.agent_id), el("td", ex.runtime_used),
      el("td", outcome, "outcome", ex.success ? "ok" : "fail"),
      el("td", num(typeof seconds === "number" ? seconds * 1000 : null, 1), "num"),
      el("td", num(ex.cold_start_time_ms, 1), "num"), violations, el("td", clock(ex.finished_at), "muted"));
    return row;
  }

  function violationRow(v) {
    const row = el("tr");
    const severity = String(v.severity ?? "");
    const level = SEVERITIES.includes(severity) ? severity.toLowerCase() : "other";
    const badge = el("td");
    badge.append(el("span", severity, "sev", "sev-" + level));
    row.append(el("td", clock(v.timestamp), "muted"), idCell(v.execution_id), agentCell(v.agent_id),
      el("td", v.violation_type), el("td", v.syscall ?? "—"), badge, el("td", v.detection_layer));
    return row;
  }

  // ---- the cold start chart: one polyline per runtime, y axis in ms ----

  function niceCeil(value) {
    if (!(value > 0)) return 1;
    const step = Math.pow(10, Math.floor(Math.log10(value)));
    for (const f of [1, 2, 2.5, 5, 10]) if (f * step >= value) return f * step;
    return 10 * step;
  }

  function seriesIndex(runtimes) {
    const index = {};
    let next = Object.keys(SERIES).length;
    for (const name of runtimes) index[name] = name in SERIES ? SERIES[name] : next++ % SERIES_COUNT;
    return index;
  }

  function drawChart(coldStarts) {
    const box = $("chart");
    const series = Object.entries(coldStarts || {})
      .map(([runtime, points]) => [runtime, (Array.isArray(points) ? points : [])
        .map((p) => [Date.parse(p[0]), Number(p[1])])
        .filter(([t, ms]) => Number.isFinite(t) && Number.isFinite(ms))
        .sort((a, b) => a[0] - b[0])])
      .filter(([, points]) => points.length)
      .sort((a, b) => a[0].localeCompare(b[0]));
    if (!series.length) {
      box.replaceChildren(el("p", "no cold starts recorded yet", "muted"));
      return;
    }
    const W = 760, H = 240, L = 64, R = 16, T = 12, B = 30;
    const all = series.flatMap(([, points]) => points);
    let t0 = Math.min(...all.map((p) => p[0]));
    let t1 = Math.max(...all.map((p) => p[0]));
    if (t1 === t0) { t0 -= 1000; t1 += 1000; }
    const top = niceCeil(Math.max(...all.map((p) => p[1])));
    const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
    const y = (ms) => H - B - (ms / top) * (H - T - B);

    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "cold start latency in ms" });
    for (let i = 0; i <= 4; i++) {
      const ms = (top * i) / 4;
      chart.append(svg("line", { x1: L, x2: W - R, y1: y(ms), y2: y(ms), class: i ? "grid" : "axis" }),
        svg("text", { x: L - 6, y: y(ms) + 4, class: "label", "text-anchor": "end" },
          `${Number(ms.toPrecision(3))} ms`));
    }
    chart.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }),
      svg("text", { x: L, y: H - 8, class: "label", "text-anchor": "start" }, clock(t0)),
      svg("text", { x: W - R, y: H - 8, class: "label", "text-anchor": "end" }, clock(t1)));

    const index = seriesIndex(series.map(([runtime]) => runtime));
    const legend = el("ul", null, "legend");
    for (const [runtime, points] of series) {
      const cls = "series-" + index[runtime];
      const line = svg("polyline", {
        points: points.map(([t, ms]) => `${x(t).toFixed(1)},${y(ms).toFixed(1)}`).join(" "),
        class: "series " + cls,
      });
      line.dataset.runtime = runtime;
      const [lt, lms] = points[points.length - 1];
      const dot = svg("circle", { cx: x(lt).toFixed(1), cy: y(lms).toFixed(1), r: 3, class: "dot " + cls });
      chart.append(line, dot);
      const item = el("li");
      item.dataset.runtime = runtime;
      item.append(el("span", null, "swatch", cls), el("span", runtime),
        el("span", `last ${num(lms, 1)} ms · ${points.length} runs`, "muted"));
      legend.append(item);
    }
    box.replaceChildren(chart, legend);
  }

  // ---- state of the connection ----

  function render(data) {
    const executions = data.recent_executions || [];
    const violations = data.recent_violations || [];
    const sandboxes = data.active_sandboxes || [];
    $("service").textContent = data.service || "stockade";
    $("version").textContent = data.version ? "v" + data.version : "";
    $("count-active").textContent = sandboxes.length;
    $("count-executions").textContent = executions.length;
    $("count-failed").textContent = executions.filter((ex) => !ex.success).length;
    $("count-violations").textContent = violations.length;
    const digest = $("policy-digest");
    digest.textContent = data.policy_digest ? String(data.policy_digest).slice(0, 12) : "–";
    digest.title = String(data.policy_digest ?? "");
    fillTable("sandboxes", sandboxes, sandboxRow);
    fillTable("executions", executions, executionRow);
    fillTable("violations", violations, violationRow);
    drawChart(data.cold_start_ms);
  }

  function setBanner(text) {
    const banner = $("banner");
    banner.textContent = text || "";
    banner.hidden = !text;
    document.body.classList.toggle("disconnected", Boolean(text));
  }

  function askForToken(rejected) {
    const form = $("auth");
    $("auth-error").textContent = rejected ? "that token was refused" : "";
    setBanner("");
    $("status").textContent = "waiting for an API token";
    if (form.hidden) {
      form.hidden = false;
      $("token").focus();
    }
  }

  async function poll() {
    clearTimeout(timer);
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const abort = new AbortController();
    const deadline = setTimeout(() => abort.abort(), TIMEOUT_MS);
    let data;
    try {
      const response = await fetch(API, { headers, cache: "no-store", signal: abort.signal });
      if (response.status === 401) {
        // Stop polling until someone gives a token: each refusal is a line in the console.
        if (token) sessionStorage.removeItem(TOKEN_KEY);
        askForToken(Boolean(token));
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      data = await response.json();
    } catch (err) {
      const why = err && err.name === "AbortError" ? "no answer" : (err && err.message) || "unreachable";
      setBanner(`Disconnected from stockade (${why}); retrying every ${POLL_MS / 1000} s…`);
      $("status").textContent = "disconnected";
      timer = setTimeout(poll, POLL_MS);
      return;
    } finally {
      clearTimeout(deadline);
    }
    try {
      render(data);
      setBanner("");
      $("status").textContent = "updated " + new Date().toLocaleTimeString([], { hour12: false });
    } catch (err) {
      setBanner(`Could not show the answer: ${err && err.message}`);
    }
    timer = setTimeout(poll, POLL_MS);
  }

  function start() {
    $("auth").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      $("auth").hidden = true;
      $("status").textContent = "connecting…";
      poll();
    });
    poll();
  }

  start();
})();
