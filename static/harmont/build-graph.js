/* The build page's job graph and timeline (server-drawn SVG, templates/builds/includes/):
 * - a click on a graph node opens that job's log in the list below and scrolls to it;
 * - each status poll of build.js (the `harmont:status` event, carrying status.json) recolours the
 *   graph's nodes and moves the timeline's bars to the geometry the server computed.
 * Plain JavaScript, no dependencies.
 */
(function () {
  "use strict";

  var SVG = "http://www.w3.org/2000/svg";

  function openJob(jobId) {
    var li = document.getElementById("job-" + jobId);
    if (!li) return;
    var toggle = li.querySelector("[data-log-toggle]");
    if (toggle && toggle.getAttribute("aria-expanded") !== "true") toggle.click();
    li.scrollIntoView({ block: "start", behavior: "smooth" });
  }

  Array.prototype.forEach.call(document.querySelectorAll("[data-graph-node]"), function (node) {
    node.addEventListener("click", function (event) {
      event.preventDefault();
      openJob(node.getAttribute("data-graph-node"));
    });
  });

  function setSpan(rect, span) {
    rect.setAttribute("x", span ? span[0] : 0);
    rect.setAttribute("width", span ? span[1] : 0);
  }

  function redrawTicks(group, ticks) {
    var height = group.getAttribute("data-height");
    var labelY = group.getAttribute("data-label-y");
    while (group.firstChild) group.removeChild(group.firstChild);
    ticks.forEach(function (tick) {
      var line = document.createElementNS(SVG, "line");
      line.setAttribute("x1", tick.x);
      line.setAttribute("x2", tick.x);
      line.setAttribute("y1", labelY);
      line.setAttribute("y2", height);
      var text = document.createElementNS(SVG, "text");
      text.setAttribute("x", tick.x);
      text.setAttribute("y", labelY);
      text.textContent = tick.label;
      group.appendChild(line);
      group.appendChild(text);
    });
  }

  document.addEventListener("harmont:status", function (event) {
    var status = event.detail;
    status.jobs.forEach(function (job) {
      if (job.retried) return; // the graph shows each step's latest attempt
      var node = document.querySelector('[data-graph-node="' + job.id + '"]');
      if (node) node.setAttribute("data-state", job.state);
    });
    var timeline = status.timeline;
    if (!timeline) return;
    Object.keys(timeline.bars).forEach(function (id) {
      var bar = document.querySelector('[data-bar="' + id + '"]');
      if (!bar) return;
      var geometry = timeline.bars[id];
      bar.setAttribute("data-state", geometry.state);
      bar.classList.toggle("critical", geometry.critical);
      setSpan(bar.querySelector("rect.waiting"), geometry.waiting);
      setSpan(bar.querySelector("rect.running"), geometry.running);
    });
    var ticks = document.querySelector("[data-ticks]");
    if (ticks) redrawTicks(ticks, timeline.ticks);
  });
})();
