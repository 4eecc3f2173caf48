// Streams a Generate and reads Status from a live hjcg server (HJCG_TARGET), as tests/test_node_client.py runs it.
"use strict";

const test = require("node:test");
const assert = require("node:assert");
const { connect, grpc } = require("../hjcg.js");

const target = process.env.HJCG_TARGET;

test("streams a chat answer and reads Status", { skip: !target && "HJCG_TARGET not set" }, async () => {
  const client = connect(target);
  try {
    const seen = [];
    const result = await client.generate(
      { chat: { messages: [{ role: "user", content: "What is the capital of France?" }] }, max_new_tokens: 24 },
      (t) => seen.push(t));
    assert.ok(seen.length > 2);
    assert.deepStrictEqual(seen.map((t) => t.index), seen.map((_, i) => i));
    assert.match(result.text, /Paris/);
    assert.strictEqual(result.finish.reason, "FINISH_REASON_EOS");
    const status = await client.status();
    assert.strictEqual(status.model.name, "SmolLM2-135M-Instruct");
    assert.strictEqual(status.engine_mode, "eager");
  } finally {
    client.close();
  }
});

test("bad input is INVALID_ARGUMENT", { skip: !target && "HJCG_TARGET not set" }, async () => {
  const client = connect(target);
  try {
    await assert.rejects(client.generate({ text: "" }), (err) => err.code === grpc.status.INVALID_ARGUMENT);
  } finally {
    client.close();
  }
});
