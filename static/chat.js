// chat.py page behaviour that htmx cannot express: keyboard sending, autoscroll,
// copy buttons and the live-region announcements. No build step, no dependencies.
// Everything is delegated from document: boosted navigation replaces the whole body.
(function () {
  "use strict";
  function byId(id) { return document.getElementById(id); }
  function announce(text) { var s = byId("status"); if (s) s.textContent = text; }

  // Enter sends, Shift+Enter is a newline, and never while an IME composition is open
  // (keyCode 229 covers browsers that end the composition before keydown).
  document.addEventListener("keydown", function (e) {
    if (e.target.id !== "prompt" || e.key !== "Enter" || e.shiftKey || e.isComposing || e.keyCode === 229) return;
    e.preventDefault();
    if (!byId("send").disabled) byId("composer").requestSubmit();
  });

  document.addEventListener("htmx:beforeRequest", function (e) {
    if (e.detail.elt.id === "composer") byId("form-error").textContent = "";
  });
  document.addEventListener("htmx:afterRequest", function (e) {
    if (e.detail.elt.id !== "composer") return;
    // Only a successful send clears the box: on an error the user's words stay.
    if (e.detail.xhr && e.detail.xhr.status === 200) {
      byId("prompt").value = "";
      announce("Answering…");
      stick = true;
      scrollToEnd();
    }
    byId("prompt").focus();
  });

  // Autoscroll follows new text only while the reader is at the bottom.
  var stick = true;
  function atBottom() {
    var el = document.scrollingElement;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 48;
  }
  function scrollToEnd() { window.scrollTo(0, document.scrollingElement.scrollHeight); }
  window.addEventListener("scroll", function () { stick = atBottom(); }, { passive: true });
  new MutationObserver(function () { if (stick) scrollToEnd(); })
    .observe(document.body, { childList: true, subtree: true, characterData: true });
  document.addEventListener("htmx:historyRestore", function () { stick = true; scrollToEnd(); });
  document.addEventListener("DOMContentLoaded", scrollToEnd);

  // The done event is about to replace a streaming bubble: the answer is complete.
  document.addEventListener("htmx:sseBeforeMessage", function (e) {
    if (e.detail && e.detail.type === "done") announce("Answer complete");
  });

  // Copy buttons: the whole answer's Markdown source, or one code block's text.
  document.addEventListener("click", function (e) {
    var button = e.target.closest("button.copy");
    if (!button) return;
    var text;
    if (button.dataset.copy === "code") {
      text = button.parentElement.querySelector("pre").innerText;
    } else {
      var source = button.closest(".msg").querySelector("template.source");
      text = source ? source.content.textContent : "";
    }
    copyText(text).then(function () {
      var label = button.textContent;
      button.textContent = "Copied";
      announce("Copied to the clipboard");
      setTimeout(function () { button.textContent = label; }, 1500);
    });
  });
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
    return Promise.resolve();
  }
})();
// On a phone the conversation list starts folded, so the chat is what you see first.
(function () {
  function fold() {
    var list = document.querySelector(".sidebar details");
    if (list && window.matchMedia("(max-width: 48rem)").matches) list.open = false;
  }
  document.addEventListener("DOMContentLoaded", fold);
  document.addEventListener("htmx:afterSettle", function (e) { if (e.detail.elt === document.body) fold(); });
})();
