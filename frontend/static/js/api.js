// The API client: the bearer token (localStorage), JSON requests, the SSE stream read with fetch().
const KEY = "distill.token";

export const token = {
  get: () => localStorage.getItem(KEY),
  set: (value) => localStorage.setItem(KEY, value),
  clear: () => localStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.detail;
    super(typeof detail === "string" ? detail : `request failed (${status})`);
    this.status = status;
    this.body = body;
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${token.get()}`, ...extra };
}

export async function api(path, { method = "GET", body, raw, signal, headers: extra } = {}) {
  const init = { method, headers: headers(extra), signal };
  if (raw !== undefined) init.body = raw;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(`/api/v1${path}`, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (response.status === 401) window.dispatchEvent(new CustomEvent("distill:unauthorized"));
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/**
 * Download a checkpoint archive or file. A plain link cannot send the bearer header, so the API
 * first signs a short-lived URL for it; the browser's own download manager then streams it to disk
 * (and can resume it), instead of this page holding the whole file in memory.
 */
export async function download(path, filename) {
  const { url } = await api(`${path}/link`, { method: "POST" });
  const a = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
}

/**
 * Follow /jobs/{id}/events/stream: calls onEvent(event) for each event; resolves when the server
 * ends the stream (the job has ended). Reconnects after a broken connection from the last id seen.
 */
export async function followEvents(jobId, { after = 0, onEvent, signal }) {
  let cursor = after;
  while (!signal.aborted) {
    try {
      const response = await fetch(`/api/v1/jobs/${jobId}/events/stream?after=${cursor}`, {
        headers: headers({ Accept: "text/event-stream" }), signal,
      });
      if (!response.ok) throw new ApiError(response.status, null);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (!data) continue;
          const event = JSON.parse(data);
          cursor = Math.max(cursor, event.id);
          onEvent(event);
        }
      }
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && err.status < 500) throw err;
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
}
