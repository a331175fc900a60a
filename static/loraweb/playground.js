// Streams playground answers as server-sent events over a POST, one column per answer.
// Without JavaScript (or without fetch streaming) the form posts normally and the page renders the answers.
(function () {
  "use strict";
  var form = document.getElementById("playground-form");
  var list = document.getElementById("answer-list");
  var errorLine = document.getElementById("stream-error");
  var textsNode = document.getElementById("playground-texts");
  if (!form || !list || !window.fetch || !window.ReadableStream || !window.TextDecoder || !textsNode) {
    return;
  }
  var texts = JSON.parse(textsNode.textContent);

  // The compare choices depend on the task, so reload the page for the newly chosen task.
  var taskSelect = form.querySelector("select[name=task]");
  if (taskSelect) {
    taskSelect.addEventListener("change", function () {
      window.location.search = "?task=" + encodeURIComponent(taskSelect.value);
    });
  }

  function element(tag, text) {
    var node = document.createElement(tag);
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function addRow(dl, term, value) {
    dl.appendChild(element("dt", term));
    var dd = element("dd", value);
    dl.appendChild(dd);
    return dd;
  }

  function buildColumns(answers) {
    list.textContent = "";
    return answers.map(function (answer) {
      var column = element("div");
      column.className = "answer-column";
      column.style.flex = "1 1 16rem";
      column.appendChild(element("h3", answer.label));
      var pre = element("pre", "");
      pre.className = "answer";
      column.appendChild(pre);
      var dl = element("dl");
      dl.className = "kv";
      column.appendChild(dl);
      list.appendChild(column);
      return { pre: pre, dl: dl, answer: answer };
    });
  }

  function showDone(column, event) {
    column.pre.textContent = event.text;
    if (!event.text) {
      var note = element("span", texts.empty);
      note.className = "muted";
      column.pre.appendChild(note);
    }
    var cache = "—";
    if (column.answer.version) {
      cache = event.cache_hit ? texts.hit : texts.miss.replace("%(ms)s", event.adapter_load_ms);
    }
    addRow(column.dl, texts.served_by, column.answer.label);
    addRow(column.dl, texts.cache, cache);
    addRow(column.dl, texts.tokens, event.completion_tokens + " (" + event.tokens_per_second + " " + texts.tokens_per_second + ")");
    addRow(column.dl, texts.finish, event.finish_reason);
  }

  function handle(event, state) {
    if (event.type === "start") {
      state.columns = buildColumns(event.answers);
    } else if (event.type === "token") {
      state.columns[event.index].pre.textContent += event.text;
    } else if (event.type === "done") {
      showDone(state.columns[event.index], event);
    } else if (event.type === "error") {
      state.columns[event.index].pre.textContent = event.message;
    }
  }

  function showError(message) {
    errorLine.textContent = texts.failed.replace("%(error)s", message);
    errorLine.hidden = false;
  }

  async function stream(response) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    var state = { columns: [] };
    for (;;) {
      var chunk = await reader.read();
      if (chunk.done) {
        return;
      }
      buffer += decoder.decode(chunk.value, { stream: true });
      var parts = buffer.split("\n\n");
      buffer = parts.pop();
      parts.forEach(function (part) {
        if (part.indexOf("data: ") === 0) {
          handle(JSON.parse(part.slice(6)), state);
        }
      });
    }
  }

  form.addEventListener("submit", async function (submitEvent) {
    submitEvent.preventDefault();
    errorLine.hidden = true;
    var button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      var response = await fetch(form.dataset.streamUrl, {
        method: "POST",
        body: new FormData(form),
        credentials: "same-origin",
      });
      if (!response.ok) {
        var body = await response.json().catch(function () { return {}; });
        showError(body.error ? body.error.message : response.status + " " + response.statusText);
        return;
      }
      await stream(response);
    } catch (error) {
      showError(String(error));
    } finally {
      button.disabled = false;
    }
  });
})();
