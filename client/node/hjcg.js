// Node.js client for hjcg: loads proto/hjcg/v1/hjcg.proto at run time (no generated code to keep in sync).
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "hjcg", "v1", "hjcg.proto");
const definition = protoLoader.loadSync(PROTO, {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const { hjcg } = grpc.loadPackageDefinition(definition);

const DEFAULT_TARGET = "127.0.0.1:50051"; // where `hjcg serve` listens by default

/** Connects to an hjcg server at `target` ("host:port" or "unix:/path"; default $HJCG_TARGET, else 127.0.0.1:50051). */
function connect(target, { token } = {}) {
  target = target || process.env.HJCG_TARGET || DEFAULT_TARGET;
  const client = new hjcg.v1.Hjcg(target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return {
    raw: client,
    /** Streams a generation; resolves to { text, tokens, finish } when the stream ends. */
    generate(request, onToken = () => {}) {
      return new Promise((resolve, reject) => {
        const call = client.Generate(request, metadata);
        const tokens = [];
        let finish = null;
        call.on("data", (msg) => {
          if (msg.event === "token") {
            tokens.push(msg.token);
            onToken(msg.token);
          } else {
            finish = msg.finish;
          }
        });
        call.on("error", reject);
        call.on("end", () => resolve({ text: tokens.map((t) => t.text).join("") + (finish ? finish.text : ""), tokens, finish }));
      });
    },
    status() {
      return new Promise((resolve, reject) => client.Status({}, metadata, (err, res) => (err ? reject(err) : resolve(res))));
    },
    close() {
      client.close();
    },
  };
}

module.exports = { connect, grpc };

if (require.main === module) {
  // node hjcg.js "prompt"  (HJCG_TARGET, default 127.0.0.1:50051)
  const c = connect(undefined, { token: process.env.HJCG_AUTH_TOKEN });
  const prompt = process.argv.slice(2).join(" ") || "What is the capital of France?";
  c.generate({ chat: { messages: [{ role: "user", content: prompt }] }, max_new_tokens: 64 },
    (t) => process.stdout.write(t.text))
    .then(() => { process.stdout.write("\n"); c.close(); })
    .catch((err) => { console.error(`hjcg-client: ${grpc.status[err.code]}: ${err.details}`); c.close(); process.exit(1); });
}
