// One Node client call through the gateway, as an agent makes it; prints one JSON line.
// Usage: node client.cjs MODE URL   (proxy and trust from the environment:
// HTTPS_PROXY/HTTP_PROXY and NODE_EXTRA_CA_CERTS; see docs/clients.md)
"use strict";
const { EnvHttpProxyAgent, setGlobalDispatcher } = require("undici");

const [mode, url] = process.argv.slice(2);
// Node 20's built-in fetch reads no proxy variable: this is the recipe ("bare" shows
// what happens without it).
if (mode !== "bare") setGlobalDispatcher(new EnvHttpProxyAgent());
const now = () => Number(process.hrtime.bigint() / 1000n) / 1e6; // seconds
const out = (doc) => process.stdout.write(JSON.stringify(doc) + "\n");

async function viaFetch() {
  const r = await fetch(url);
  const stamps = [];
  let body = "";
  const decoder = new TextDecoder();
  for await (const chunk of r.body) {
    const text = decoder.decode(chunk, { stream: true });
    body += text;
    for (const _ of text.matchAll(/^data:/gm)) stamps.push(now());
  }
  out({ status: r.status, id: r.headers.get("x-taskgate-request-id"), body, stamps });
}

async function viaAxios() {
  const axios = require("axios");
  try {
    const r = await axios.get(url); // the proxy from HTTPS_PROXY, through CONNECT
    out({ status: r.status, id: r.headers["x-taskgate-request-id"], body: r.data });
  } catch (e) {
    const r = e.response;
    out({ status: r && r.status, id: r && r.headers["x-taskgate-request-id"],
          message: e.message, detail: r && r.data && r.data.error && r.data.error.message });
  }
}

async function viaOpenAI(stream) {
  const OpenAI = require("openai");
  const client = new OpenAI({ baseURL: url, apiKey: "sk-test", maxRetries: 0 });
  try {
    if (!stream) {
      const { data, response } = await client.chat.completions
        .create({ model: "gpt-test", messages: [{ role: "user", content: "hi" }] })
        .withResponse();
      out({ status: response.status, id: response.headers.get("x-taskgate-request-id"),
            body: data.choices[0].message.content });
      return;
    }
    const s = await client.chat.completions.create({
      model: "gpt-test", messages: [{ role: "user", content: "hi" }], stream: true });
    const stamps = [];
    for await (const chunk of s) {
      if (chunk.choices[0] && chunk.choices[0].delta.content) stamps.push(now());
    }
    out({ status: 200, stamps });
  } catch (e) {
    out({ status: e.status, id: e.headers && e.headers.get("x-taskgate-request-id"),
          message: String(e.message), name: e.constructor.name });
  }
}

async function refusedOpenAI() {
  const OpenAI = require("openai");
  const client = new OpenAI({ baseURL: url, apiKey: "sk-test", maxRetries: 0 });
  try {
    await client.embeddings.create({ model: "e", input: "x" });
    out({ status: 200 });
  } catch (e) {
    out({ status: e.status, id: e.headers && e.headers.get("x-taskgate-request-id"),
          message: String(e.message), name: e.constructor.name });
  }
}

async function viaMcp() {
  // The official TypeScript MCP client over streamable HTTP: its fetch goes through the
  // dispatcher above, so through the gateway.
  const { Client, StreamableHTTPClientTransport } = require("@modelcontextprotocol/client");
  const client = new Client({ name: "taskgate-node-test", version: "1.0.0" });
  await client.connect(new StreamableHTTPClientTransport(new URL(url)));
  const tools = (await client.listTools()).tools.map((t) => t.name).sort();
  const call = async (name, args) => {
    try {
      const r = await client.callTool({ name, arguments: args });
      return { result: r.structuredContent, isError: Boolean(r.isError) };
    } catch (e) {
      return { code: e.code, message: String(e.message), name: e.constructor.name };
    }
  };
  const added = await call("add", { a: 2, b: 3 });
  const danger = await call("danger", { target: "prod" });
  const over = await call("search", { query: "mcp docs", limit: 500 });
  const after = await call("add", { a: 1, b: 1 });
  await client.close();
  out({ tools, added, danger, over, after });
}

const modes = {
  fetch: viaFetch,
  bare: viaFetch,
  axios: viaAxios,
  openai: () => viaOpenAI(false),
  "openai-stream": () => viaOpenAI(true),
  "openai-refused": refusedOpenAI,
  mcp: viaMcp,
};
modes[mode]().catch((e) => {
  out({ error: String(e && e.stack || e), cause: String(e && e.cause) });
  process.exitCode = 1;
});
