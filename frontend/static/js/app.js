// The single-page app: sign-in, a hash router (#/jobs, #/jobs/ID, #/new, #/compare?ids=a,b).
import { token } from "./api.js";
import { h, loadStatuses } from "./util.js";
import * as jobs from "./pages/jobs.js";
import * as job from "./pages/job.js";
import * as newJob from "./pages/new.js";
import * as compare from "./pages/compare.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let cleanup = null;

// The link printed by `distill up` is http://host/#token=...: sign in, then drop the token from the URL.
function takeTokenFromHash() {
  const match = location.hash.match(/^#token=([^&]+)/);
  if (!match) return false;
  token.set(decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + "#/jobs");
  return true;
}

function route() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query);
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "jobs" && parts[1]) return { page: job, args: { id: decodeURIComponent(parts[1]) }, nav: "#/jobs" };
  if (parts[0] === "new") return { page: newJob, args: { params }, nav: "#/new" };
  if (parts[0] === "compare") return { page: compare, args: { params }, nav: "#/compare" };
  return { page: jobs, args: { params }, nav: "#/jobs" };
}

function signIn() {
  nav.hidden = true;
  const input = h("input", { id: "token", type: "password", autocomplete: "current-password", required: true, spellcheck: "false" });
  const form = h("form.card.signin", {
    onsubmit: (e) => {
      e.preventDefault();
      if (!input.value.trim()) return;
      token.set(input.value.trim());
      location.hash = "#/jobs";
      render();
    },
  },
  h("h1", {}, "Sign in"),
  h("p.muted", {}, "Paste your API token (", h("code", {}, "distill users create NAME"), " prints one), or open the link printed by ", h("code", {}, "distill up"), "."),
  h("div.field", {}, h("label", { for: "token" }, "API token"), input),
  h("p", {}, h("button", { type: "submit" }, "Sign in")));
  main.replaceChildren(form);
  input.focus();
}

function render() {
  if (cleanup) { cleanup(); cleanup = null; }
  if (!token.get()) return signIn();
  nav.hidden = false;
  const { page, args, nav: current } = route();
  for (const a of nav.querySelectorAll("a")) {
    if (a.getAttribute("href") === current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  main.replaceChildren();
  cleanup = page.render(main, args) || null;
}

document.getElementById("sign-out").addEventListener("click", () => {
  token.clear();
  location.hash = "";
  render();
});

window.addEventListener("distill:unauthorized", () => {
  token.clear();
  render();
  const note = h("p.error-box", { role: "alert" }, "That token was not accepted; sign in again.");
  main.querySelector("form")?.prepend(note);
});

window.addEventListener("hashchange", () => {
  if (takeTokenFromHash()) return render();
  render();
  main.focus({ preventScroll: true });
});

takeTokenFromHash();
// The pages read the job statuses from the API's schema; without it they still render (an empty filter).
loadStatuses().catch((err) => console.warn("could not read the job statuses from /openapi.json", err)).finally(render);
