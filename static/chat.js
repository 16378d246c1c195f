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
    // Escape closes an open drawer or dialog first (the dialog closes itself), then stops the answer.
    if (e.key === "Escape" && (drawerOpen() || document.querySelector("dialog[open]"))) return;
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


  // Edit's Cancel is a link back to the page (without JavaScript); here it only folds the edit box.
  document.addEventListener("click", function (e) {
    var cancel = e.target.closest("details.edit a.cancel");
    if (!cancel) return;
    e.preventDefault();
    var edit = cancel.closest("details.edit");
    edit.querySelector("form").reset();
    edit.open = false;
    edit.querySelector("summary").focus();
  });

  // The options' folded summary lists what is set, also as the fields change (the server's words).
  document.addEventListener("change", function (e) {
    var options = e.target.closest && e.target.closest("details.options");
    var summary = options && options.querySelector("summary");
    if (!summary) return;
    var set = [];
    if (byId("system").value.trim()) set.push("system prompt");
    [["temperature", "temperature"], ["top_p", "top p"], ["max_tokens", "max tokens"]].forEach(function (p) {
      var field = options.querySelector("input[name=" + p[0] + "]");
      if (field && field.value.trim()) set.push(p[1]);
    });
    summary.textContent = "Model and options" + (set.length ? " · " + set.join(", ") : "");
  });
  // Enter in the preset's name saves the preset (Enter elsewhere in the composer sends).
  document.addEventListener("keydown", function (e) {
    if (e.target.id !== "preset-name" || e.key !== "Enter" || e.isComposing) return;
    e.preventDefault();
    var save = document.querySelector("#composer button.save-preset");
    if (!save) return;
    save.focus();  // htmx takes a focused button for the submitter until it loses the focus: then Send is again
    save.click();
    e.target.focus();
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
    var options = document.querySelector("#composer details.options");
    if (options) options.open = false;  // the options fold after sending, and after an error (it names the field)
    if (ok) {
      byId("prompt").value = "";
      clearDraft(sentFrom);
      clearAttachments();  // they went with the message
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
    var feed = byId("chat-messages");  // a feed once it holds messages (an empty feed is an ARIA error)
    if (feed && !feed.hasAttribute("role") && feed.querySelector(".msg")) {
      feed.setAttribute("role", "feed");
      feed.setAttribute("aria-label", "Messages");
    }
    var target = e.detail.target, trigger = e.detail.requestConfig && e.detail.requestConfig.elt;
    if (target && target.id === "conversation-head" && trigger && byId(trigger.id)) {
      byId(trigger.id).querySelector("button").focus();  // Pin became Unpin: the focus stays on it
      return;
    }
    if (!target || target.id !== "chat-messages" || !trigger || !trigger.closest) return;
    if (trigger.closest(".siblings")) {
      var arrows = target.querySelectorAll(".siblings button:not([disabled])");
      if (arrows.length) arrows[arrows.length - 1].focus();
      return;
    }
    var bubble = streamingBubble();
    if (bubble) {
      updateComposer();
      byId("stop-answer").focus();  // the one Stop shown (the bubble's is for pages without JavaScript)
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

  // Phones: the header's menu button opens the conversation list as a drawer over the page. Escape,
  // a click outside or a link inside closes it, and the focus goes into it and back to the button.
  function menuButton() { return document.querySelector(".top .menu"); }
  function drawerOpen() { var nav = byId("sidebar"); return !!nav && nav.classList.contains("open"); }
  function setDrawer(open) {
    var nav = byId("sidebar"), button = menuButton();
    if (!nav || !button) return;
    nav.classList.toggle("open", open);
    button.setAttribute("aria-expanded", String(open));
    if (open) {
      var list = nav.querySelector("details");
      if (list) list.open = true;
      var first = nav.querySelector("a[aria-current]") || nav.querySelector("a");
      if (first) first.focus();
    } else if (nav.contains(document.activeElement)) {
      button.focus();
    }
  }
  document.addEventListener("click", function (e) {
    if (e.target.closest(".top .menu")) { setDrawer(!drawerOpen()); return; }
    // A tap beside the drawer only closes it (capture: the page below does not act on it).
    if (drawerOpen() && !e.target.closest("#sidebar")) { e.preventDefault(); e.stopPropagation(); setDrawer(false); }
  }, true);
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && drawerOpen()) { e.preventDefault(); setDrawer(false); }
  });
  // A link in the drawer loads a page: close it before the swap, or htmx's settling would carry the open
  // drawer's class over to the new page's list for a moment.
  document.addEventListener("htmx:beforeSwap", function (e) {
    var nav = byId("sidebar");
    if (e.detail.target === document.body && nav) nav.classList.remove("open");
  });
  document.addEventListener("focusin", function (e) {  // tabbing out of the drawer closes it
    if (drawerOpen() && !e.target.closest("#sidebar")) setDrawer(false);
  });

  // Shortcuts: ? lists them (outside text fields), Ctrl+Shift+O starts a new chat (as ChatGPT does),
  // ArrowUp in the empty message box edits your last message.
  document.addEventListener("keydown", function (e) {
    var dialog = byId("shortcuts");
    if (e.key === "?" && !e.ctrlKey && !e.metaKey && !e.altKey && !editable(e.target) && dialog && !dialog.open) {
      e.preventDefault();
      dialog.showModal();
    } else if ((e.ctrlKey || e.metaKey) && e.shiftKey && (e.key === "o" || e.key === "O")) {
      e.preventDefault();
      var link = document.querySelector(".sidebar a.new");
      if (link) link.click(); else location.assign("/");
    } else if (e.key === "ArrowUp" && e.target.id === "prompt" && !e.target.value && !e.isComposing) {
      var edits = document.querySelectorAll("#chat-messages .msg.user details.edit");
      var edit = edits[edits.length - 1];
      if (!edit) return;
      e.preventDefault();
      edit.open = true;
      var area = edit.querySelector("textarea");
      area.focus();
      area.setSelectionRange(area.value.length, area.value.length);
    }
  });

  // Ctrl+K (or Cmd+K) searches the conversations.
  document.addEventListener("keydown", function (e) {
    if ((e.ctrlKey || e.metaKey) && (e.key === "k" || e.key === "K")) {
      var box = byId("search");
      if (!box) return;
      e.preventDefault();
      if (!drawerOpen() && menuButton() && menuButton().offsetParent) setDrawer(true);  // a phone: open the list
      var list = box.closest("details");
      if (list) list.open = true;
      box.focus();
      box.select();
    }
  });
  // Search results by keyboard: ArrowDown from the box walks them (ArrowUp goes back), Enter opens one.
  document.addEventListener("keydown", function (e) {
    var box = byId("search");
    if ((e.key !== "ArrowDown" && e.key !== "ArrowUp") || !box || !e.target.closest) return;
    if (e.target !== box && !e.target.closest("#search-results")) return;
    var links = Array.prototype.slice.call(document.querySelectorAll("#search-results a"));
    var next = links.indexOf(e.target) + (e.key === "ArrowDown" ? 1 : -1);
    if (!links.length || (e.target === box && e.key === "ArrowUp")) return;  // the caret's own key there
    e.preventDefault();
    (next < 0 ? box : links[Math.min(next, links.length - 1)]).focus();
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
  // "Jump to latest" shows while the reader is more than a screen above the end; it follows again.
  function updateJump() {
    var jump = byId("jump"), el = document.scrollingElement;
    if (jump) jump.hidden = el.scrollHeight - el.scrollTop - el.clientHeight <= el.clientHeight;
  }
  document.addEventListener("click", function (e) {
    var jump = e.target.closest("#jump");
    if (!jump) return;
    stick = true;
    scrollToEnd();
    updateJump();
    if (!touch) byId("prompt").focus({ preventScroll: true });  // the button is gone; no keyboard on a phone
  });
  window.addEventListener("scroll", function () { stick = atBottom(); updateJump(); }, { passive: true });
  new MutationObserver(function () { updateComposer(); if (stick) scrollToEnd(); updateJump(); })
    .observe(document.body, { childList: true, subtree: true, characterData: true });
  document.addEventListener("htmx:historyRestore", function () { stick = true; scrollToEnd(); });
  // Opening a conversation lands at its newest message, also through the boosted sidebar.
  document.addEventListener("DOMContentLoaded", function () {
    restoreDraft(); placeholder(); if (!showTarget()) scrollToEnd();
  });
  document.addEventListener("htmx:afterSettle", function (e) {
    if (e.detail.elt !== document.body) return;
    restoreDraft(); placeholder(); stick = !location.hash; if (!showTarget()) scrollToEnd();
  });
  // The server's placeholder promises nothing (without script Enter is a newline); say what Enter does here.
  function placeholder() {
    var box = byId("prompt");
    if (box) box.placeholder = touch ? "Message (send with the button)"
      : "Message (Enter to send, Shift+Enter for a new line)";
  }

  // The done event is about to replace a streaming bubble: say how it ended, and keep the
  // focus on the page (it was perhaps on the Stop button that is about to go).
  document.addEventListener("htmx:sseBeforeMessage", function (e) {
    if (!e.detail || e.detail.type !== "done") return;
    var stopped = /class="msg assistant done stopped"/.test(e.detail.data || "");
    announce(stopped ? "Stopped" : "Answer complete");
    var bubble = e.detail.elt && e.detail.elt.closest ? e.detail.elt.closest(".msg") : null;
    var hadFocus = (bubble && bubble.contains(document.activeElement)) || document.activeElement === byId("stop-answer");
    setTimeout(function () {
      updateComposer();
      if (hadFocus || document.activeElement === document.body) byId("prompt").focus();
    }, 0);
  });

  // Times: the server writes them in UTC; here they become the reader's own, relative while recent. The
  // reader's zone goes to the server too (the tz cookie, minutes east of UTC): the sidebar's days are its days.
  var zone = String(-new Date().getTimezoneOffset());
  if (byId("composer") && document.cookie.split("; ").indexOf("tz=" + zone) < 0) {  // a shared page sets none
    document.cookie = "tz=" + zone + "; path=/; max-age=31536000; samesite=lax";
  }
  function clock(d) { return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }); }
  function localTime(el) {
    var d = new Date(el.getAttribute("datetime")), now = new Date(), minutes = (now - d) / 60000;
    if (isNaN(d)) return;
    var today = new Date(now.getFullYear(), now.getMonth(), now.getDate());
    var yesterday = new Date(now.getFullYear(), now.getMonth(), now.getDate() - 1);
    var date = { month: "short", day: "numeric" };
    if (d.getFullYear() !== now.getFullYear()) date.year = "numeric";
    el.textContent = minutes < 1 ? "just now" : minutes < 60 ? Math.floor(minutes) + " min ago"
      : d >= today ? clock(d) : d >= yesterday ? "yesterday " + clock(d)
      : d.toLocaleDateString([], date) + ", " + clock(d);
    el.title = d.toLocaleString([], { dateStyle: "full", timeStyle: "short" });
  }
  function localTimes(root) {
    if (root.matches && root.matches("time[datetime]")) localTime(root);
    if (root.querySelectorAll) each(root.querySelectorAll("time[datetime]"), localTime);
  }
  document.addEventListener("DOMContentLoaded", function () { localTimes(document); });
  document.addEventListener("htmx:load", function (e) { localTimes(e.detail.elt); });
  setInterval(function () { localTimes(document); }, 60000);  // "5 min ago" moves on
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
