// Drives the browser example's page (examples/browser/site) in headless
// Chromium (Debian's /usr/bin/chromium, through playwright-core), as a
// person would: types console lines, runs the mux demo, takes a screenshot,
// resets the slow stream. Every wait is on the page's own state
// (`window.example`), bounded by --timeout.
//
//   node example-browser.mjs PAGE_URL --scenario JSON [--screenshot PNG] [--timeout SECONDS] [--chromium PATH]
//
// The scenario: { "console": ["SET k v", ...], "echoStreams": 4, "mib": 8, "slowMib": 64 }.
// Prints {"ok": true, "console": [...], "mux": {...}, "afterReset": {...}} as its last line.
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [pageUrl, ...rest] = process.argv.slice(2);
let timeout = 60;
let executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
let screenshot = null;
let scenario = null;
for (let i = 0; i < rest.length; i++) {
  if (rest[i] === '--timeout') timeout = Number(rest[++i]);
  else if (rest[i] === '--chromium') executablePath = rest[++i];
  else if (rest[i] === '--screenshot') screenshot = rest[++i];
  else if (rest[i] === '--scenario') scenario = JSON.parse(rest[++i]);
  else {
    console.log(JSON.stringify({ ok: false, error: `unknown argument ${rest[i]}` }));
    process.exit(2);
  }
}
if (!scenario) {
  console.log(JSON.stringify({ ok: false, error: '--scenario is required' }));
  process.exit(2);
}

const userDataDir = mkdtempSync(join(tmpdir(), 'wsgate-e2e-chromium-'));
const logs = [];
const step = (s) => logs.push(`step: ${s}`);
let context;
let exitCode = 1;
const hardStop = setTimeout(() => {
  console.log(JSON.stringify({ ok: false, error: `hard timeout after ${timeout + 15}s`, logs }));
  process.exit(1);
}, (timeout + 15) * 1000);

// The page's state without the live stream objects.
const snapshot = (page) =>
  page.evaluate(() => JSON.parse(JSON.stringify(window.example, (k, v) => (k === 'stream' ? undefined : v))));

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    timeout: timeout * 1000,
    viewport: { width: 1280, height: 720 },
    deviceScaleFactor: 1,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--font-render-hinting=none',
    ],
  });
  context.setDefaultTimeout(timeout * 1000);
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => logs.push(`console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  step('load');
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.example?.ready === true);

  const input = page.locator('#console-input');
  for (const [i, line] of (scenario.console ?? []).entries()) {
    step(`console ${i}: ${line}`);
    await input.fill(line);
    await input.press('Enter');
    await page.waitForFunction((n) => window.example.console.entries[n]?.done === true, i);
  }
  const consoleText = await page.locator('#console-log').innerText();

  step('mux: run');
  await page.locator('#echo-count').fill(String(scenario.echoStreams ?? 4));
  await page.locator('#stream-mib').fill(String(scenario.mib ?? 8));
  await page.locator('#slow-mib').fill(String(scenario.slowMib ?? 64));
  await page.locator('#mux-run').click();
  // The echo streams all finished (bytes checked) while the slow one waits for credit.
  await page.waitForFunction(() => {
    const m = window.example.mux;
    return m.phase === 'failed' || (m.echoDone && m.slowStalled) || m.streams.some((r) => r.error);
  });
  const mux = await snapshot(page);
  const tableText = await page.locator('#mux-table').innerText();
  if (screenshot) {
    step('screenshot');
    await page.screenshot({ path: screenshot, fullPage: true });
  }

  step('mux: reset the slow stream');
  await page.locator('#slow-reset').click();
  await page.waitForFunction(() => {
    const slow = window.example.mux.streams.find((r) => r.kind === 'slow');
    return slow && slow.state !== 'sending';
  });
  await page.waitForFunction(() => window.example.mux.phase !== 'running');
  const afterReset = await snapshot(page);
  const version = context.browser() ? context.browser().version() : undefined;
  console.log(JSON.stringify({ ok: true, console: mux.console, consoleText, mux: mux.mux, tableText, afterReset: afterReset.mux, logs, version }));
  exitCode = 0;
} catch (err) {
  console.log(JSON.stringify({ ok: false, error: String((err && err.stack) || err), logs }));
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  clearTimeout(hardStop);
}
process.exit(exitCode);
