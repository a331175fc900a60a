// Draw training and validation loss as an inline SVG, with no chart library.
// Series are arrays of [step, loss]; the chart is redrawn on every status refresh.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";

  function element(name, attributes) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attributes).forEach(function (key) { node.setAttribute(key, attributes[key]); });
    return node;
  }

  function draw(container, series, totalSteps) {
    var width = 640, height = 220, left = 48, bottom = 26, top = 10, right = 12;
    var points = series.reduce(function (all, item) { return all.concat(item.points); }, []);
    container.textContent = "";
    if (!points.length) { return; }

    var maxStep = Math.max(totalSteps || 1, Math.max.apply(null, points.map(function (p) { return p[0]; })));
    var losses = points.map(function (p) { return p[1]; });
    var low = Math.min.apply(null, losses), high = Math.max.apply(null, losses);
    if (high - low < 1e-6) { high = low + 1; }
    var x = function (step) { return left + (width - left - right) * step / maxStep; };
    var y = function (loss) { return top + (height - top - bottom) * (high - loss) / (high - low); };

    var svg = element("svg", {viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": container.dataset.label || "loss"});
    svg.appendChild(element("line", {x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#c6ccd6"}));
    svg.appendChild(element("line", {x1: left, y1: top, x2: left, y2: height - bottom, stroke: "#c6ccd6"}));
    [high, (high + low) / 2, low].forEach(function (value) {
      var label = element("text", {x: left - 6, y: y(value) + 4, "text-anchor": "end", "font-size": 11, fill: "#5b6474"});
      label.textContent = value.toFixed(2);
      svg.appendChild(label);
    });
    var stepLabel = element("text", {x: width - right, y: height - 8, "text-anchor": "end", "font-size": 11, fill: "#5b6474"});
    stepLabel.textContent = maxStep;
    svg.appendChild(stepLabel);

    series.forEach(function (item) {
      if (!item.points.length) { return; }
      var path = item.points.map(function (p, index) { return (index ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1); }).join(" ");
      svg.appendChild(element("path", {d: path, fill: "none", stroke: item.color, "stroke-width": 2}));
      item.points.forEach(function (p) {
        if (item.dots) { svg.appendChild(element("circle", {cx: x(p[0]), cy: y(p[1]), r: 3, fill: item.color})); }
      });
    });
    container.appendChild(svg);
  }

  window.loraweb = window.loraweb || {};
  window.loraweb.drawLossChart = draw;
})();
