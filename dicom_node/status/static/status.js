// nodal status page: poll /status/data.json and update the figures, health, study list and
// refusals in place. Everything goes in through textContent: nothing from the data is HTML.
(function () {
  "use strict";
  var root = document.getElementById("status");
  if (!root) return;
  var every = Math.max(1, parseFloat(root.dataset.refresh || "5")) * 1000;
  var offset = root.dataset.offset || "0";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function state(s) { return el("span", "state state-" + s, s); }
  function cell(label, children) {
    var td = el("td"); td.dataset.label = label;
    children.forEach(function (c) { td.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return td;
  }
  function studyRow(st) {
    var tr = el("tr");
    var arrival = [st.first_received_at || ""];
    if (st.waiting) arrival.push(" ", state("receiving"));
    tr.appendChild(cell("Arrival", arrival));
    var labels = [el("span", "acc", st.accession_number || "–")];
    if ("patient_name" in st) {
      var p = el("div", "patient", (st.patient_name || "–") + " ");
      p.appendChild(el("span", "muted", st.patient_id || ""));
      labels.push(p);
    }
    tr.appendChild(cell("Accession", labels));
    var a = el("a", "uid", st.study_instance_uid);
    a.href = "/status/studies/" + encodeURIComponent(st.study_instance_uid);
    tr.appendChild(cell("Study", [a, " ", el("span", "muted", st.instances + " inst.")]));
    tr.appendChild(cell("Series", st.series.map(function (se) {
      var d = el("div", null, se.modality + " " + se.description + " (" + se.instances + "): ");
      if (se.routed === true) d.appendChild(el("span", "state state-done", "routed"));
      if (se.routed === false) d.appendChild(el("span", "state state-skipped", "skipped"));
      d.appendChild(document.createTextNode(" "));
      d.appendChild(el("span", "muted", se.routing));
      return d;
    })));
    tr.appendChild(cell("Jobs", st.jobs.length ? st.jobs.map(function (j) {
      var d = el("div", null, "#" + j.id + " ");
      d.appendChild(state(j.state));
      if (j.seconds_total !== null) d.appendChild(el("span", "muted", " " + j.seconds_total + " s"));
      return d;
    }) : [el("span", "muted", "none yet")]));
    tr.appendChild(cell("Nodes", [st.findings + " (" + st.malignant + ")"]));
    var dests = Object.keys(st.deliveries);
    tr.appendChild(cell("Delivery", dests.length ? dests.map(function (k) {
      var s = el("span", "state state-" + st.deliveries[k].state, k + ": " + st.deliveries[k].state);
      var w = el("span"); w.appendChild(s); w.appendChild(document.createTextNode(" ")); return w;
    }) : [el("span", "muted", "none")]));
    return tr;
  }
  function refusalRow(r) {
    var tr = el("tr");
    tr.appendChild(cell("When", [r.at]));
    tr.appendChild(cell("What", [r.kind + " " + r.what]));
    tr.appendChild(cell("From", [r.actor + " " + r.peer]));
    tr.appendChild(cell("Reason", [r.reason]));
    return tr;
  }
  function replace(id, rows, empty, cols) {
    var body = document.getElementById(id);
    if (!body) return;
    var frag = document.createDocumentFragment();
    if (!rows.length) { var tr = el("tr"); var td = el("td", "muted", empty); td.colSpan = cols; tr.appendChild(td); frag.appendChild(tr); }
    rows.forEach(function (r) { frag.appendChild(r); });
    body.replaceChildren(frag);
  }
  function update(d) {
    Object.keys(d.live).forEach(function (k) {
      document.querySelectorAll('[data-live="' + k + '"]').forEach(function (e) {
        var v = d.live[k]; e.textContent = v === null ? "–" : String(v);
      });
    });
    document.querySelectorAll('[data-live="studies"]').forEach(function (e) { e.textContent = String(d.studies.total); });
    var ready = document.getElementById("ready");
    if (ready) { ready.textContent = d.health.ready ? "ready" : "not ready"; ready.className = "state " + (d.health.ready ? "state-done" : "state-failed"); }
    var checks = document.getElementById("checks");
    if (checks) checks.replaceChildren.apply(checks, d.health.checks.map(function (c) {
      var li = el("li", c.ok ? "ok" : "bad"); li.appendChild(el("b", null, c.name)); li.appendChild(document.createTextNode(": " + c.detail)); return li;
    }));
    replace("studies", d.studies.studies.map(studyRow), "Nothing received yet.", 7);
    replace("refusals", d.refusals.map(refusalRow), "None.", 4);
  }
  function poll() {
    fetch("/status/data.json?offset=" + encodeURIComponent(offset), { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { if (r.status === 401 || r.redirected) { location.href = "/status/login"; return null; } return r.ok ? r.json() : null; })
      .then(function (d) { if (d) update(d); })
      .catch(function () {})
      .then(function () { setTimeout(poll, every); });
  }
  setTimeout(poll, every);
})();
