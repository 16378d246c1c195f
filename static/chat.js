// chat.py page behaviour that htmx cannot express: keyboard sending, autoscroll,
// copy buttons and the live-region announcements. No build step, no dependencies.
(function () {
  "use strict";
  var form = document.getElementById("composer");
  var prompt = document.getElementById("prompt");
  var status = document.getElementById("status");
  var formError = document.getElementById("form-error");

  function announce(text) { status.textContent = text; }

  // Enter sends, Shift+Enter is a newline, and never while an IME composition is open
  // (keyCode 229 covers browsers that end the composition before keydown).
  prompt.addEventListener("keydown", function (e) {
    if (e.key !== "Enter" || e.shiftKey || e.isComposing || e.keyCode === 229) return;
    e.preventDefault();
    if (!document.getElementById("send").disabled) form.requestSubmit();
  });

  form.addEventListener("htmx:beforeRequest", function (e) {
    if (e.detail.elt === form) formError.textContent = "";
  });
  form.addEventListener("htmx:afterRequest", function (e) {
    if (e.detail.elt !== form) return;
    // Only a successful send clears the box: on an error the user's words stay.
    if (e.detail.xhr && e.detail.xhr.status === 200) {
      form.reset();
      announce("Answering…");
      stick = true;
      scrollToEnd();
    }
    prompt.focus();
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
    .observe(document.getElementById("chat-messages"), { childList: true, subtree: true, characterData: true });

  // The done event is about to replace a streaming bubble: the answer is complete.
  document.body.addEventListener("htmx:sseBeforeMessage", function (e) {
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
