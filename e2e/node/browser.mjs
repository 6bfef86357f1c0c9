// Headless Chromium (Debian's /usr/bin/chromium) driven by playwright-core.
//
//   node browser.mjs PAGE_URL [--timeout SECONDS] [--chromium PATH] [--ignore-https-errors]
//
// Loads PAGE_URL (served by the test) and waits until the page sets
// `window.__result`; prints {"ok": true, "result": ...} as the last line.
// Never downloads a browser: the executable is Debian's Chromium
// (override with --chromium or $CHROMIUM).
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [pageUrl, ...rest] = process.argv.slice(2);
let timeout = 30;
let executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
let ignoreHttpsErrors = false;
for (let i = 0; i < rest.length; i++) {
  if (rest[i] === '--timeout') timeout = Number(rest[++i]);
  else if (rest[i] === '--chromium') executablePath = rest[++i];
  // For a test's self-signed certificate.
  else if (rest[i] === '--ignore-https-errors') ignoreHttpsErrors = true;
  else {
    console.log(JSON.stringify({ ok: false, error: `unknown argument ${rest[i]}` }));
    process.exit(2);
  }
}

const userDataDir = mkdtempSync(join(tmpdir(), 'wsgate-e2e-chromium-'));
const logs = [];
let context;
let exitCode = 1;
const hardStop = setTimeout(() => {
  console.log(JSON.stringify({ ok: false, error: `hard timeout after ${timeout + 15}s`, logs }));
  process.exit(1);
}, (timeout + 15) * 1000);
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    timeout: timeout * 1000,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ...(ignoreHttpsErrors ? ['--ignore-certificate-errors'] : []),
    ],
    ignoreHTTPSErrors: ignoreHttpsErrors,
  });
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => logs.push(`console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(pageUrl, { timeout: timeout * 1000 });
  await page.waitForFunction(() => window.__result !== undefined, null, { timeout: timeout * 1000 });
  const result = await page.evaluate(() => window.__result);
  result.pageProtocol = await page.evaluate(() => performance.getEntriesByType('navigation')[0]?.nextHopProtocol);
  const version = context.browser() ? context.browser().version() : undefined;
  console.log(JSON.stringify({ ok: true, result, logs, version }));
  exitCode = 0;
} catch (err) {
  console.log(JSON.stringify({ ok: false, error: String(err && err.stack || err), logs }));
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  clearTimeout(hardStop);
}
process.exit(exitCode);
