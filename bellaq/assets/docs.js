// The docs page: Swagger UI rendering this service's OpenAPI document, read from this origin.
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: document.body.dataset.document,
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    deepLinking: true,
    // No badge from a validator on the internet; the key typed into "Authorize" stays in this tab.
    validatorUrl: null,
    persistAuthorization: false,
    displayRequestDuration: true,
  });
});
