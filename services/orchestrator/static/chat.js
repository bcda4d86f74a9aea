// The chat box: one streamed chat completion from the gateway, token by token, as its SSE chunks arrive.
import { API_KEY, stored } from "./util.js";

async function* sseData(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of frame.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

export function setupChat() {
  const form = document.getElementById("chat-form");
  const out = document.getElementById("chat-answer");
  const state = document.getElementById("chat-state");
  const key = document.getElementById("chat-key");
  const send = document.getElementById("chat-send");
  key.value = stored(API_KEY);
  key.addEventListener("change", () => sessionStorage.setItem(API_KEY, key.value));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {
      model: document.getElementById("chat-model").value,
      messages: [{ role: "user", content: document.getElementById("chat-prompt").value }],
      max_tokens: Number(document.getElementById("chat-max").value),
      temperature: Number(document.getElementById("chat-temperature").value),
      stream: true,
    };
    out.textContent = "";
    out.dataset.state = "streaming";
    state.textContent = `asking ${body.model}…`;
    send.disabled = true;
    const headers = { "content-type": "application/json" };
    if (key.value) headers.authorization = `Bearer ${key.value}`;
    try {
      const resp = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
      if (!resp.ok) {
        const body = await resp.json().catch(() => ({}));
        // FastAPI's {"detail": ...} or OpenAI's {"error": {"message": ...}}
        const why = body.error && body.error.message ? body.error.message : body.detail;
        throw new Error(`${resp.status}: ${typeof why === "string" ? why : JSON.stringify(why)}`);
      }
      let finish = null;
      for await (const data of sseData(resp)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        if (choice.delta && choice.delta.content) out.textContent += choice.delta.content;
        finish = choice.finish_reason || finish;
      }
      state.textContent = `done (finish reason: ${finish})`;
      out.dataset.state = "done";
    } catch (err) {
      state.textContent = `failed: ${err.message}`;
      out.dataset.state = "failed";
    } finally {
      send.disabled = false;
    }
  });
}
