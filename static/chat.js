// chat.py page behaviour that htmx cannot express: keyboard sending, Send/Stop, focus,
// drafts, autoscroll, copy buttons and the live-region announcements. No build step, no
// dependencies. Everything is delegated from document: boosted navigation replaces the body.
// Without JavaScript the page still works: every control is a plain form or link.
(function () {
  "use strict";
  function byId(id) { return document.getElementById(id); }
  function announce(text) { var s = byId("status"); if (s) s.textContent = text; }
  // With script on, the label is the attach button and the native file input hides (chat.css);
  // without it the native input shows which files are chosen.
  document.documentElement.classList.add("js");

  // Enter sends, Shift+Enter is a newline, and never while an IME composition is open
  // (keyCode 229 covers browsers that end the composition before keydown). On a touch
  // screen there is no Shift: Enter is a newline there, and the Send button sends.
  var touch = window.matchMedia("(pointer: coarse)").matches;
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && answering()) { e.preventDefault(); stopAnswer(); return; }
    if (e.target.id !== "prompt" || e.key !== "Enter" || e.shiftKey || e.isComposing || e.keyCode === 229) return;
    if (touch) return;
    e.preventDefault();
    if (!byId("send").disabled && !answering()) byId("composer").requestSubmit();
  });

  // One answer at a time in a conversation: while one streams, Send becomes Stop.
  function streamingBubble() {
    var all = document.querySelectorAll("#chat-messages .msg.streaming");
    return all.length ? all[all.length - 1] : null;
  }
  function answering() { return !!streamingBubble(); }
  function updateComposer() {
    var composer = byId("composer");
    if (composer) composer.classList.toggle("answering", answering());
  }
  function stopAnswer() {
    var bubble = streamingBubble();
    var form = bubble && bubble.querySelector("form.stop-form");
    if (form) { htmx.trigger(form, "submit"); }
  }
  document.addEventListener("click", function (e) {
    if (e.target.closest("#stop-answer")) stopAnswer();
  });
  ["htmx:sseMessage", "htmx:afterSettle", "htmx:load"].forEach(function (name) {
    document.addEventListener(name, function () { setTimeout(updateComposer, 0); });
  });


  // Drafts survive navigation, one per conversation, in this browser only.
  function draftKey() {
    var c = byId("conversation");
    return "chat.py draft " + (c && c.value ? c.value : "new");
  }
  document.addEventListener("input", function (e) {
    if (e.target.id !== "prompt") return;
    try { localStorage.setItem(draftKey(), e.target.value); } catch (err) { /* storage full or off */ }
  });
  function restoreDraft() {
    var box = byId("prompt");
    if (!box) return;
    if (!box.value) { try { box.value = localStorage.getItem(draftKey()) || ""; } catch (err) { /* off */ } }
    updateComposer();
  }
  function clearDraft(key) { try { localStorage.removeItem(key); } catch (err) { /* off */ } }

  var sentFrom = null;  // the draft key the message was sent from (a new chat gets an id on the way)
  document.addEventListener("htmx:beforeRequest", function (e) {
    if (e.detail.elt.id === "composer") { byId("form-error").textContent = ""; sentFrom = draftKey(); }
  });
  document.addEventListener("htmx:afterRequest", function (e) {
    var elt = e.detail.elt, ok = e.detail.xhr && e.detail.xhr.status < 300;
    if (elt.closest && elt.closest("details.rename") && ok) elt.closest("details.rename").open = false;
    if (elt.classList && elt.classList.contains("stop-form") && ok) byId("prompt").focus();  // after Stop
    if (elt.id !== "composer") return;
    // Only a successful send clears the box: on an error the user's words stay.
    if (ok) {
      byId("prompt").value = "";
      clearDraft(sentFrom);
      clearAttachments();  // they went with the message
      var options = document.querySelector("#composer details.options");
      if (options) options.open = false;  // the options fold after sending
      announce("Answering…");
      stick = true;
      scrollToEnd();
    }
    byId("prompt").focus();
  });
  // Regenerate or Edit redraw the branch shown: the new answer's Stop button takes the focus (the
  // button that was pressed is gone). Switching versions (‹ ›) keeps the focus on the arrows.
  document.addEventListener("htmx:afterSwap", function (e) {
    updateComposer();
    var target = e.detail.target, trigger = e.detail.requestConfig && e.detail.requestConfig.elt;
    if (!target || target.id !== "chat-messages" || !trigger || !trigger.closest) return;
    if (trigger.closest(".siblings")) {
      var arrows = target.querySelectorAll(".siblings button:not([disabled])");
      if (arrows.length) arrows[arrows.length - 1].focus();
      return;
    }
    var bubble = streamingBubble();
    if (bubble) {
      var stop = bubble.querySelector("button.stop");
      if (stop) stop.focus();
      announce("Answering…");
      stick = true;
      scrollToEnd();
    }
  });

  // Attachments: a picked, pasted (a screenshot) or dropped file all end up in the one file input,
  // so the form posts them like any other field. Previews are built with textContent and data: URLs
  // (the Content-Security-Policy allows no blob: images), never with markup from a file name.
  var PREVIEW_LIMIT = 10 * 1024 * 1024;  // bigger images are named, not read into memory
  function each(list, fn) { Array.prototype.forEach.call(list || [], fn); }
  function setFiles(files) {
    var input = byId("attachment");
    if (!input) return;
    var dt = new DataTransfer();
    files.forEach(function (f) { dt.items.add(f); });
    input.files = dt.files;  // this fires no change event: redraw here
    showAttachments();
  }
  function addFiles(files) {
    var input = byId("attachment"), all = [];
    if (!input || !files.length) return false;
    each(input.files, function (f) { all.push(f); });
    setFiles(all.concat(files));
    return true;
  }
  function clearAttachments() {
    var input = byId("attachment");
    if (input) input.value = "";
    showAttachments();
  }
  function showAttachments() {
    var input = byId("attachment"), box = byId("attachment-previews");
    if (!input || !box) return;
    box.textContent = "";
    each(input.files, function (file, index) {
      var item = document.createElement("span");
      item.className = "preview";
      item.title = file.name;
      if (/^image\//.test(file.type) && file.size <= PREVIEW_LIMIT) {
        var img = document.createElement("img");
        img.alt = file.name;
        item.appendChild(img);
        var reader = new FileReader();
        reader.onload = function () { img.src = reader.result; };
        reader.readAsDataURL(file);
      } else {
        var name = document.createElement("span");
        name.className = "name";
        name.textContent = file.name;
        item.appendChild(name);
      }
      var remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.dataset.index = index;
      remove.textContent = "×";
      remove.setAttribute("aria-label", "Remove " + file.name);
      item.appendChild(remove);
      box.appendChild(item);
    });
  }
  document.addEventListener("change", function (e) { if (e.target.id === "attachment") showAttachments(); });
  document.addEventListener("click", function (e) {
    var button = e.target.closest("#attachment-previews button.remove");
    if (!button) return;
    var input = byId("attachment"), index = Number(button.dataset.index), kept = [], gone = "";
    each(input.files, function (f, i) { if (i !== index) kept.push(f); else gone = f.name; });
    setFiles(kept);
    // The pressed button is gone: the focus goes to the file that took its place, else to the picker.
    var buttons = document.querySelectorAll("#attachment-previews button.remove");
    (buttons[Math.min(index, buttons.length - 1)] || input).focus();
    announce("Removed " + gone);
  });
  // A browser that restores a form (back, forward) may bring the chosen files back.
  window.addEventListener("pageshow", showAttachments);
  document.addEventListener("DOMContentLoaded", showAttachments);

  function filesOf(transfer) {
    var files = [];
    if (!transfer) return files;
    each(transfer.files, function (f) { files.push(f); });
    if (!files.length) {  // some browsers list a pasted screenshot only among the items
      each(transfer.items, function (item) {
        var f = item.kind === "file" && item.getAsFile();
        if (f) files.push(f);
      });
    }
    return files;
  }
  function editable(el) { return el.closest && el.closest("input, textarea, select, [contenteditable]"); }
  // Paste: files go to the message (in the composer, or anywhere that is not another text field);
  // text pastes as always, and a paste of text and files (a copied picture from a page) keeps its text.
  document.addEventListener("paste", function (e) {
    var target = e.target.nodeType === 1 ? e.target : document.body;
    if (!byId("composer") || (editable(target) && !target.closest("#composer"))) return;
    var files = filesOf(e.clipboardData);
    if (addFiles(files) && !e.clipboardData.getData("text/plain")) e.preventDefault();
  });

  // Drag and drop onto the chat or the composer; the composer lights up while files are over it.
  // Elsewhere (the sidebar's import form) the browser's own handling stays.
  function dropZone(e) {
    var types = e.dataTransfer && e.dataTransfer.types;
    var hasFiles = types && Array.prototype.indexOf.call(types, "Files") >= 0;
    return hasFiles && e.target.closest && e.target.closest("#composer, main") ? byId("composer") : null;
  }
  function highlight(on) {
    var composer = byId("composer");
    if (composer) composer.classList.toggle("dropping", on);
  }
  ["dragenter", "dragover"].forEach(function (name) {
    document.addEventListener(name, function (e) {
      var zone = dropZone(e);
      highlight(!!zone);
      if (!zone) return;
      e.preventDefault();  // a drop here attaches the file instead of opening it
      e.dataTransfer.dropEffect = "copy";
    });
  });
  // relatedTarget is null when the drag leaves the window or is cancelled (Escape).
  document.addEventListener("dragleave", function (e) { if (!e.relatedTarget) highlight(false); });
  document.addEventListener("dragend", function () { highlight(false); });
  document.addEventListener("drop", function (e) {
    highlight(false);
    if (!dropZone(e)) return;
    e.preventDefault();
    addFiles(filesOf(e.dataTransfer));
    byId("prompt").focus();
  });

  // Ctrl+K (or Cmd+K) searches the conversations.
  document.addEventListener("keydown", function (e) {
    if ((e.ctrlKey || e.metaKey) && (e.key === "k" || e.key === "K")) {
      var box = byId("search");
      if (!box) return;
      e.preventDefault();
      var list = box.closest("details");
      if (list) list.open = true;
      box.focus();
      box.select();
    }
  });
  // A search hit opens the conversation at the matching message.
  function showTarget() {
    var id = decodeURIComponent(location.hash.slice(1));
    var el = id && document.getElementById(id);
    if (!el) return false;
    el.classList.add("found");
    el.scrollIntoView({ block: "center" });
    return true;
  }

  // Autoscroll follows new text only while the reader is at the bottom.
  var stick = true;
  function atBottom() {
    var el = document.scrollingElement;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 48;
  }
  function scrollToEnd() { window.scrollTo(0, document.scrollingElement.scrollHeight); }
  window.addEventListener("scroll", function () { stick = atBottom(); }, { passive: true });
  new MutationObserver(function () { updateComposer(); if (stick) scrollToEnd(); })
    .observe(document.body, { childList: true, subtree: true, characterData: true });
  document.addEventListener("htmx:historyRestore", function () { stick = true; scrollToEnd(); });
  // Opening a conversation lands at its newest message, also through the boosted sidebar.
  document.addEventListener("DOMContentLoaded", function () { restoreDraft(); if (!showTarget()) scrollToEnd(); });
  document.addEventListener("htmx:afterSettle", function (e) {
    if (e.detail.elt === document.body) { restoreDraft(); stick = !location.hash; if (!showTarget()) scrollToEnd(); }
  });

  // The done event is about to replace a streaming bubble: say how it ended, and keep the
  // focus on the page (it was perhaps on the Stop button that is about to go).
  document.addEventListener("htmx:sseBeforeMessage", function (e) {
    if (!e.detail || e.detail.type !== "done") return;
    var stopped = /class="msg assistant done stopped"/.test(e.detail.data || "");
    announce(stopped ? "Stopped" : "Answer complete");
    var bubble = e.detail.elt && e.detail.elt.closest ? e.detail.elt.closest(".msg") : null;
    var hadFocus = bubble && bubble.contains(document.activeElement);
    setTimeout(function () {
      updateComposer();
      if (hadFocus || document.activeElement === document.body) byId("prompt").focus();
    }, 0);
  });

  // The unfinished Markdown block comes rendered now and then (a "tail" event, chat.py's tail_frame): the
  // tokens after it go on inside its last paragraph or code box, where its "tail-end" span stands. A
  // finished block takes its place, and the tokens start again below it.
  document.addEventListener("htmx:sseBeforeMessage", function (e) {
    var type = e.detail && e.detail.type, elt = e.detail && e.detail.elt;
    if (type !== "tail" && type !== "block") return;
    var live = elt && elt.closest ? elt.closest(".live") : null, tail = live && live.querySelector(".tail");
    if (!tail) return;
    var tokens = live.querySelector(".tokens");
    live.appendChild(tokens);
    tail.textContent = "";
    if (type === "block") return;
    e.preventDefault();
    tail.innerHTML = e.detail.data;
    var end = tail.querySelector(".tail-end");
    if (end) { tokens.textContent = end.textContent; end.replaceWith(tokens); }
  });

  // Copy buttons: the whole answer's Markdown source, one code block's text, or a shared link.
  document.addEventListener("click", function (e) {
    var button = e.target.closest("button.copy");
    if (!button) return;
    var text;
    if (button.dataset.copy === "code") {
      text = button.closest(".code-block").querySelector("pre").innerText;
    } else if (button.dataset.copy === "link") {
      text = button.closest("li").querySelector("a").href;
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
