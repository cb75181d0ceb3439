/* decodelab playground: calls to the inspection API. Errors become ApiError with the server's one-line message
 * (OpenAI-style body {"error": {"message", "type", "param", "code"}}).
 *
 * API key: a server started with --api-key answers 401 without one. The first 401 opens the key dialog (one dialog
 * however many calls were refused at once); the key goes into sessionStorage (this tab, until it is closed) and is
 * sent as "Authorization: Bearer <key>" on every call from then on; a refused key is dropped and asked again. */
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

  // --- API key ---------------------------------------------------------------------------------------------------
  const KEY_STORE = "decodelab.apiKey";
  let asking = null; // the open dialog's promise: calls refused meanwhile wait for the same answer

  function storedKey() {
    try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (e) { return ""; }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (e) { /* storage off: the key lasts until the page reloads */ }
    memoryKey = key;
  }
  let memoryKey = storedKey();

  /** Show the key dialog; resolves with the key typed, or "" when the user cancels. */
  function askKey(refused) {
    if (asking) return asking;
    const dialog = document.getElementById("key-dialog");
    if (!dialog || typeof dialog.showModal !== "function") return Promise.resolve("");
    asking = new Promise((resolve) => {
      const input = document.getElementById("api-key");
      document.getElementById("key-refused").hidden = !refused;
      input.value = "";
      dialog.addEventListener("close", () => {
        const key = dialog.returnValue === "ok" ? input.value.trim() : "";
        input.value = "";
        asking = null;
        resolve(key);
      }, { once: true });
      dialog.returnValue = "";
      dialog.showModal();
      input.focus();
    });
    return asking;
  }

  function authHeaders(headers, key) {
    return key ? { ...headers, Authorization: "Bearer " + key } : headers;
  }

  /** fetch() with the stored key; on a 401, ask for a key (once for all calls refused together) and retry. */
  async function keyedFetch(path, init) {
    for (;;) {
      const used = memoryKey;
      let resp;
      try {
        resp = await fetch(path, { ...init, headers: authHeaders(init.headers, used) });
      } catch (e) {
        if (e.name === "AbortError") throw e;
        throw new ApiError(DL.t("network", { msg: e.message }), 0);
      }
      if (resp.status !== 401) return resp;
      if (memoryKey && memoryKey !== used) continue; // another call got a new key meanwhile
      if (used) storeKey("");
      const key = await askKey(Boolean(used));
      if (!key) return resp; // cancelled: the 401's message is shown
      storeKey(key);
    }
  }

  async function send(path, body, signal) {
    return keyedFetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
      signal,
    });
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
    const resp = await keyedFetch(path, { headers: { Accept: "application/json" } });
    if (!resp.ok) throw await errorFrom(resp);
    return resp.json();
  }

  window.DL = window.DL || {};
  Object.assign(window.DL, { ApiError, api: { post, stream, get, hasKey: () => Boolean(memoryKey) } });
})();
