/* decodelab playground: calls to the inspection API. Errors become ApiError with the server's one-line message
 * (OpenAI-style body {"error": {"message", "type", "param", "code"}}). */
(function () {
  "use strict";

  class ApiError extends Error {
    constructor(message, status, param, code) {
      super(message);
      this.status = status;
      this.param = param || null;
      this.code = code || null;
    }
  }

  async function errorFrom(resp) {
    let body = null;
    try { body = await resp.json(); } catch (e) { /* not JSON */ }
    const err = body && body.error;
    if (err && err.message) return new ApiError(err.message, resp.status, err.param, err.code);
    return new ApiError("HTTP " + resp.status + " " + resp.statusText, resp.status);
  }

  async function send(path, body, signal) {
    try {
      return await fetch(path, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
        signal,
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(DL.t("network", { msg: e.message }), 0);
    }
  }

  /** POST JSON, return the parsed answer; throws ApiError. */
  async function post(path, body, signal) {
    const resp = await send(path, body, signal);
    if (!resp.ok) throw await errorFrom(resp);
    return resp.json();
  }

  /** POST and read newline-delimited JSON events, calling onEvent(event) for each; an in-band
   *  {"type": "error"} event throws ApiError. Resolves when the stream ends. */
  async function stream(path, body, onEvent, signal) {
    const resp = await send(path, body, signal);
    if (!resp.ok) throw await errorFrom(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        const event = JSON.parse(line);
        if (event.type === "error") {
          const e = event.error || {};
          throw new ApiError(e.message || "error", 500, e.param, e.code);
        }
        onEvent(event);
      }
      if (done) break;
    }
  }

  async function get(path) {
    const resp = await fetch(path, { headers: { Accept: "application/json" } });
    if (!resp.ok) throw await errorFrom(resp);
    return resp.json();
  }

  window.DL = window.DL || {};
  Object.assign(window.DL, { ApiError, api: { post, stream, get } });
})();
