// `npm pack` makes a tarball that installs into an empty project, with no
// dependencies, and imports in Node (ESM) and in TypeScript (its .d.ts
// through `exports`). The same files load in a browser page in
// e2e/tests/test_ts_client.py.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, readdirSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const pkgDir = join(dirname(fileURLToPath(import.meta.url)), "..");
const run = (cmd, args, cwd) => execFileSync(cmd, args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

test("npm pack → install into an empty project → import in Node and type-check in TypeScript", { timeout: 120_000 }, () => {
  const dir = mkdtempSync(join(tmpdir(), "wsgate-client-pack-"));
  try {
    // --ignore-scripts: dist/ is what the test command built (prepack would rebuild it under the other tests' feet).
    const [info] = JSON.parse(run("npm", ["pack", "--json", "--ignore-scripts", "--pack-destination", dir], pkgDir));
    const files = info.files.map((f) => f.path);
    for (const f of ["package.json", "README.md", "dist/index.js", "dist/index.d.ts", "dist/mux/session.js", "dist/resp.d.ts"]) {
      assert.ok(files.includes(f), `${f} is in the tarball`);
    }
    assert.ok(!files.some((f) => f.startsWith("test/") || f.startsWith("node_modules/")), "no tests or dependencies");
    const project = join(dir, "app");
    run("mkdir", ["-p", project]);
    writeFileSync(join(project, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
    run("npm", ["install", "--offline", "--no-audit", "--no-fund", "--ignore-scripts", join(dir, info.filename)], project);
    assert.deepEqual(readdirSync(join(project, "node_modules")).filter((n) => !n.startsWith(".")), ["wsgate-client"], "no runtime dependencies");

    writeFileSync(
      join(project, "main.js"),
      `import { MuxSession, openStream, RedisClient, MuxError, StreamResetError, OpenRefusedError, encodeCommand } from "wsgate-client";
import { decodeFrame, encodeFrame } from "wsgate-client/mux";
import { decodeResp } from "wsgate-client/resp";
const f = decodeFrame(encodeFrame(0, 4, 1, 0));
const r = decodeResp(encodeCommand(["PING"]));
console.log(JSON.stringify({ mux: typeof MuxSession.connect, open: typeof openStream, redis: typeof RedisClient,
  errors: [MuxError, StreamResetError, OpenRefusedError].map((e) => e.name), fin: f.flags, resp: r.value }));
`,
    );
    const out = JSON.parse(run(process.execPath, ["main.js"], project));
    assert.deepEqual(out, {
      mux: "function",
      open: "function",
      redis: "function",
      errors: ["MuxError", "StreamResetError", "OpenRefusedError"],
      fin: 4,
      resp: ["PING"],
    });

    writeFileSync(
      join(project, "main.ts"),
      `import { MuxSession, openStream, RedisClient, OpenRefusedError, type MuxStream, type RespValue } from "wsgate-client";
export async function demo(url: string): Promise<number> {
  const session: MuxSession = await MuxSession.connect(url, { token: "t", keepalive: { interval: 1000 } });
  const s: MuxStream = await session.open("tcp://127.0.0.1:6379");
  const w: WritableStreamDefaultWriter<Uint8Array | string | ArrayBuffer | ArrayBufferView> = s.writable.getWriter();
  await w.write("PING\\r\\n");
  const r: ReadableStreamDefaultReader<Uint8Array> = s.readable.getReader();
  const { value } = await r.read();
  const ws = await openStream(url, { protocols: ["redis"], highWaterMark: 1 << 20 });
  const redis = new RedisClient(ws);
  const v: RespValue = await redis.send("GET", "k");
  try { await session.open("tcp://x:1"); } catch (e) { if (e instanceof OpenRefusedError) return e.status; }
  return (value?.byteLength ?? 0) + (v === null ? 0 : 1);
}
`,
    );
    writeFileSync(
      join(project, "tsconfig.json"),
      JSON.stringify({ compilerOptions: { module: "nodenext", moduleResolution: "nodenext", target: "es2022", lib: ["es2022", "dom"], strict: true, noEmit: true, types: [] }, files: ["main.ts"] }),
    );
    const tsc = join(pkgDir, "node_modules", ".bin", "tsc");
    assert.ok(existsSync(tsc), "typescript is installed (npm ci)");
    run(tsc, ["-p", "tsconfig.json"], project);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
