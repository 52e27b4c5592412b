// Starts Swagger UI on /openapi.json (a file, not an inline script: the page's Content-Security-Policy
// allows scripts from the service only). When the service wants an API key, the spec itself needs it: the
// page asks for the key, keeps it in this variable only, and sends it with every request Swagger UI makes.
(function () {
  "use strict";
  let key = null;
  const form = document.getElementById("key-form");
  const note = document.getElementById("key-note");
  const input = document.getElementById("key");
  const error = document.getElementById("docs-error");

  function start(spec) {
    window.ui = SwaggerUIBundle({
      spec: spec,
      dom_id: "#swagger-ui",
      deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
      layout: "BaseLayout",
      validatorUrl: null, // no badge from the public validator: nothing leaves for another host
      requestInterceptor: function (request) {
        if (key) request.headers["X-API-Key"] = key;
        return request;
      },
    });
  }

  async function load() {
    error.hidden = true;
    let answer;
    try {
      answer = await fetch("openapi.json", { headers: key ? { "X-API-Key": key } : {} });
    } catch (e) {
      error.textContent = "Could not reach the service for /openapi.json: " + e.message;
      error.hidden = false;
      return;
    }
    if (answer.status === 401) {
      note.textContent = key
        ? "That key was refused (401). Try again."
        : "This service asks for an API key (EFFNET_API_KEY is set): the API description needs it too.";
      form.hidden = false;
      input.focus();
      return;
    }
    if (!answer.ok) {
      error.textContent = "/openapi.json answered HTTP " + answer.status + ".";
      error.hidden = false;
      return;
    }
    form.hidden = true;
    start(await answer.json());
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    key = input.value.trim() || null;
    input.value = "";
    load();
  });
  load();
})();
