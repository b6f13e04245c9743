// palfast annotate: keyboard shortcuts and double-submit protection. The pages work
// without this file (plain forms); it only saves clicks.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("answer-form");
  const undo = document.getElementById("undo-form");

  // One submit per page: a second key press while the reply is on its way would be
  // refused by the server anyway (the question is answered once), so do not send it.
  let sent = false;
  for (const f of [form, undo]) {
    if (f) f.addEventListener("submit", (e) => { if (sent) e.preventDefault(); sent = true; });
  }

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || sent) return;
    if (e.target instanceof HTMLInputElement && e.target.type === "text") return;
    if (e.key === "u" && undo && !undo.querySelector("button").disabled) {
      e.preventDefault();
      undo.requestSubmit();
      return;
    }
    if (!form) return;
    const screen = document.body.dataset.screen;
    if (screen === "pair") {
      const button = form.querySelector(`button[data-key="${e.key}"]`);
      if (button) { e.preventDefault(); form.requestSubmit(button); }
    } else if (screen === "captcha") {
      if (e.key === "Enter") { e.preventDefault(); form.requestSubmit(); return; }
      const box = form.querySelector(`label[data-position="${Number(e.key) - 1}"] input`);
      if (/^[1-9]$/.test(e.key) && box) { e.preventDefault(); box.checked = !box.checked; }
    }
  });
});
