// Line charts against step (Chart.js, loaded from /vendor/chart.umd.js as window.Chart), smoothed as
// experiment trackers do (one smoothing control for every chart on the page), with stage changes marked.
import { h, num } from "./util.js";

export const SERIES = [
  ["loss", "Loss"], ["reward", "Reward"], ["reverse_kl", "Reverse KL to the teacher"],
  ["lr", "Learning rate"], ["tokens_per_s", "Tokens per second"],
];
const COLORS = ["#2f5bd3", "#d1495b", "#1c7c3c", "#edae49", "#6a4c93", "#00798c", "#8d6a9f", "#e07a5f"];
export const color = (i) => COLORS[i % COLORS.length];

const SMOOTHING = "distill.smoothing";
let weight = Number(localStorage.getItem(SMOOTHING) ?? 0.6); // TensorBoard's default
const live = new Set(); // the charts on the page, redrawn when the smoothing changes

/** The smoothing slider (0: raw, 0.99: smoothest); kept across pages and visits. */
export function smoothingControl() {
  const input = h("input", { type: "range", id: "smoothing", min: "0", max: "0.99", step: "0.01", value: String(weight) });
  const shown = h("output", { for: "smoothing" }, weight.toFixed(2));
  input.addEventListener("input", () => {
    weight = Number(input.value);
    shown.textContent = weight.toFixed(2);
    localStorage.setItem(SMOOTHING, String(weight));
    for (const chart of live) chart.redraw();
  });
  return h("label.smoothing", {}, "Smoothing ", input, " ", shown);
}

/**
 * TensorBoard's smoothing: an exponential moving average debiased so that it starts at the first
 * value instead of 0; restarted at each step of `restarts` (a stage's first: its loss is another quantity).
 */
export function smooth(data, w, restarts = []) {
  let last = 0, n = 0;
  return data.map((p) => {
    if (restarts.includes(p.x)) [last, n] = [0, 0];
    if (!isFinite(p.y)) return p;
    last = last * w + (1 - w) * p.y;
    n++;
    return { x: p.x, y: last / (1 - w ** n) };
  });
}

/**
 * A card with a title and a canvas; returns { card, update, destroy }. update(datasets, { stages })
 * redraws it: `stages` are [{ step, name }], each stage's first step, marked by a dashed line when
 * there is more than one. `smooth: false` for series that are not noisy measurements (a learning-rate
 * schedule, a few evaluations).
 */
export function lineChart(title, { id, yLabel, smooth: smoothed = true } = {}) {
  const canvas = h("canvas", { role: "img", "aria-label": title });
  const empty = h("p.muted.small", {}, "No data yet.");
  const card = h("section.card.chart-card", { id }, h("h3", {}, title), h("div.chart-box", {}, canvas), empty);
  let chart = null, input = [], stages = [];
  // Chart.js's annotation plugin is not vendored: this chart's own plugin draws the stage changes.
  const stageLines = {
    id: "stageLines",
    afterDatasetsDraw({ ctx, chartArea: area, scales: { x } }) {
      ctx.save();
      ctx.strokeStyle = ctx.fillStyle = "#5d6370";
      ctx.font = "11px system-ui, sans-serif";
      ctx.setLineDash([4, 3]);
      // A line between the last step of a stage and the first of the next, their names either side where they fit.
      for (let i = 1; i < stages.length; i++) {
        const px = x.getPixelForValue(stages[i].step - 0.5);
        if (px < area.left || px > area.right) continue;
        ctx.beginPath(); ctx.moveTo(px, area.top); ctx.lineTo(px, area.bottom); ctx.stroke();
        for (const [name, side] of [[stages[i - 1].name, -1], [stages[i].name, 1]]) {
          const room = side < 0 ? px - area.left : area.right - px;
          if (ctx.measureText(name).width + 8 > room) continue;
          ctx.textAlign = side < 0 ? "right" : "left";
          ctx.fillText(name, px + 4 * side, area.top + 11);
        }
      }
      ctx.restore();
    },
  };

  function redraw() {
    const any = input.some((d) => d.data.length);
    empty.hidden = any;
    if (!chart) {
      chart = new window.Chart(canvas, {
        type: "line",
        data: { datasets: [] },
        plugins: [stageLines],
        options: {
          animation: false, maintainAspectRatio: false, parsing: false, normalized: true,
          interaction: { mode: "nearest", intersect: false },
          scales: {
            x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
            y: { title: { display: !!yLabel, text: yLabel }, ticks: { callback: (v) => num(v, 3) } },
          },
          plugins: { legend: { position: "bottom", labels: { filter: (item, data) => !data.datasets[item.datasetIndex].faint } } },
        },
      });
    }
    const w = smoothed ? weight : 0, restarts = stages.slice(1).map((s) => s.step);
    chart.data.datasets = input.flatMap((d, i) => {
      const c = d.color || color(i);
      const line = { borderColor: c, backgroundColor: c, pointRadius: d.data.length > 50 ? 0 : 2, borderWidth: 2,
        borderDash: d.dashed ? [6, 4] : undefined, ...d };
      if (!w || d.data.length < 2) return [line];
      // The raw series stays, faint, under the smoothed one (c is one of COLORS: #rrggbb, and 40 its alpha).
      const raw = { ...line, label: `${d.label} (raw)`, faint: true, borderColor: c + "40", backgroundColor: c + "40", pointRadius: 0, borderWidth: 1 };
      return [raw, { ...line, data: smooth(d.data, w, restarts) }];
    });
    chart.options.plugins.legend.display = input.length > 1;
    chart.update("none");
  }

  const self = {
    card,
    update(datasets, options = {}) {
      input = datasets;
      stages = options.stages ?? [];
      redraw();
    },
    redraw() { if (chart) redraw(); },
    destroy() { live.delete(self); if (chart) chart.destroy(); },
  };
  live.add(self);
  return self;
}

export const points = (series = []) => series.map((p) => ({ x: p.step, y: p.value }));
