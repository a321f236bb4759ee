// The guard review page: a list of logged generations and a detail view per record, read from
// the review API (v1/guard/review, see server/review.py). Plain DOM, no build step, no external
// resources.
//
// Record text is untrusted model output: every piece of it goes into the DOM as text (textContent,
// Node.append of a string, setAttribute), never as markup. The server's Content-Security-Policy
// forbids inline scripts as a second line of defence.
//
// Routes (in the URL hash, so a reload keeps the view): "#/?filters" is the list, "#/log/<id>"
// a record. The admin key is asked once and kept in sessionStorage (this tab only); the
// reviewer's name in localStorage.
'use strict';

(() => {
  const API = 'v1/guard/review';
  const KEY = 'guard-review-key';
  const REVIEWER = 'guard-review-reviewer';
  const LABELS = {true_positive: 'True positive', false_positive: 'False positive', unsure: 'Unsure'};
  const FILTERS = ['policy', 'monitor', 'outcome', 'label', 'since', 'until'];
  const app = document.getElementById('app');
  let routeSeq = 0;
  let listHash = '#/';

  // -- DOM helpers (text only) -----------------------------------------------------------------

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function addChildren(node, children) {
    for (const c of [children].flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : String(c));  // a string becomes a text node
    }
    return node;
  }

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    return addChildren(node, children);
  }

  function s(tag, attrs, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    setAttrs(node, attrs);
    return addChildren(node, children);
  }

  const fmt = (x, d = 3) => (typeof x === 'number' && Number.isFinite(x) ? x.toFixed(d) : '–');
  const when = (sec) => new Date(sec * 1000).toLocaleString();
  const localToEpoch = (value) => {
    const t = new Date(value).getTime();
    return Number.isFinite(t) ? t / 1000 : null;
  };

  // -- API -----------------------------------------------------------------------------------

  class Unauthorized extends Error {}

  async function api(path, {method = 'GET', body, text = false} = {}) {
    const headers = {Authorization: 'Bearer ' + sessionStorage.getItem(KEY)};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const r = await fetch(API + path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    if (r.status === 401) {
      sessionStorage.removeItem(KEY);
      showLogin('The server did not accept that admin key.');
      throw new Unauthorized();
    }
    if (!r.ok) {
      let message = r.status + ' ' + r.statusText;
      try { message = (await r.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    return text ? r.text() : r.json();
  }

  // -- routing -------------------------------------------------------------------------------

  function parseHash() {
    const raw = location.hash.replace(/^#/, '') || '/';
    const i = raw.indexOf('?');
    return {path: i < 0 ? raw : raw.slice(0, i), params: new URLSearchParams(i < 0 ? '' : raw.slice(i + 1))};
  }

  async function route() {
    if (!sessionStorage.getItem(KEY)) return showLogin();
    header();
    const {path, params} = parseHash();
    const seq = ++routeSeq;
    const m = path.match(/^\/log\/([0-9a-fA-F]+)$/);
    try {
      if (m) await showDetail(m[1], seq);
      else await showList(params, seq);
    } catch (e) {
      if (e instanceof Unauthorized || seq !== routeSeq) return;
      app.replaceChildren(h('p', {class: 'error', role: 'alert'}, 'Could not load: ' + e.message),
                          h('p', {}, h('a', {href: '#/'}, 'Back to the list')));
    }
  }

  function header() {
    const name = localStorage.getItem(REVIEWER);
    document.getElementById('whoami').textContent = name ? 'Reviewing as ' + name : '';
    const out = document.getElementById('signout');
    out.hidden = false;
    out.onclick = () => { sessionStorage.removeItem(KEY); showLogin('Signed out.'); };
  }

  // -- sign in -------------------------------------------------------------------------------

  function showLogin(message) {
    routeSeq++;
    document.getElementById('signout').hidden = true;
    document.getElementById('whoami').textContent = '';
    const key = h('input', {id: 'admin-key', type: 'password', autocomplete: 'off', required: true});
    const name = h('input', {id: 'reviewer-name', type: 'text', maxlength: 200, required: true,
                             value: localStorage.getItem(REVIEWER) || ''});
    const form = h('form', {class: 'login', id: 'login'},
      h('h1', {}, 'Sign in to review'),
      h('p', {}, 'The review page needs the server\'s admin key (GUARD_ADMIN_KEY). It is kept in this tab only.'),
      message ? h('p', {class: 'error', role: 'alert'}, message) : null,
      h('label', {}, 'Admin key', key),
      h('label', {}, 'Your name (stored with your labels)', name),
      h('button', {type: 'submit', id: 'signin'}, 'Open'));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY, key.value.trim());
      localStorage.setItem(REVIEWER, name.value.trim());
      route();
    });
    app.replaceChildren(form);
    key.focus();
  }

  // -- list ----------------------------------------------------------------------------------

  function intParam(params, name, dflt, lo, hi) {
    const v = parseInt(params.get(name), 10);
    return Number.isFinite(v) ? Math.min(hi, Math.max(lo, v)) : dflt;
  }

  async function showList(params, seq) {
    const limit = intParam(params, 'limit', 50, 1, 500);
    const offset = intParam(params, 'offset', 0, 0, 1e9);
    const q = new URLSearchParams({limit, offset});
    for (const f of ['policy', 'monitor', 'outcome', 'label']) if (params.get(f)) q.set(f, params.get(f));
    for (const f of ['since', 'until']) {
      const t = params.get(f) ? localToEpoch(params.get(f)) : null;
      if (t !== null) q.set(f, t);
    }
    const [values, page] = await Promise.all([api('/filters'), api('/logs?' + q)]);
    if (seq !== routeSeq) return;
    listHash = location.hash || '#/';

    const go = (changes) => {
      const next = new URLSearchParams(params);
      for (const [k, v] of Object.entries(changes)) { if (v === '' || v === null) next.delete(k); else next.set(k, v); }
      location.hash = '#/?' + next.toString();
    };
    const select = (name, options) => h('select', {name, id: 'filter-' + name, onchange: (e) => go({[name]: e.target.value, offset: 0})},
      options.map(([value, text]) => h('option', {value, selected: (params.get(name) || '') === value}, text)));
    const any = (label) => [['', label]];
    const time = (name) => h('input', {type: 'datetime-local', name, id: 'filter-' + name, value: params.get(name) || '',
                                       onchange: (e) => go({[name]: e.target.value, offset: 0})});
    const filters = h('form', {class: 'filters', id: 'filters', onsubmit: (e) => e.preventDefault()},
      h('label', {}, 'Policy', select('policy', any('any policy').concat(values.policies.map((p) => [p, p])))),
      h('label', {}, 'Monitor', select('monitor', any('any monitor').concat(values.monitors.map((m) => [m, m])))),
      h('label', {}, 'Outcome', select('outcome', any('any outcome').concat(values.outcomes.map((o) => [o, o])))),
      h('label', {}, 'Label', select('label', any('any label').concat(values.labels.map((l) => [l, LABELS[l] || l])))),
      h('label', {}, 'Since', time('since')),
      h('label', {}, 'Until', time('until')),
      h('button', {type: 'button', onclick: () => { location.hash = '#/'; }}, 'Clear'),
      h('button', {type: 'button', id: 'export', onclick: () => exportLabelled(q)}, 'Export labelled (JSONL)'));

    const rows = page.items.map((r) => h('tr', {class: 'row', 'data-id': r.id, 'data-outcome': r.outcome,
                                                'data-label': r.label || 'unlabelled',
                                                onclick: (e) => { if (e.target.tagName !== 'A') location.hash = '#/log/' + r.id; }},
      h('td', {class: 'nowrap'}, h('a', {href: '#/log/' + r.id}, when(r.created))),
      h('td', {}, r.policy_name),
      h('td', {}, badge(r.outcome)),
      h('td', {class: 'num'}, r.resets),
      h('td', {}, r.monitors_fired.join(', ') || '–'),
      h('td', {}, r.label ? labelBadge(r.label) : h('span', {class: 'muted'}, 'unlabelled')),
      h('td', {class: 'preview'}, r.preview)));
    const table = h('table', {class: 'list', id: 'log-list'},
      h('thead', {}, h('tr', {}, ['Time', 'Policy', 'Outcome', 'Resets', 'Monitors', 'Label', 'Answer'].map((c) => h('th', {}, c)))),
      h('tbody', {}, rows));
    const first = page.total ? offset + 1 : 0;
    const last = offset + page.items.length;
    const pager = h('div', {class: 'pager'},
      h('button', {type: 'button', id: 'prev', disabled: offset === 0, onclick: () => go({offset: Math.max(0, offset - limit)})}, '← Newer'),
      h('span', {id: 'range'}, `${first}–${last} of ${page.total}`),
      h('button', {type: 'button', id: 'next', disabled: last >= page.total, onclick: () => go({offset: offset + limit})}, 'Older →'));
    app.replaceChildren(h('h1', {}, 'Logged generations'), filters, pager,
      page.items.length ? table : h('p', {class: 'empty', id: 'empty'}, 'No record matches these filters.'));
  }

  async function exportLabelled(query) {
    const q = new URLSearchParams(query);
    for (const k of ['limit', 'offset', 'label', 'outcome']) q.delete(k);
    const body = await api('/export?' + q, {text: true});
    const a = h('a', {href: URL.createObjectURL(new Blob([body], {type: 'application/x-ndjson'})),
                      download: 'guard-labelled.jsonl'});
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }

  const badge = (outcome) => h('span', {class: 'badge outcome-' + outcome}, outcome);
  const labelBadge = (label) => h('span', {class: 'badge label-' + label}, LABELS[label] || label);

  // -- detail --------------------------------------------------------------------------------

  async function showDetail(id, seq) {
    const data = await api('/logs/' + encodeURIComponent(id));
    if (seq !== routeSeq) return;
    const rec = data.record;
    const monitors = Object.fromEntries(data.monitors.map((m) => [m.name, m]));
    const conversation = rec.messages
      ? rec.messages.map((m) => h('div', {class: 'msg role-' + String(m.role).replace(/[^a-z]/g, '')},
          h('div', {class: 'role'}, m.role), h('div', {class: 'content text'}, contentText(m.content))))
      : [h('div', {class: 'msg'}, h('div', {class: 'role'}, 'prompt'), h('div', {class: 'content text'}, rec.prompt ?? '(token ids)'))];
    app.replaceChildren(
      h('p', {}, h('a', {href: listHash, id: 'back'}, '← All records')),
      h('h1', {}, 'Generation ', h('code', {id: 'log-id'}, data.id)),
      meta(rec),
      h('div', {class: 'detail'},
        h('div', {class: 'main'},
          section('Conversation', 'conversation', conversation),
          rec.deliberation ? section(`Deliberation (${rec.deliberation})`, 'reasoning',
            h('p', {class: 'muted'}, `${rec.reasoning_ids.length} tokens, ${rec.reasoning_forced_tokens} forced by the controller; never sent to the client.`),
            h('div', {class: 'text'}, rec.reasoning)) : null,
          section('Final answer', 'answer', h('div', {class: 'text', id: 'final-text'}, rec.final_text),
            finalSegment(data, monitors)),
          rec.spans.length ? section(`Discarded spans (${rec.spans.length})`, 'spans', rec.spans.map((sp, i) => spanView(rec, sp, i, monitors))) : null,
          section('Retries', 'retries', retriesTable(rec)),
          section('Firings', 'firings', firingsTable(rec)),
          Object.keys(rec.prompt_scores).length ? section('Prompt scores', 'prompt-scores', promptScores(rec, monitors)) : null,
          rec.monitor_errors.length ? section('Monitor errors', 'monitor-errors', errorsTable(rec)) : null,
          section('Monitors', 'monitors', monitorsTable(data.monitors))),
        h('aside', {class: 'side'}, labelPanel(data))));
  }

  const contentText = (c) => (typeof c === 'string' ? c : JSON.stringify(c, null, 2));

  function section(title, id, ...children) {
    return h('section', {id}, h('h2', {}, title), children);
  }

  function meta(rec) {
    const item = (k, ...v) => [h('dt', {}, k), h('dd', {}, v)];
    return h('dl', {class: 'meta'},
      item('Time', when(rec.created)),
      item('Policy', h('span', {id: 'policy-name'}, rec.policy_name), ' · version ',
           h('code', {id: 'policy-hash', title: 'sha256 of the policy file: ' + rec.policy_hash}, rec.policy_hash.slice(0, 12))),
      item('Model', rec.model),
      item('Outcome', badge(rec.outcome), ' finish: ', rec.finish_reason ?? '–'),
      item('Resets', String(rec.spans.length)),
      item('Tokens', `prompt ${rec.prompt_tokens}, answer ${rec.output_ids.length}, sampled ${rec.sampled_tokens}`),
      item('Seed', rec.seed ?? '–'),
      item('Request', h('code', {}, rec.request_id)));
  }

  // -- token heatmaps and score plots --------------------------------------------------------

  function mix(a, b, t) {
    const c = a.map((x, i) => Math.round(x + (b[i] - x) * Math.min(1, Math.max(0, t))));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }

  // Scores are in [0, 1] (the monitor contract). Below the threshold: white to pale amber; above
  // it: orange to red, so "over the threshold" reads at a glance whatever the threshold is.
  function colour(score, threshold) {
    if (typeof score !== 'number') return null;
    const t = threshold ?? 0.5;
    if (score <= t) return mix([255, 255, 255], [252, 222, 140], t > 0 ? score / t : 0);
    return mix([247, 150, 70], [196, 24, 24], t < 1 ? (score - t) / (1 - t) : 1);
  }

  function legend(threshold) {
    const t = threshold ?? 0.5;
    const steps = Array.from({length: 21}, (_, i) => i / 20);
    return h('div', {class: 'legend'},
      h('span', {class: 'muted'}, 'score 0'),
      h('span', {class: 'ramp'}, steps.map((v) => {
        const cell = h('span', {class: 'ramp-cell' + (Math.abs(v - t) < 0.025 ? ' ramp-thr' : ''), title: fmt(v, 2)});
        cell.style.backgroundColor = colour(v, t);
        return cell;
      })),
      h('span', {class: 'muted'}, '1'),
      h('span', {class: 'legend-thr'}, `threshold ${threshold === null || threshold === undefined ? 'unknown (0.5 assumed)' : fmt(threshold)}`),
      h('span', {class: 'fired-sample'}, 'fired'), h('span', {class: 'muted'}, ' token where the monitor fired'));
  }

  // One block of tokens (a discarded span or the accepted output): a heatmap coloured by the
  // chosen monitor, then one score plot per monitor.
  function tokenBlock({tokens, start, scores, raw, fired, initial, monitors, kind}) {
    const names = Object.keys(scores).filter((m) => scores[m] && scores[m].length);
    const holder = h('div', {class: 'heat-holder'});
    const draw = (mon) => {
      const thr = monitors[mon] ? monitors[mon].threshold : null;
      const firedAt = new Set(fired(mon));
      const toks = tokens ? tokens.map((tok, k) => {
        const pos = start + k;
        const score = (scores[mon] || [])[k];
        const rawScore = raw ? (raw[mon] || [])[k] : undefined;
        const node = h('span', {class: 'tok' + (firedAt.has(pos) ? ' fired' : ''), 'data-pos': pos,
                                'data-score': typeof score === 'number' ? score : null,
                                title: `token ${pos} ${JSON.stringify(tok)} · ${mon} ${fmt(score)}` +
                                       (raw && typeof rawScore === 'number' ? ` (raw ${fmt(rawScore)})` : '')},
                         tok === '' ? '∅' : tok);
        const bg = colour(score, thr);
        if (bg) node.style.backgroundColor = bg;
        if (typeof score === 'number' && score > (thr ?? 0.5) && (score - (thr ?? 0.5)) / (1 - (thr ?? 0.5)) > 0.45) node.classList.add('hot');
        return node;
      }) : [h('p', {class: 'muted'}, 'Token view unavailable: no served tokenizer reproduces this answer (its model is no longer served).')];
      holder.replaceChildren(legend(thr), h('div', {class: 'tokens', 'data-monitor': mon}, toks));
    };
    const choose = names.length > 1
      ? h('label', {class: 'choose'}, 'Colour by ', h('select', {class: 'monitor-select', onchange: (e) => draw(e.target.value)},
          names.map((m) => h('option', {value: m, selected: m === initial}, m))))
      : null;
    if (!names.length) {
      return h('div', {class: 'block'}, h('p', {class: 'muted'}, 'No monitor scored these tokens.'),
               tokens ? h('div', {class: 'tokens'}, tokens.map((t) => h('span', {class: 'tok'}, t))) : null);
    }
    draw(names.includes(initial) ? initial : names[0]);
    const plots = h('div', {class: 'plots'}, names.map((m) => h('figure', {class: 'plot-card'},
      plot(scores[m], {start, threshold: monitors[m] ? monitors[m].threshold : null, fired: fired(m),
                       raw: raw ? raw[m] : null, monitor: m}),
      h('figcaption', {}, `${m}: ${kind} score per token` + (monitors[m] && monitors[m].threshold !== null ? ` (threshold ${fmt(monitors[m].threshold)})` : '')))));
    return h('div', {class: 'block'}, choose, holder, plots);
  }

  function plot(series, {start, threshold, fired, raw, monitor}) {
    const W = 360, H = 140, L = 28, R = 8, T = 10, B = 22;
    const n = series.length;
    const x = (i) => L + (n <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
    const y = (v) => T + (1 - Math.min(1, Math.max(0, v))) * (H - T - B);
    const points = (vals) => vals.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(' ');
    const svg = s('svg', {class: 'plot', viewBox: `0 0 ${W} ${H}`, role: 'img', 'data-monitor': monitor,
                          'aria-label': `${monitor} score over tokens ${start} to ${start + n - 1}`},
      s('title', {}, `${monitor} score over tokens`),
      [0, 0.5, 1].map((v) => [s('line', {class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v)}),
                              s('text', {class: 'axis', x: L - 4, y: y(v) + 4, 'text-anchor': 'end'}, String(v))]),
      s('text', {class: 'axis', x: L, y: H - 6}, String(start)),
      s('text', {class: 'axis', x: W - R, y: H - 6, 'text-anchor': 'end'}, `token ${start + n - 1}`));
    if (typeof threshold === 'number') {
      addChildren(svg, [s('line', {class: 'thr', x1: L, x2: W - R, y1: y(threshold), y2: y(threshold)}),
                        s('text', {class: 'thr-label', x: L + 4, y: y(threshold) - 4}, `threshold ${fmt(threshold, 2)}`)]);
    }
    const differs = raw && raw.length && raw.some((v, i) => Math.abs(v - series[i]) > 1e-9);
    if (differs) addChildren(svg, s('polyline', {class: 'raw', points: points(raw.slice(0, n))}));
    addChildren(svg, s('polyline', {class: 'line', points: points(series)}));
    for (const p of fired) {
      const k = p - start;
      if (k < 0 || k >= n) continue;
      addChildren(svg, s('circle', {class: 'fired-mark', cx: x(k), cy: y(series[k]), r: 5},
                         s('title', {}, `${monitor} fired at token ${p} (score ${fmt(series[k])})`)));
    }
    return svg;
  }

  // Output positions where ``monitor`` fired in ``attempt`` between ``lo`` and ``hi``.
  function firedAt(rec, monitor, attempt, lo, hi) {
    return rec.firings.filter((f) => f.monitor === monitor && (f.scope || 'output') === 'output' &&
                                     f.attempt === attempt && f.position >= lo && f.position < hi).map((f) => f.position);
  }

  function spanView(rec, sp, i, monitors) {
    const end = sp.start + sp.token_ids.length;
    const fired = (m) => [...new Set((m === sp.monitor ? [sp.fired_at] : []).concat(firedAt(rec, m, sp.attempt, sp.start, end)))];
    return h('article', {class: 'span', id: 'span-' + i, 'data-monitor': sp.monitor},
      h('h3', {}, `Span ${i + 1} · attempt ${sp.attempt} · output tokens ${sp.start}–${end - 1}`),
      h('p', {}, h('b', {}, sp.monitor), ` fired at token ${sp.fired_at} `, h('code', {class: 'fired-token'}, JSON.stringify(sp.fired_token)),
        ` (id ${sp.fired_token_id}), threshold ${fmt(sp.threshold)}` +
        (sp.retracted_chars ? `; ${sp.retracted_chars} characters already sent were retracted` : '')),
      tokenBlock({tokens: sp.tokens, start: sp.start, scores: sp.aggregated, raw: sp.scores, fired,
                  initial: sp.monitor, monitors, kind: 'aggregated'}));
  }

  function finalSegment(data, monitors) {
    const rec = data.record;
    if (!rec.output_ids.length) return h('p', {class: 'muted'}, 'No sampled tokens were kept (the answer is the policy\'s refusal).');
    const last = rec.retries.length;
    const fired = (m) => firedAt(rec, m, last, 0, rec.output_ids.length);
    const names = Object.keys(rec.final_scores);
    // Colour by the monitor that came closest to (or past) its threshold on the kept answer.
    const closeness = (m) => Math.max(0, ...rec.final_scores[m]) / ((monitors[m] && monitors[m].threshold) || 0.5);
    const initial = names.find((m) => fired(m).length) || names.slice().sort((a, b) => closeness(b) - closeness(a))[0];
    return h('div', {class: 'final-tokens'},
      h('h3', {}, 'Accepted output, token by token (raw scores)'),
      tokenBlock({tokens: data.output_tokens, start: 0, scores: rec.final_scores, raw: null, fired, initial, monitors, kind: 'raw'}));
  }

  function promptScores(rec, monitors) {
    return h('div', {class: 'plots'}, Object.entries(rec.prompt_scores).map(([m, vals]) => h('figure', {class: 'plot-card'},
      plot(vals, {start: 0, threshold: monitors[m] ? monitors[m].threshold : null,
                  fired: monitors[m] ? monitors[m].prompt_firings : [], raw: null, monitor: m}),
      h('figcaption', {}, `${m}: score per prompt token (max ${fmt(Math.max(...vals))})`))));
  }

  // -- tables --------------------------------------------------------------------------------

  function table(id, head, rows, empty) {
    if (!rows.length) return h('p', {class: 'muted', id}, empty);
    return h('table', {class: 'facts', id}, h('thead', {}, h('tr', {}, head.map((c) => h('th', {}, c)))),
             h('tbody', {}, rows.map((r) => h('tr', {}, r.map((c) => h('td', {}, c))))));
  }

  function retriesTable(rec) {
    return table('retries-table', ['Retry', 'Seed', 'Temperature', 'top_p', 'Banned first tokens', 'Steering'],
      rec.retries.map((r) => [String(r.retry), String(r.seed), String(r.temperature), String(r.top_p),
                              r.banned_first_tokens.join(', ') || '–',
                              r.steer ? `${r.steer.monitor} at layer ${r.steer.layer}, alpha ${r.steer.alpha}` : '–']),
      'No retries.');
  }

  function firingsTable(rec) {
    return table('firings-table', ['Monitor', 'Action', 'Scope', 'Attempt', 'Position', 'Token', 'Score', 'Threshold'],
      rec.firings.map((f) => [f.monitor, f.action === 'log' ? 'log (shadow: changed nothing)' : f.action, f.scope || 'output',
                              String(f.attempt), String(f.position), JSON.stringify(f.token), fmt(f.score), fmt(f.threshold)]),
      'No monitor fired.');
  }

  function errorsTable(rec) {
    return table('errors-table', ['Monitor', 'Scope', 'Attempt', 'Position', 'Error', 'Handling'],
      rec.monitor_errors.map((e) => [e.monitor, e.scope, String(e.attempt), String(e.position), e.error, e.handling]), '');
  }

  function monitorsTable(views) {
    return table('monitors-table', ['Monitor', 'Threshold', 'Fired', 'Output firings', 'Prompt firings', 'Max score'],
      views.map((m) => [m.name, fmt(m.threshold), m.fired ? 'yes' : 'no', m.output_firings.join(', ') || '–',
                        m.prompt_firings.join(', ') || '–', fmt(m.max_score)]), 'No monitor scored this generation.');
  }

  // -- labels --------------------------------------------------------------------------------

  function labelPanel(data) {
    const current = h('p', {id: 'current-label'});
    const history = h('ol', {id: 'label-history', class: 'history'});
    const render = () => {
      const last = data.labels[data.labels.length - 1];
      current.replaceChildren(last ? labelBadge(last.label) : h('span', {class: 'muted'}, 'Not labelled yet'));
      history.replaceChildren(...data.labels.slice().reverse().map((l) => h('li', {'data-label': l.label},
        labelBadge(l.label), ' ', h('span', {class: 'reviewer'}, l.reviewer), ' · ', h('span', {class: 'muted'}, when(l.created)),
        l.note ? h('div', {class: 'note text'}, l.note) : null)));
    };
    const note = h('textarea', {id: 'label-note', rows: 3, maxlength: 4000, placeholder: 'Note (optional): why?'});
    const reviewer = h('input', {id: 'label-reviewer', type: 'text', maxlength: 200, value: localStorage.getItem(REVIEWER) || ''});
    const status = h('p', {id: 'label-status', role: 'status'});
    const buttons = Object.entries(LABELS).map(([label, text]) => h('button', {
      type: 'button', class: 'label-btn label-' + label, 'data-label': label, onclick: () => save(label)}, text));
    async function save(label) {
      const name = reviewer.value.trim();
      if (!name) { status.textContent = 'Enter your name first.'; reviewer.focus(); return; }
      localStorage.setItem(REVIEWER, name);
      buttons.forEach((b) => { b.disabled = true; });
      status.textContent = 'Saving…';
      try {
        const saved = await api(`/logs/${encodeURIComponent(data.id)}/labels`, {method: 'POST', body: {label, note: note.value, reviewer: name}});
        data.labels.push(saved);
        note.value = '';
        render();
        status.textContent = `Saved: ${LABELS[saved.label]} by ${saved.reviewer}.`;
        header();
      } catch (e) {
        if (!(e instanceof Unauthorized)) status.textContent = 'Not saved: ' + e.message;
      } finally {
        buttons.forEach((b) => { b.disabled = false; });
      }
    }
    render();
    return h('div', {class: 'label-panel', id: 'label-panel'},
      h('h2', {}, 'Label'), current,
      h('label', {}, 'Reviewer', reviewer),
      note,
      h('div', {class: 'label-buttons'}, buttons),
      status,
      h('h3', {}, 'History'), history);
  }

  window.addEventListener('hashchange', route);
  route();
})();
