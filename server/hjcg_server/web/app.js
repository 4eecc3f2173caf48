"use strict";
// first version: the stats as text; the chat follows
async function poll() {
  const r = await fetch("/hjcg/stats");
  document.getElementById("stats").textContent = JSON.stringify(await r.json(), null, 2);
}
setInterval(poll, 1000);
