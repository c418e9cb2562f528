// llm-quota admin UI: the little behaviour htmx does not provide. No
// inline handlers and no eval, so the pages' Content-Security-Policy can
// allow this origin's scripts only.
(function () {
  "use strict";

  function flash(message, kind) {
    var el = document.getElementById("flash");
    if (!el) return;
    el.className = "flash" + (kind ? " " + kind : "");
    el.textContent = message;
  }

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).then(function () { return true; });
    }
    // Plain HTTP on a non-local host is no secure context: copy through a selection.
    var ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.className = "offscreen";
    document.body.appendChild(ta);
    ta.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    ta.remove();
    return Promise.resolve(ok);
  }

  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest("[data-copy]");
    if (btn) {
      var src = document.querySelector(btn.getAttribute("data-copy"));
      var text = !src ? "" : src.tagName === "INPUT" || src.tagName === "TEXTAREA" ? src.value : src.textContent;
      copyText(text).then(function (ok) {
        if (!ok) throw new Error("copy refused");
        var label = btn.getAttribute("data-label") || btn.textContent;
        btn.setAttribute("data-label", label);
        btn.textContent = "Copied";
        btn.classList.add("copied");
        setTimeout(function () { btn.textContent = label; btn.classList.remove("copied"); }, 2000);
      }).catch(function () {
        flash("Copying failed: select the text and copy it by hand.", "error");
      });
      return;
    }
    var dismiss = ev.target.closest("[data-dismiss]");
    if (dismiss) {
      var box = dismiss.closest(dismiss.getAttribute("data-dismiss"));
      if (box) box.remove();
      var name = document.getElementById("new-name");
      if (name) name.focus();
    }
  });

  // Focusing the new key selects it, so Ctrl+C works at once.
  document.addEventListener("focusin", function (ev) {
    if (ev.target.matches && ev.target.matches("input.secret")) ev.target.select();
  });

  // Escape leaves an edit without saving.
  document.addEventListener("keydown", function (ev) {
    if (ev.key !== "Escape" || !ev.target.closest) return;
    var row = ev.target.closest("tr.editing");
    var cancel = row && row.querySelector("button.cancel");
    if (cancel) cancel.click();
  });

  // A swap replaces the element that had the focus: put keyboard focus back
  // where the user was working (the edited row, the next row after a delete).
  var origin = null;
  document.addEventListener("htmx:beforeRequest", function (ev) {
    var row = ev.detail.elt.closest && ev.detail.elt.closest("tr");
    var next = row && (row.nextElementSibling || row.previousElementSibling);
    origin = { row: row && row.id, next: next && next.id };
    var f = document.getElementById("flash");
    if (f && f.classList.contains("error")) flash("", "");
  });
  document.addEventListener("htmx:afterSettle", function () {
    if (!origin || (document.activeElement && document.activeElement !== document.body)) return;
    var row = origin.row && document.getElementById(origin.row);
    var target = null;
    if (row) {
      target = row.classList.contains("editing") ? row.querySelector("input") : row.querySelector("button");
    } else if (origin.next && document.getElementById(origin.next)) {
      target = document.getElementById(origin.next).querySelector("button");
    } else {
      target = document.getElementById("keys-h");
    }
    if (target) target.focus();
    origin = null;
  });

  document.addEventListener("htmx:responseError", function (ev) {
    var xhr = ev.detail.xhr;
    var message = "";
    try {
      var doc = new DOMParser().parseFromString(xhr.responseText, "text/html");
      var m = doc.getElementById("error-message");
      message = m ? m.textContent : "";
    } catch (e) { message = ""; }
    flash(message || "The server answered " + xhr.status + ".", "error");
  });
  document.addEventListener("htmx:sendError", function () {
    flash("The admin server cannot be reached.", "error");
  });
})();
