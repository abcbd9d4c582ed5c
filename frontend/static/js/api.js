// The API client: the bearer token (localStorage), JSON requests, the SSE stream read with fetch().
const KEY = "distill.token";

export const token = {
  get: () => localStorage.getItem(KEY),
  set: (value) => localStorage.setItem(KEY, value),
  clear: () => localStorage.removeItem(KEY),
};

// An error the API answered: every one is {message, detail: [{loc, msg, type}]} (README, "Errors").
export class ApiError extends Error {
  constructor(status, body) {
    super(body && typeof body.message === "string" ? body.message : `request failed (${status})`);
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
  save(url, filename);
}

/**
 * Save what a GET of `path` answers as a file: for text the API makes for each request (a training
 * log), which has no signed link. It passes through this page's memory; the API caps its size.
 */
export async function saveAnswer(path, filename) {
  const response = await fetch(`/api/v1${path}`, { headers: headers() });
  if (response.status === 401) window.dispatchEvent(new CustomEvent("distill:unauthorized"));
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  const url = URL.createObjectURL(await response.blob());
  save(url, filename);
  setTimeout(() => URL.revokeObjectURL(url), 60_000); // once the browser has taken the file
}

function save(url, filename) {
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
      if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
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
      // 429: the user holds as many streams as allowed (other tabs); wait for one to close.
      if (err instanceof ApiError && err.status < 500 && err.status !== 429) throw err;
      await new Promise((resolve) => setTimeout(resolve, err.status === 429 ? 10000 : 2000));
    }
  }
}
