// Open the real ComfyUI frontend (headless Chromium), optionally load one UI-format workflow, then run a
// probe script in the page and print its result: the UI checks of tests/test_workflows.py (node bounds
// as the frontend lays them out, widgets the pack's web extension hides or disables, the template list).
//
//   node ui_probe.mjs --url http://127.0.0.1:8188 --probe probe.js [--workflow wf.json] [--screenshot x.png]
//
// probe.js is the body of an async function of (app, wf) evaluated in the page; whatever it returns
// is printed as {result, page_errors, console_errors, blocked_requests} (one JSON line on stdout).
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const nodeDir = process.env.STORYDIFFUSION_NODE_DIR || path.join(here, '..', '..', '.harness', 'node');
const require = createRequire(path.join(nodeDir, 'package.json'));
const { chromium } = require('playwright-core');

const args = { chromium: process.env.CHROMIUM_PATH || '/usr/bin/chromium', timeout: 90000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) if (argv[i].startsWith('--')) args[argv[i].slice(2)] = argv[++i];
for (const required of ['url', 'probe']) if (!args[required]) throw new Error(`missing --${required}`);
const workflow = args.workflow ? JSON.parse(readFileSync(args.workflow, 'utf8')) : null;
const probe = readFileSync(args.probe, 'utf8');
const report = { result: null, page_errors: [], console_errors: [], blocked_requests: [] };

const browser = await chromium.launch({
  executablePath: args.chromium,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.setDefaultTimeout(Number(args.timeout));
  page.on('console', (msg) => {
    if (msg.type() === 'error') report.console_errors.push({ text: msg.text(), url: msg.location().url });
  });
  page.on('pageerror', (err) => report.page_errors.push({ text: String(err && err.stack || err) }));
  const origin = new URL(args.url).origin;
  await page.route((url) => url.origin !== origin, (route) => {
    report.blocked_requests.push(route.request().url());
    return route.abort('internetdisconnected');
  });
  await page.goto(args.url, { waitUntil: 'domcontentloaded' });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).length > 50);
  await page.waitForTimeout(500);
  if (workflow) {
    await page.evaluate(async ({ wf, name }) => { await window.app.loadGraphData(wf, true, true, name); },
      { wf: workflow, name: path.basename(args.workflow, '.json') });
    await page.waitForTimeout(1000);  // image previews load, DOM widgets settle
  }
  report.result = await page.evaluate(async ({ body, wf }) => {
    const fn = new Function('app', 'wf', `return (async () => { ${body} })();`);
    return await fn(window.app, wf);
  }, { body: probe, wf: workflow });
  if (args.screenshot) await page.screenshot({ path: args.screenshot });
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report) + '\n');
