// A Node.js runtime calling quotagate, against `make run`:
//   (cd examples/node && npm ci) && node examples/node/quickstart.mjs [127.0.0.1:50051]
// Reserve before an AI response, Commit what it really used; a denial with silent =
// true means: hide the assistant, tell the end user nothing.
import { randomUUID } from "node:crypto";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const definition = protoLoader.loadSync("quotagate/v1/quota.proto", {
  includeDirs: [path.join(here, "..", "..", "proto")],
  keepCase: true, longs: Number, enums: String, defaults: true,
});
const { QuotaService } = grpc.loadPackageDefinition(definition).quotagate.v1;

const target = process.argv[2] ?? "127.0.0.1:50051";
const quota = new QuotaService(target, grpc.credentials.createInsecure());
const call = (method, request) => new Promise((resolve, reject) =>
  quota[method](request, { deadline: Date.now() + 5000 },
    (err, reply) => (err ? reject(err) : resolve(reply))));

const who = { org_id: "demo", seat_id: "alice", assistant_id: "helpdesk-bot" };
const hold = await call("Reserve", {
  subject: who, idempotency_key: randomUUID(),   // reuse it when you retry
  charges: [{ meter: "message_tokens", amount: 2000 }],
});
if (hold.decision !== "DECISION_GRANTED") {
  console.log("denied:", hold.reason, "silent:", hold.silent);
} else {
  // ... call the model here; it used 1,733 tokens ...
  const done = await call("Commit", {
    reservation_id: hold.reservation_id,
    actual: [{ meter: "message_tokens", amount: 1733 }],
  });
  const b = done.balances[0];
  const n = (x) => x.toLocaleString("en-US");
  console.log(`committed ${done.charged[0].amount} tokens; meter [${n(b.used)}/${n(b.total)} used]`);
}
quota.close();
