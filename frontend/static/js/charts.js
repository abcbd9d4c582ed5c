// Line charts against step (Chart.js, loaded from /vendor/chart.umd.js as window.Chart).
import { h, num } from "./util.js";

export const SERIES = [
  ["loss", "Loss"], ["reward", "Reward"], ["reverse_kl", "Reverse KL to the teacher"],
  ["lr", "Learning rate"], ["tokens_per_s", "Tokens per second"],
];
const COLORS = ["#2f5bd3", "#d1495b", "#1c7c3c", "#edae49", "#6a4c93", "#00798c", "#8d6a9f", "#e07a5f"];
export const color = (i) => COLORS[i % COLORS.length];

/** A card with a title and a canvas; returns { card, chart } where chart.update(datasets) redraws it. */
export function lineChart(title, { id, yLabel } = {}) {
  const canvas = h("canvas", { role: "img", "aria-label": title });
  const empty = h("p.muted.small", {}, "No data yet.");
  const card = h("section.card.chart-card", { id }, h("h3", {}, title), h("div.chart-box", {}, canvas), empty);
  let chart = null;
  return {
    card,
    update(datasets) {
      const any = datasets.some((d) => d.data.length);
      empty.hidden = any;
      if (!chart) {
        chart = new window.Chart(canvas, {
          type: "line",
          data: { datasets: [] },
          options: {
            animation: false, maintainAspectRatio: false, parsing: false, normalized: true,
            interaction: { mode: "nearest", intersect: false },
            scales: {
              x: { type: "linear", title: { display: true, text: "step" }, ticks: { precision: 0 } },
              y: { title: { display: !!yLabel, text: yLabel }, ticks: { callback: (v) => num(v, 3) } },
            },
            plugins: { legend: { display: datasets.length > 1, position: "bottom" } },
          },
        });
      }
      chart.data.datasets = datasets.map((d, i) => ({
        borderColor: d.color || color(i), backgroundColor: d.color || color(i), pointRadius: d.data.length > 50 ? 0 : 2,
        borderWidth: 2, borderDash: d.dashed ? [6, 4] : undefined, ...d,
      }));
      chart.options.plugins.legend.display = datasets.length > 1;
      chart.update("none");
    },
    destroy() { if (chart) chart.destroy(); },
  };
}

export const points = (series = []) => series.map((p) => ({ x: p.step, y: p.value }));
