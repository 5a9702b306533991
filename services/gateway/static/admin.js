// The admin dashboard (static/admin.html): reads GET /api/admin/stats for the chosen time range
// and draws it with Chart.js (vendored under /static/vendor/, no CDN). The key is handled as the
// main page handles it: from the #key= fragment or the form, kept in this tab's sessionStorage,
// sent as a Bearer header. Once every chart of a load is drawn, <body data-ready="true">.
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const h = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    for (const c of children) node.append(c);
    return node;
  };

  // ---------------------------------------------------------------- formatting
  const number = new Intl.NumberFormat();
  const fmtInt = (n) => number.format(n);
  const fmtPct = (r) => (r === null || r === undefined ? '–' : `${(r * 100).toFixed(r === 0 || r === 1 ? 0 : 1)}%`);
  const fmtCents = (c) => (Math.abs(c) >= 100 ? `$${(c / 100).toFixed(2)}` : `${fmtInt(c)}¢`);
  /** Seconds as a short duration: 12 ms, 2.5 s, 4 min, 1 h. */
  const fmtSeconds = (s) => {
    if (s === null || s === undefined) return '–';
    if (s < 1) return `${+(s * 1000).toPrecision(s < 0.01 ? 2 : 3)} ms`;
    if (s < 60) return `${+s.toPrecision(3)} s`;
    if (s < 3600) return `${+(s / 60).toPrecision(3)} min`;
    return `${+(s / 3600).toPrecision(3)} h`;
  };
  const fmtBound = (s) => fmtSeconds(s).replace(' ', '');
  const RANGES = { '15m': 900, '1h': 3600, '6h': 21600, '24h': 86400, '7d': 604800 };
  const REASON_LABELS = {
    generator_error: 'generator error', invalid: 'invalid', withheld: 'all withheld',
    interrupted: 'interrupted', gave_up: 'gave up', unknown: 'unknown',
  };
  const STAGE_LABELS = {
    queue_wait: 'queue wait', starting: 'starting', model_load: 'model load',
    encoding_prompt: 'prompt encoding', denoise: 'denoise', decode: 'decode',
    encoding_png: 'PNG encoding', upload: 'upload', evaluate: 'evaluate',
  };
  const COLORS = {
    accent: '#2350b8', accentSoft: 'rgba(35, 80, 184, 0.12)', cache: '#7c5cc4', ok: '#17703a',
    warn: '#c98a12', muted: '#56606c', estimate: '#a9bce6', grid: '#e9ecf1',
    failed: { generator_error: '#b42318', invalid: '#e0584c', withheld: '#7a1a12', interrupted: '#f0a196', gave_up: '#d0342c', unknown: '#9aa1ab' },
    p50: '#17703a', p95: '#c98a12', p99: '#b42318',
    stages: ['#a9bce6', '#2350b8', '#13306e'],
    kinds: { prompt: '#b42318', image: '#c98a12' },
  };

  // ---------------------------------------------------------------- API key
  const KEY_STORAGE = 'imagegen.api_key';
  const KEY_PATTERN = /igk_[A-Za-z0-9_-]{40}/;
  const auth = {
    memory: '',
    get() {
      try { return sessionStorage.getItem(KEY_STORAGE) || this.memory; } catch { return this.memory; }
    },
    set(key) {
      this.memory = key;
      try { sessionStorage.setItem(KEY_STORAGE, key); } catch { /* storage disabled: memory only */ }
    },
    clear() {
      this.memory = '';
      try { sessionStorage.removeItem(KEY_STORAGE); } catch { /* nothing stored */ }
    },
  };
  const keyLabel = (key) => key.slice(0, 12) + '…';

  /** Reads the fragment: `key=` is stored and removed from the address, `range=` (or `from=`
   *  and `to=`) picks the time range. */
  function readHash() {
    const parts = location.hash.replace(/^#/, '').split('&').filter(Boolean);
    const params = new Map(parts.map((p) => {
      const at = p.indexOf('=');
      let value = at < 0 ? '' : p.slice(at + 1);
      try { value = decodeURIComponent(value); } catch { /* used as it is */ }
      return [at < 0 ? p : p.slice(0, at), value.trim()];
    }));
    if (params.has('key')) {
      if (params.get('key')) auth.set(params.get('key'));
      params.delete('key');
    }
    if (RANGES[params.get('range')]) state.range = state.preset = params.get('range');
    if (params.has('from') && params.has('to') && !Number.isNaN(Date.parse(params.get('from')))
        && !Number.isNaN(Date.parse(params.get('to')))) {
      state.range = 'custom';
      state.custom = { from: new Date(params.get('from')), to: new Date(params.get('to')) };
    }
    writeHash();
  }

  /** The address shows the range (never the key), so that it can be shared or reloaded. */
  function writeHash() {
    const hash = state.range === 'custom' && state.custom
      ? `#from=${state.custom.from.toISOString()}&to=${state.custom.to.toISOString()}`
      : `#range=${state.range}`;
    history.replaceState(history.state, '', location.pathname + location.search + hash);
  }

  function showKeyPrompt(message) {
    stopAutoRefresh();
    $('key-panel').hidden = false;
    $('app').hidden = true;
    $('key-status').hidden = true;
    $('key-forget').hidden = true;
    $('key-error').textContent = message || '';
    $('key-error').hidden = !message;
    $('api-key').value = '';
    $('api-key').focus();
  }

  function showApp() {
    $('key-panel').hidden = true;
    $('app').hidden = false;
    $('key-status').textContent = 'key ' + keyLabel(auth.get());
    $('key-status').title = 'The API key this tab uses';
    $('key-status').hidden = false;
    $('key-forget').hidden = false;
  }

  class ApiError extends Error {
    constructor(status, body, retryAfter) {
      const e = body && body.error;
      super((e && e.message) || `HTTP ${status}`);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  async function getJson(path) {
    const key = auth.get();
    const res = await fetch(path, { headers: { Accept: 'application/json', Authorization: 'Bearer ' + key }, cache: 'no-store' });
    let data = null;
    try { data = await res.json(); } catch { data = null; }
    if (!res.ok) throw new ApiError(res.status, data, Number(res.headers.get('Retry-After')) || null);
    return data;
  }

  // ---------------------------------------------------------------- state
  const state = {
    range: '1h',
    preset: '1h',       // the last range picked other than custom
    custom: null,       // {from: Date, to: Date} for the custom range
    stats: null,        // the last answer of /api/admin/stats
    charts: new Map(),  // canvas id -> Chart
    loading: 0,         // the number of the latest load; older answers are dropped
    autoTimer: null,
    retryTimer: null,
  };

  function query() {
    if (state.range === 'custom' && state.custom) {
      return `from=${encodeURIComponent(state.custom.from.toISOString())}&to=${encodeURIComponent(state.custom.to.toISOString())}`;
    }
    const to = new Date();
    const from = new Date(to.getTime() - RANGES[state.range] * 1000);
    return `from=${encodeURIComponent(from.toISOString())}&to=${encodeURIComponent(to.toISOString())}`;
  }

  async function load() {
    const mine = ++state.loading;
    clearTimeout(state.retryTimer);
    document.body.dataset.ready = 'false';
    $('refresh').disabled = true;
    try {
      const stats = await getJson('/api/admin/stats?' + query());
      if (mine !== state.loading) return;
      state.stats = stats;
      $('load-error').hidden = true;
      render(stats);
    } catch (err) {
      if (mine !== state.loading) return;
      if (err.status === 401) {
        const key = auth.get();
        auth.clear();
        showKeyPrompt(`The server refused the key ${keyLabel(key)} (${err.message}). Enter a valid API key.`);
      } else if (err.status === 403) {
        showKeyPrompt(`The key ${keyLabel(auth.get())} cannot read the dashboard (${err.message}). Enter a key with the admin scope.`);
      } else {
        const wait = err.status === 503 ? (err.retryAfter || 5) : null;
        $('load-error').textContent = `Could not load the statistics: ${err.message}`
          + (wait ? ` Trying again in ${wait} s.` : '');
        $('load-error').hidden = false;
        if (wait) state.retryTimer = setTimeout(load, wait * 1000);
      }
    } finally {
      if (mine === state.loading) $('refresh').disabled = false;
    }
  }

  // ---------------------------------------------------------------- charts
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;
  Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
  Chart.defaults.font.size = 12;
  Chart.defaults.color = COLORS.muted;
  Chart.defaults.borderColor = COLORS.grid;
  Chart.defaults.plugins.legend.labels.boxWidth = 12;
  Chart.defaults.plugins.legend.labels.boxHeight = 12;
  Chart.defaults.plugins.tooltip.mode = 'index';
  Chart.defaults.plugins.tooltip.intersect = false;

  /** Vertical markers on a histogram at fractional bucket positions: {label, at, color}. */
  const markers = {
    id: 'markers',
    afterDatasetsDraw(chart, _args, options) {
      const list = (options && options.list) || [];
      const x = chart.scales.x;
      if (!list.length || !x) return;
      const step = x.getPixelForValue(1) - x.getPixelForValue(0);
      const { ctx, chartArea } = chart;
      ctx.save();
      ctx.font = `600 11px ${Chart.defaults.font.family}`;
      ctx.textAlign = 'left';
      list.forEach((m, i) => {
        const px = x.getPixelForValue(0) + (m.at - 0.5) * step;
        const labelY = chartArea.top + 10 + i * 13; // stacked: close percentiles stay legible
        ctx.strokeStyle = m.color;
        ctx.lineWidth = 2;
        ctx.setLineDash([5, 3]);
        ctx.beginPath();
        ctx.moveTo(px, labelY - 9);
        ctx.lineTo(px, chartArea.bottom);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillStyle = m.color;
        ctx.fillText(m.label, px + 4, labelY);
      });
      ctx.restore();
    },
  };

  /** Draws (or replaces) the chart of `id`; with `empty`, shows the empty state instead. */
  function draw(id, config, summary, empty) {
    const old = state.charts.get(id);
    if (old) { old.destroy(); state.charts.delete(id); }
    const canvas = $('chart-' + id);
    canvas.parentElement.hidden = !!empty;
    $('empty-' + id).hidden = !empty;
    canvas.setAttribute('aria-label', empty ? $('empty-' + id).textContent : summary);
    canvas.textContent = empty ? '' : summary; // fallback content for assistive technology
    if (!empty) state.charts.set(id, new Chart(canvas, config));
  }

  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  const anyOf = (...series) => series.some((s) => s.some((v) => v));

  function timeLabels(stats) {
    const bucket = stats.bucket_seconds;
    const span = Date.parse(stats.to) - Date.parse(stats.from);
    const opts = bucket >= 86400 ? { month: 'short', day: 'numeric' }
      : span > 86400000 ? { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', hourCycle: 'h23' }
        : { hour: '2-digit', minute: '2-digit', second: bucket < 60 ? '2-digit' : undefined, hourCycle: 'h23' };
    const fmt = new Intl.DateTimeFormat([], opts);
    return stats.buckets.map((t) => fmt.format(new Date(t)));
  }

  const timeAxis = { grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 14 } };
  const countAxis = (title) => ({ beginAtZero: true, ticks: { precision: 0 }, title: { display: !!title, text: title } });
  const bucketWord = (s) => (s % 86400 === 0 ? `${s / 86400} d` : s % 3600 === 0 ? `${s / 3600} h` : s % 60 === 0 ? `${s / 60} min` : `${s} s`);
  const perWord = (s) => ({ 60: 'per minute', 3600: 'per hour', 86400: 'per day' })[s] || `per ${bucketWord(s)}`;

  function render(stats) {
    const labels = timeLabels(stats);
    const t = stats.totals;
    const perBucket = perWord(stats.bucket_seconds);
    $('range-note').textContent = `${new Date(stats.from).toLocaleString()} – ${new Date(stats.to).toLocaleString()} · buckets of ${bucketWord(stats.bucket_seconds)}`;

    // Tiles
    $('t-admitted').textContent = fmtInt(t.admitted);
    $('t-completed').replaceChildren(fmtInt(t.completed), h('small', { text: `${fmtInt(t.rendered)} rendered · ${fmtInt(t.cache_hits)} from cache` }));
    const reasons = Object.entries(t.failed_by_reason).filter(([, n]) => n).map(([r, n]) => `${n} ${REASON_LABELS[r] || r}`);
    $('t-failed').replaceChildren(fmtInt(t.failed), h('small', { text: reasons.join(' · ') || 'none' }));
    $('tile-failed').classList.toggle('bad', t.failed > 0);
    $('t-cancelled').textContent = fmtInt(t.cancelled);
    $('t-hit').replaceChildren(fmtPct(t.hit_ratio), h('small', { text: `${fmtInt(t.cache_hits)} of ${fmtInt(t.cache_lookups)} lookups` }));
    const e2e = stats.durations.end_to_end;
    $('t-p95').replaceChildren(fmtSeconds(e2e.p95), h('small', { text: `p50 ${fmtSeconds(e2e.p50)} · ${fmtInt(e2e.count)} jobs` }));
    $('t-cost').replaceChildren(fmtCents(t.actual_cents), h('small', { text: `estimated ${fmtCents(t.estimated_cents)}` }));

    // Cache hit ratio
    const c = stats.cache;
    $('note-hit').textContent = `${fmtInt(sum(c.hit_seed))} seed-aware · ${fmtInt(sum(c.hit_seedless))} seed-agnostic hits · ${fmtInt(sum(c.miss))} misses`;
    // The ratio (a line, left axis) over the lookups it is made of (bars, right axis).
    const hits = c.hit_seed.map((n, i) => n + c.hit_seedless[i]);
    draw('hit', {
      type: 'bar',
      data: {
        labels,
        datasets: [
          {
            type: 'line', label: 'hit ratio', data: c.hit_ratio.map((r) => (r === null ? null : r * 100)),
            borderColor: COLORS.cache, backgroundColor: COLORS.cache, pointRadius: 3.5, pointHoverRadius: 5,
            spanGaps: true, tension: 0.2, order: 0,
          },
          { label: 'hits', data: hits, backgroundColor: 'rgba(124, 92, 196, 0.28)', stack: 'lookups', yAxisID: 'y1', order: 1 },
          { label: 'misses', data: c.miss, backgroundColor: 'rgba(86, 96, 108, 0.18)', stack: 'lookups', yAxisID: 'y1', order: 1 },
        ],
      },
      options: {
        plugins: {
          legend: { position: 'bottom' },
          tooltip: { callbacks: { label: (ctx) => (ctx.dataset.type === 'line' ? ` hit ratio ${ctx.parsed.y.toFixed(1)}%` : ` ${ctx.dataset.label} ${ctx.parsed.y}`) } },
        },
        scales: {
          x: { ...timeAxis, stacked: true },
          y: { min: 0, max: 100, ticks: { callback: (v) => `${v}%` }, title: { display: true, text: 'hit ratio' } },
          y1: { position: 'right', stacked: true, beginAtZero: true, grid: { display: false }, ticks: { precision: 0 }, title: { display: true, text: `lookups ${perBucket}` } },
        },
      },
    }, `Cache hit ratio over time: ${fmtPct(t.hit_ratio)} of ${t.cache_lookups} lookups overall.`, t.cache_lookups === 0);

    // Throughput and failures
    const j = stats.jobs;
    const failedSets = Object.entries(j.failed).filter(([, s]) => s.some((v) => v)).map(([reason, s]) => ({
      label: `failed: ${REASON_LABELS[reason] || reason}`, data: s, backgroundColor: COLORS.failed[reason] || COLORS.failed.unknown, stack: 'jobs',
    }));
    $('note-throughput').textContent = `${t.throughput_per_minute.toFixed(2)} completed per minute`;
    draw('throughput', {
      type: 'bar',
      data: {
        labels,
        datasets: [
          { label: 'rendered', data: j.rendered, backgroundColor: COLORS.accent, stack: 'jobs' },
          { label: 'from cache', data: j.cache_hits, backgroundColor: COLORS.cache, stack: 'jobs' },
          ...failedSets,
          { label: 'cancelled', data: j.cancelled, backgroundColor: COLORS.warn, stack: 'jobs' },
        ],
      },
      options: {
        plugins: { legend: { position: 'bottom' } },
        scales: { x: { ...timeAxis, stacked: true }, y: { ...countAxis(`jobs ended ${perBucket}`), stacked: true } },
      },
    }, `Jobs ended ${perBucket}: ${t.rendered} rendered, ${t.cache_hits} from the cache, ${t.failed} failed, ${t.cancelled} cancelled.`,
    !anyOf(j.rendered, j.cache_hits, j.cancelled, ...Object.values(j.failed)));

    // Queue depth
    const q = stats.queue;
    $('note-queue').textContent = `peak ${fmtInt(t.queue_peak)} waiting`;
    draw('queue', {
      type: 'line',
      data: {
        labels,
        datasets: [
          { label: 'peak in the bucket', data: q.depth_peak, borderColor: COLORS.accent, backgroundColor: COLORS.accentSoft, fill: 'origin', stepped: 'middle', pointRadius: 0 },
          { label: 'at the end of the bucket', data: q.depth_end, borderColor: COLORS.muted, borderDash: [5, 4], borderWidth: 1.5, stepped: 'middle', pointRadius: 0 },
        ],
      },
      options: { plugins: { legend: { position: 'bottom' } }, scales: { x: timeAxis, y: countAxis('jobs waiting') } },
    }, `Queue depth over time: at most ${t.queue_peak} jobs waiting.`, t.admitted === 0 && !anyOf(q.depth_peak));

    // Cost
    const k = stats.cost;
    $('note-cost').textContent = `${fmtCents(t.estimated_cents)} estimated · ${fmtCents(t.actual_cents)} charged`;
    draw('cost', {
      type: 'bar',
      data: {
        labels,
        datasets: [
          { label: 'estimated at admission', data: k.estimated_cents, backgroundColor: COLORS.estimate },
          { label: 'charged', data: k.actual_cents, backgroundColor: COLORS.ok },
        ],
      },
      options: {
        plugins: { legend: { position: 'bottom' } },
        scales: { x: timeAxis, y: { beginAtZero: true, ticks: { precision: 0 }, title: { display: true, text: `cents ${perBucket}, by end time` } } },
      },
    }, `Cost: ${t.estimated_cents} cents estimated, ${t.actual_cents} cents charged for the jobs that ended.`,
    !anyOf(k.estimated_cents, k.actual_cents));

    renderDuration(stats);
    renderStages(stats);

    // Refusals
    const r = stats.refusals;
    const categories = [...new Set(r.by_category.map((x) => x.category))];
    const kinds = [['prompt', 'prompts refused'], ['image', 'images withheld']];
    $('note-refusals').textContent = r.from_day === r.to_day ? `counted per day: ${r.from_day}` : `counted per day: ${r.from_day} to ${r.to_day}`;
    draw('refusals', {
      type: 'bar',
      data: {
        labels: categories,
        datasets: kinds.map(([kind, label]) => ({
          label, backgroundColor: COLORS.kinds[kind], stack: 'kind', maxBarThickness: 40,
          data: categories.map((cat) => sum(r.by_category.filter((x) => x.kind === kind && x.category === cat).map((x) => x.count))),
        })),
      },
      options: {
        indexAxis: 'y',
        plugins: { legend: { position: 'bottom' } },
        scales: { x: { ...countAxis('refusals'), stacked: true }, y: { stacked: true, grid: { display: false } } },
      },
    }, `Refusals by category: ${r.by_category.map((x) => `${x.count} ${x.kind} ${x.category}`).join(', ')}.`, r.by_category.length === 0);

    // Models
    const models = stats.models;
    $('note-models').textContent = `${fmtInt(sum(models.map((m) => m.images)))} images asked for`;
    const modelSet = (label, field, color) => ({ label, data: models.map((m) => m[field]), backgroundColor: color, stack: 'model', maxBarThickness: 40 });
    draw('models', {
      type: 'bar',
      data: {
        labels: models.map((m) => m.model || '(none)'),
        datasets: [
          modelSet('rendered', 'rendered', COLORS.accent),
          modelSet('from cache', 'cache_hits', COLORS.cache),
          modelSet('failed', 'failed', COLORS.failed.generator_error),
          modelSet('cancelled', 'cancelled', COLORS.warn),
        ],
      },
      options: {
        indexAxis: 'y',
        plugins: { legend: { position: 'bottom' }, tooltip: { callbacks: { footer: (items) => `${fmtCents(models[items[0].dataIndex].charged_cents)} charged` } } },
        scales: { x: { ...countAxis('jobs admitted'), stacked: true }, y: { stacked: true, grid: { display: false } } },
      },
    }, `Usage per model: ${models.map((m) => `${m.model} ${m.jobs} jobs`).join(', ')}.`, models.length === 0);

    document.body.dataset.ready = 'true';
  }

  /** The histogram picked in the select: end to end, or one stage. */
  function durationChoices(stats) {
    const d = stats.durations;
    return [
      ['end_to_end', 'End to end, completed jobs', d.end_to_end],
      ['end_to_end_all', 'End to end, every job that ended', d.end_to_end_all],
      ...Object.entries(d.stages).filter(([, hist]) => hist.count).map(([name, hist]) => [`stage:${name}`, `Stage: ${STAGE_LABELS[name] || name}`, hist]),
    ];
  }

  function renderDuration(stats) {
    const select = $('duration-of');
    const choices = durationChoices(stats);
    const picked = choices.some(([v]) => v === select.value) ? select.value : 'end_to_end';
    select.replaceChildren(...choices.map(([value, label]) => h('option', { value, text: label })));
    select.value = picked;
    const [, label, hist] = choices.find(([v]) => v === picked);
    const bounds = stats.durations.bounds_seconds;
    const labels = hist.counts.map((_, i) => (i === 0 ? `<${fmtBound(bounds[0])}`
      : i === bounds.length ? `≥${fmtBound(bounds[i - 1])}` : `${fmtBound(bounds[i - 1])}–${fmtBound(bounds[i])}`));
    /** Where `s` lies on the category axis: bucket index plus the fraction into it. */
    const at = (s) => {
      let i = 0;
      while (i < bounds.length && s >= bounds[i]) i++;
      if (i === bounds.length) return i + 0.5;
      const lo = i === 0 ? 0 : bounds[i - 1];
      return i + (s - lo) / (bounds[i] - lo);
    };
    const pcts = ['p50', 'p95', 'p99'].filter((p) => hist[p] !== null);
    const mean = hist.count ? hist.sum_seconds / hist.count : null;
    $('note-duration').textContent = hist.count ? `${fmtInt(hist.count)} samples · mean ${fmtSeconds(mean)}` : '';
    $('duration-pcts').replaceChildren(...(hist.count ? [
      ...pcts.flatMap((p) => [h('dt', {}, h('span', { class: 'swatch', style: `background:${COLORS[p]}` }), p), h('dd', { text: fmtSeconds(hist[p]) })]),
      h('dt', { text: 'mean' }), h('dd', { text: fmtSeconds(mean) }),
      h('dt', { text: 'samples' }), h('dd', { text: fmtInt(hist.count) }),
    ] : []));
    $('empty-duration').textContent = `No samples of “${label.toLowerCase()}” in this range.`;
    draw('duration', {
      type: 'bar',
      data: { labels, datasets: [{ label: 'jobs', data: hist.counts, backgroundColor: COLORS.accent, barPercentage: 0.96, categoryPercentage: 0.96 }] },
      options: {
        layout: { padding: { top: 4 } },
        plugins: {
          legend: { display: false },
          markers: { list: pcts.map((p) => ({ label: p, at: at(hist[p]), color: COLORS[p] })) },
        },
        scales: {
          x: { grid: { display: false }, ticks: { maxRotation: 0, autoSkip: true, autoSkipPadding: 6 }, title: { display: true, text: 'seconds' } },
          y: { ...countAxis('samples'), grace: '12%' },
        },
      },
      plugins: [markers],
    }, `${label}: ${hist.count} samples; ${pcts.map((p) => `${p} ${fmtSeconds(hist[p])}`).join(', ')}.`, hist.count === 0);
  }

  function renderStages(stats) {
    const stages = Object.entries(stats.durations.stages).filter(([, hist]) => hist.count);
    const labels = stages.map(([name]) => STAGE_LABELS[name] || name);
    const positive = (v) => (v > 0 ? v : null); // a log scale has no zero
    const oneTwoFive = (v) => v > 0 && [1, 2, 5].some((k) => Math.abs(v / 10 ** Math.floor(Math.log10(v)) - k) < 1e-6);
    draw('stages', {
      type: 'bar',
      data: {
        labels,
        datasets: ['p50', 'p95', 'p99'].map((p, i) => ({
          label: p, data: stages.map(([, hist]) => positive(hist[p])), backgroundColor: COLORS.stages[i],
        })),
      },
      options: {
        plugins: { legend: { position: 'bottom' }, tooltip: { callbacks: { label: (ctx) => ` ${ctx.dataset.label} ${fmtSeconds(ctx.parsed.y)}` } } },
        scales: {
          x: { grid: { display: false } },
          y: { type: 'logarithmic', title: { display: true, text: 'seconds' }, ticks: { callback: (v) => (oneTwoFive(v) ? fmtSeconds(v) : '') } },
        },
      },
    }, `Time per stage: ${stages.map(([name, hist]) => `${STAGE_LABELS[name] || name} p50 ${fmtSeconds(hist.p50)}, p95 ${fmtSeconds(hist.p95)}, p99 ${fmtSeconds(hist.p99)}`).join('; ')}.`,
    stages.length === 0);
  }

  // ---------------------------------------------------------------- controls
  const toLocalInput = (d) => {
    const pad = (n) => String(n).padStart(2, '0');
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
  };

  function syncControls() {
    $('range-' + state.range).checked = true;
    $('custom-range').hidden = state.range !== 'custom';
    if (state.range === 'custom') {
      // By default the range shown last, widened to whole minutes (the inputs hold minutes).
      const minute = 60000;
      const to = Math.ceil(Date.now() / minute) * minute;
      const from = Math.floor((Date.now() - RANGES[state.preset] * 1000) / minute) * minute;
      const custom = state.custom || { from: new Date(from), to: new Date(to) };
      $('custom-from').value = toLocalInput(custom.from);
      $('custom-to').value = toLocalInput(custom.to);
    }
  }

  function stopAutoRefresh() {
    clearInterval(state.autoTimer);
    state.autoTimer = null;
  }

  function wire() {
    $('ranges').addEventListener('change', (ev) => {
      state.range = ev.target.value;
      if (RANGES[state.range]) state.preset = state.range;
      syncControls();
      if (state.range === 'custom') { $('custom-from').focus(); return; }
      writeHash();
      load();
    });
    $('custom-range').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const from = new Date($('custom-from').value);
      const to = new Date($('custom-to').value);
      const err = $('range-error');
      let problem = '';
      if (Number.isNaN(from.getTime())) problem = 'Give the start of the range.';
      else if (Number.isNaN(to.getTime())) problem = 'Give the end of the range.';
      else if (from >= to) problem = 'The start must be before the end.';
      $('custom-from').setAttribute('aria-invalid', String(problem !== '' && !problem.includes('end')));
      $('custom-to').setAttribute('aria-invalid', String(problem.includes('end of')));
      err.textContent = problem;
      err.hidden = !problem;
      if (problem) return;
      state.custom = { from, to };
      writeHash();
      load();
    });
    $('refresh').addEventListener('click', load);
    $('auto-refresh').addEventListener('change', (ev) => {
      stopAutoRefresh();
      if (ev.target.checked) state.autoTimer = setInterval(() => { if (!document.hidden) load(); }, 30000);
    });
    $('duration-of').addEventListener('change', () => { if (state.stats) renderDuration(state.stats); });
    $('key-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const m = KEY_PATTERN.exec($('api-key').value);
      if (!m) {
        $('key-error').textContent = 'That is not an API key: one is igk_ followed by 40 letters, digits, “-” or “_”.';
        $('key-error').hidden = false;
        $('api-key').focus();
        return;
      }
      auth.set(m[0]);
      boot();
    });
    $('key-forget').addEventListener('click', () => {
      auth.clear();
      showKeyPrompt('The key was forgotten: this tab no longer holds it.');
    });
    window.addEventListener('hashchange', () => { readHash(); syncControls(); if (auth.get()) boot(); });
  }

  function boot() {
    showApp();
    load();
  }

  wire();
  readHash();
  syncControls();
  if (auth.get()) boot();
  else showKeyPrompt();
})();
