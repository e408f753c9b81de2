// modlabel serve, review mode: a key presses the review page's button that carries it
// (data-key: 1-9 a class in the model's order, 0 none of the classes, u undo). The form
// is then posted as by a click; nothing else happens here.
"use strict";

(function () {
  let sending = false;

  document.addEventListener("keydown", function (event) {
    if (sending || event.defaultPrevented || event.repeat) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target instanceof HTMLElement) {
      const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(target.tagName);
      if (typing || target.isContentEditable) return;
    }
    const key = event.key.length === 1 ? event.key.toLowerCase() : "";
    if (!key) return;
    const button = document.querySelector('button[data-key="' + CSS.escape(key) + '"]');
    if (!button || button.disabled || !button.form) return;
    event.preventDefault();
    sending = true; // one key, one review: the next page resets this
    button.classList.add("pressed");
    button.form.requestSubmit(button);
  });

  // Back from the browser's cache (the back button): keys work again.
  window.addEventListener("pageshow", function () {
    sending = false;
  });
})();
