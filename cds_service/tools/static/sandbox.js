// CDS Hooks sandbox page (cds_service/tools/sandbox.py). Vanilla JS, no build step, nothing fetched
// from outside this server. Card text is rendered with the small markdown renderer below, which
// escapes all HTML first (CDS Hooks 2.0 §Card: `detail` is GitHub-flavoured markdown).
"use strict";

const $ = (id) => document.getElementById(id);
const api = document.body.dataset;
const state = { services: [], upload: null, uploadName: "" };
const INDICATOR_LABEL = { info: "Info", warning: "Warning", critical: "Critical" };
// Cards withheld by alert-fatigue suppression, listed in the response (cds_service/records/suppression.py).
const WITHHELD_EXTENSION = "org.example.cds.withheld-cards";

// ---------------------------------------------------------------------------------------------
// Markdown (GFM subset): paragraphs, **bold**, *italic*, `code`, lists, pipe tables, links.

function escapeHtml(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function inline(escaped) {
  return escaped
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
      '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\s][^*]*?)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_([^_\s][^_]*?)_(?!\w)/g, "$1<em>$2</em>");
}

const TABLE_RULE = /^\|?\s*:?-{1,}:?\s*(\|\s*:?-{1,}:?\s*)*\|?\s*$/;
const BULLET = /^\s*[-*+]\s+/;
const NUMBERED = /^\s*\d+[.)]\s+/;

function cells(row) {
  return row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function markdown(source) {
  const lines = escapeHtml(source || "").split(/\r?\n/);
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i += 1; continue; }
    if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])
        && lines[i + 1].includes("-")) {
      const head = cells(line);
      i += 2;
      const rows = [];
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
        rows.push(cells(lines[i]));
        i += 1;
      }
      out.push("<table><thead><tr>" + head.map((c) => `<th>${inline(c)}</th>`).join("")
        + "</tr></thead><tbody>"
        + rows.map((r) => "<tr>" + head.map((_, n) => `<td>${inline(r[n] || "")}</td>`).join("")
          + "</tr>").join("")
        + "</tbody></table>");
      continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) {
      out.push(`<p class="md-heading">${inline(heading[2])}</p>`);
      i += 1;
      continue;
    }
    for (const [pattern, tag] of [[BULLET, "ul"], [NUMBERED, "ol"]]) {
      if (pattern.test(line)) {
        const items = [];
        while (i < lines.length && pattern.test(lines[i])) {
          items.push(`<li>${inline(lines[i].replace(pattern, ""))}</li>`);
          i += 1;
        }
        out.push(`<${tag}>${items.join("")}</${tag}>`);
        break;
      }
    }
    if (BULLET.test(line) || NUMBERED.test(line)) continue;
    const paragraph = [];
    while (i < lines.length && lines[i].trim() && !BULLET.test(lines[i])
           && !NUMBERED.test(lines[i])
           && !(i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i].includes("|"))) {
      paragraph.push(lines[i].trim());
      i += 1;
    }
    out.push(`<p>${inline(paragraph.join(" "))}</p>`);
  }
  return out.join("");
}

// ---------------------------------------------------------------------------------------------
// Small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function pretty(value) {
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

function problem(body) {
  if (body && body.resourceType === "OperationOutcome") {
    return (body.issue || []).map((i) => i.diagnostics || i.code).join("; ");
  }
  return typeof body === "string" ? body : JSON.stringify(body);
}

async function call(url, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(url, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = await response.text(); }
  if (!response.ok) throw new Error(`${response.status}: ${problem(data)}`);
  return data;
}

function setStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = "status" + (kind ? ` status--${kind}` : "");
}

function currentService() {
  const [id, hook] = ($("service").value || "|").split("|");
  return { id, hook };
}

function patientSource() {
  const source = $("site").value ? { site: $("site").value } : {};
  if ($("patient").value === "__upload__") return { ...source, bundle: state.upload };
  return { ...source, patient: $("patient").value };
}

// ---------------------------------------------------------------------------------------------
// Controls

async function loadPatients() {
  const { patients } = await call(api.patients);
  const select = $("patient");
  select.replaceChildren(...patients.map((p) => el("option", {
    value: p.id,
    text: `${p.name} (${[p.gender, p.birthDate].filter(Boolean).join(", ")}) · ${p.id}`,
  })));
  if (!patients.length) {
    select.append(el("option", { value: "", text: "no bundled patients: upload a Bundle" }));
  }
}

async function loadServices() {
  const { sites } = await call(api.services);
  state.services = sites;
  $("site").replaceChildren(...sites.map((s) => el("option", { value: s.site, text: s.site })));
  $("site-field").hidden = sites.length < 2;
  fillServices();
}

function fillServices() {
  const site = state.services.find((s) => s.site === $("site").value) || state.services[0];
  const options = [];
  for (const service of site ? site.services : []) {
    for (const hook of service.hooks) {
      options.push(el("option", { value: `${service.id}|${hook}`,
                                  text: `${service.id} · ${hook}` }));
    }
  }
  $("service").replaceChildren(...options);
}

async function loadMedications() {
  const { hook } = currentService();
  const orderHook = hook === "order-select" || hook === "order-sign";
  $("medications").hidden = !orderHook;
  if (!orderHook) return;
  const list = $("medication-list");
  const source = patientSource();
  if (!source.patient && !source.bundle) { list.replaceChildren(); return; }
  try {
    const { medications } = await call(api.medications, source);
    list.replaceChildren(...medications.map((m) => {
      const box = el("input", { type: "checkbox", value: m.id, name: "medication" });
      const note = m.source === "bundle" ? `in Bundle, ${m.status || "no status"}` : `RxNorm ${m.rxnorm}`;
      return el("label", { class: "medication", "data-id": m.id }, box,
        el("span", {}, m.label, el("span", { class: "muted medication__note", text: ` · ${note}` })));
    }));
  } catch (error) {
    list.replaceChildren(el("p", { class: "status--error", text: error.message }));
  }
}

function readUpload(event) {
  const file = event.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    try {
      state.upload = JSON.parse(reader.result);
    } catch (e) {
      setStatus(`${file.name} is not JSON: ${e.message}`, "error");
      return;
    }
    state.uploadName = file.name;
    let option = $("patient").querySelector('option[value="__upload__"]');
    if (!option) {
      option = el("option", { value: "__upload__" });
      $("patient").prepend(option);
    }
    option.textContent = `Uploaded: ${file.name}`;
    $("patient").value = "__upload__";
    setStatus(`Loaded ${file.name}.`);
    loadMedications();
  };
  reader.readAsText(file);
}

// ---------------------------------------------------------------------------------------------
// Results

async function run(event) {
  event.preventDefault();
  const { id, hook } = currentService();
  const medications = [...document.querySelectorAll('input[name="medication"]:checked')]
    .map((box) => box.value);
  const body = { ...patientSource(), service: id, hook };
  if (!$("medications").hidden) body.medications = medications;
  setStatus("Calling the service…");
  $("feedback-meta").textContent = "";
  $("feedback-json").textContent = "";
  $("run").disabled = true;
  try {
    const result = await call(api.invoke, body);
    showExchange(result);
    const response = result.response;
    const withheld = response.status === 200
      ? ((response.body.extension || {})[WITHHELD_EXTENSION] || []) : [];
    renderWithheld(withheld);
    if (response.status === 200) {
      renderCards(response.body.cards || [], { site: body.site, service: id }, withheld.length);
      setStatus(`HTTP ${response.status}: ${(response.body.cards || []).length} card(s)`
        + (withheld.length ? `, ${withheld.length} withheld.` : "."), "ok");
    } else {
      $("cards").replaceChildren(el("p", { class: "status--error",
        text: `The service answered ${response.status}: ${problem(response.body)}` }));
      setStatus(`HTTP ${response.status}`, "error");
    }
    renderModel(result.explanation);
  } catch (error) {
    setStatus(error.message, "error");
  } finally {
    $("run").disabled = false;
  }
}

function showExchange(result) {
  const req = result.request;
  $("request-meta").textContent = `POST ${req.url}`;
  $("request-json").textContent = [
    `POST ${req.url}`,
    ...Object.entries(req.headers).map(([k, v]) => `${k}: ${v}`),
    "",
    pretty(req.body),
    "",
    "// the JWT in Authorization, decoded (shown truncated above):",
    pretty(req.jwt),
  ].join("\n");
  $("response-meta").textContent = `HTTP ${result.response.status}`;
  $("response-json").textContent = pretty(result.response.body);
}

function renderCards(cards, where, withheld = 0) {
  $("cards-meta").textContent = cards.length ? `(${cards.length})` : "";
  if (!cards.length) {
    $("cards").replaceChildren(el("p", { class: "muted", text: withheld
      ? "No cards shown: see below why."
      : "No cards: the service has nothing to say for this patient." }));
    return;
  }
  $("cards").replaceChildren(...cards.map((card) => renderCard(card, where)));
}

function renderWithheld(withheld) {
  const box = $("withheld");
  box.hidden = !withheld.length;
  box.replaceChildren(
    el("h3", { class: "withheld__title",
               text: "Withheld: you overrode a card of the same topic for this patient" }),
    ...withheld.map((w) => el("div", { class: "withheld__card", "data-card": w.overriddenCard },
      el("span", { class: `badge badge--${w.indicator}`, text: w.indicator }),
      el("span", { class: "withheld__summary", text: ` ${w.summary}` }),
      el("p", { class: "muted withheld__why",
        text: `Overridden at ${w.overriddenAt} (card ${w.overriddenCard}); shown again after `
          + `${w.shownAgainAfter}, or sooner if more severe.` }))),
    el("p", { class: "muted", text: "“Reset my overrides for this patient” shows them again." }));
}

async function resetOverrides() {
  $("reset-overrides").disabled = true;
  try {
    const result = await call(api.reset, patientSource());
    setStatus(`Cleared ${result.cleared} suppression(s) of ${result.userId} for patient `
      + `${result.patientId}: send the request again to see the cards.`, "ok");
  } catch (error) {
    setStatus(error.message, "error");
  } finally {
    $("reset-overrides").disabled = false;
  }
}

function renderCard(card, where) {
  const indicator = card.indicator in INDICATOR_LABEL ? card.indicator : "info";
  const node = el("article", { class: `card card--${indicator}`, "data-uuid": card.uuid || "",
                               "data-indicator": indicator });
  const body = el("div", { class: "card__body" });
  body.append(el("header", { class: "card__head" },
    el("span", { class: "card__indicator", text: INDICATOR_LABEL[indicator] }),
    el("h3", { class: "card__summary", text: card.summary })));
  if (card.detail) {
    const detail = el("div", { class: "card__detail" });
    detail.innerHTML = markdown(card.detail);  // escaped first: see markdown()
    body.append(detail);
  }
  const ack = el("p", { class: "card__ack", "aria-live": "polite" });
  const controls = [];
  if ((card.suggestions || []).length) {
    const list = el("div", { class: "card__suggestions" });
    for (const suggestion of card.suggestions) {
      const action = (suggestion.actions || [])[0] || {};
      const what = action.description || `${action.type || ""} ${action.resourceId || ""}`;
      const button = el("button", { type: "button", class: "button button--accept",
                                    text: "Accept", "data-suggestion": suggestion.uuid || "" });
      controls.push(button);
      button.addEventListener("click", () => sendFeedback(card, where, {
        outcome: "accepted", suggestion: suggestion.uuid,
      }, `Accepted “${suggestion.label}”`, controls, ack));
      list.append(el("div", { class: "suggestion" }, button,
        el("span", { class: "suggestion__label", text: suggestion.label }),
        suggestion.isRecommended ? el("span", { class: "badge", text: "recommended" }) : null,
        el("span", { class: "muted suggestion__what", text: what })));
    }
    body.append(list);
  }
  if ((card.links || []).length) {
    body.append(el("div", { class: "card__links" }, ...card.links.map((link) =>
      el("a", { href: safeUrl(link.url), target: "_blank", rel: "noopener noreferrer",
                class: `link link--${link.type}`,
                text: link.type === "smart" ? `SMART app: ${link.label}` : link.label }))));
  }
  if (card.uuid) body.append(overrideControls(card, where, controls, ack));
  body.append(ack);
  if (card.source) {
    const source = el("p", { class: "card__source muted", text: "Source: " });
    source.append(card.source.url
      ? el("a", { href: safeUrl(card.source.url), target: "_blank", rel: "noopener noreferrer",
                  text: card.source.label })
      : card.source.label);
    body.append(source);
  }
  node.append(el("div", { class: "card__band", "aria-hidden": "true" }), body);
  return node;
}

function overrideControls(card, where, controls, ack) {
  const reasons = card.overrideReasons || [];
  const select = el("select", { class: "override__reason", "aria-label": "Override reason" },
    el("option", { value: "", text: reasons.length ? "Override reason…" : "No reason offered" }),
    ...reasons.map((r, n) => el("option", { value: String(n), text: r.display || r.code })));
  const comment = el("input", { type: "text", class: "override__comment",
                                placeholder: "Comment (optional)", maxLength: 2000 });
  const button = el("button", { type: "button", class: "button button--override",
                                text: "Override" });
  controls.push(select, comment, button);
  button.addEventListener("click", () => {
    const outcome = { outcome: "overridden" };
    if (select.value !== "") {
      const reason = reasons[Number(select.value)];
      outcome.reason = { code: reason.code, system: reason.system, display: reason.display };
    }
    if (comment.value.trim()) outcome.comment = comment.value.trim();
    const why = outcome.reason ? ` (${outcome.reason.display || outcome.reason.code})` : "";
    sendFeedback(card, where, outcome, `Overridden${why}`, controls, ack);
  });
  return el("div", { class: "card__override" }, select, comment, button);
}

function safeUrl(url) {
  return /^https?:\/\//i.test(url || "") ? url : "#";
}

async function sendFeedback(card, where, outcome, text, controls, ack) {
  controls.forEach((c) => { c.disabled = true; });
  ack.className = "card__ack";
  ack.textContent = "Sending feedback…";
  try {
    const result = await call(api.feedback, { ...(where.site ? { site: where.site } : {}),
      service: where.service, card: card.uuid, ...outcome });
    $("feedback-meta").textContent = `HTTP ${result.response.status}`;
    $("feedback-json").textContent = `POST ${result.request.url}\n\n${pretty(result.request.body)}`
      + `\n\n// response\n${pretty(result.response.body)}`;
    const answer = result.response.body;
    if (result.response.status === 200) {
      ack.textContent = `${text}: feedback stored (received ${answer.received}, `
        + `stored ${answer.stored}).`;
      ack.classList.add("card__ack--ok");
    } else {
      ack.textContent = `${text}: the service answered ${result.response.status}: `
        + problem(answer);
      ack.classList.add("card__ack--error");
      controls.forEach((c) => { c.disabled = false; });
    }
  } catch (error) {
    ack.textContent = error.message;
    ack.classList.add("card__ack--error");
    controls.forEach((c) => { c.disabled = false; });
  }
}

// Figures as a lab report shows them: 380, 27, 2.1 (hooks/_kidney.py `number`).
function figure(value) {
  const n = Number(value);
  return Math.abs(n) >= 100 ? n.toFixed(0) : String(Number(n.toPrecision(3)));
}

function outputLabel(output) {
  const years = /^risk_(\d+)y$/.exec(output || "");
  return years ? `${years[1]}-year risk` : output;
}

function renderModel(explanation) {
  $("model-panel").hidden = !explanation;
  if (!explanation) return;
  const box = $("model");
  const model = explanation.model;
  const title = el("p", { class: "model__id muted",
                          text: `${model.id} ${model.version} · sha256 ${model.sha256.slice(0, 12)}` });
  if (explanation.score == null) {
    const inputs = ((explanation.features || {}).features || []).map((f) => el("tr", {},
      el("td", { text: f.name }),
      el("td", { text: f.value == null ? "" : `${figure(f.value)}${f.unit ? " " + f.unit : ""}` }),
      el("td", { text: f.status + (f.required ? " (required)" : "") })));
    box.replaceChildren(title, el("p", { class: "model__unavailable",
      text: `No score: ${explanation.unavailable || "not scored"}.` }),
      el("table", { class: "model__inputs" },
        el("thead", {}, el("tr", {}, el("th", { text: "input" }), el("th", { text: "value" }),
                                     el("th", { text: "status" }))),
        el("tbody", {}, ...inputs)));
    return;
  }
  const indicator = explanation.indicator;
  const secondary = Object.entries(explanation.secondary || {})
    .map(([k, v]) => `${outputLabel(k)} ${(v * 100).toFixed(0)}%`).join(", ");
  const score = el("div", { class: "model__score" },
    el("span", { class: "model__value", text: `${(explanation.score * 100).toFixed(1)}%` }),
    el("span", { text: ` ${outputLabel(explanation.output)}` }),
    indicator ? el("span", { class: `badge badge--${indicator}`, text: indicator }) : null,
    secondary ? el("span", { class: "muted", text: ` · ${secondary}` }) : null);
  const top = (explanation.contributions || []).slice(0, 5);
  const largest = Math.max(...top.map((c) => Math.abs(c.contribution)), 1e-9);
  const chart = el("div", { class: "bars", role: "img",
                            "aria-label": "Top contributing factors" });
  for (const c of top) {
    const bar = el("div", { class: `bar bar--${c.contribution > 0 ? "raises" : "lowers"}` });
    bar.style.width = `${(50 * Math.abs(c.contribution)) / largest}%`;
    const value = c.value == null ? "missing" : figure(c.value);
    chart.append(el("div", { class: "bars__row", "data-feature": c.name },
      el("span", { class: "bars__label", text: `${c.name} = ${value}` }),
      el("span", { class: "bars__track" }, bar),
      el("span", { class: "bars__amount",
                   text: `${c.contribution > 0 ? "+" : ""}${c.contribution.toFixed(3)} ${c.direction}` })));
  }
  const notes = [];
  if ((explanation.missing || []).length) notes.push(`missing: ${explanation.missing.join(", ")}`);
  if ((explanation.imputed || []).length) notes.push(`imputed: ${explanation.imputed.join(", ")}`);
  box.replaceChildren(title, score, chart,
    el("p", { class: "muted", text: "Bars: contribution to the score relative to the model's "
      + "reference patient (right raises, left lowers)." + (notes.length ? ` ${notes.join("; ")}.` : "") }));
}

// ---------------------------------------------------------------------------------------------

async function start() {
  $("request-form").addEventListener("submit", run);
  $("upload").addEventListener("change", readUpload);
  $("reset-overrides").addEventListener("click", resetOverrides);
  $("site").addEventListener("change", () => { fillServices(); loadMedications(); });
  $("service").addEventListener("change", loadMedications);
  $("patient").addEventListener("change", loadMedications);
  try {
    await Promise.all([loadPatients(), loadServices()]);
    await loadMedications();
    document.body.dataset.ready = "true";
  } catch (error) {
    setStatus(`Cannot load the sandbox: ${error.message}`, "error");
  }
}

document.addEventListener("DOMContentLoaded", start);
