// Open one UI-format workflow in the real ComfyUI frontend (headless Chromium), then let the
// frontend itself convert it to an API prompt and queue it.
//
//   node run_workflow.mjs --url http://127.0.0.1:8188 --workflow workflows/comic_sd15.json \
//        --screenshot test-artifacts/comic_sd15.png [--no-queue] [--chromium /usr/bin/chromium] \
//        [--set '{"<node id>": {"<widget>": value}}']
//
// --set: widget values to change after the workflow loaded (and was screenshot) and before it is queued, as a user
// would edit them: the tests run the shipped files with their own sizes and steps (tests/workflow_sizes.py).
// Prints one JSON object on stdout: {prompt_id, api_prompt, queue_status, queue_response,
// missing_node_types, console_errors, blocked_requests, page_errors, dialogs, node_count, screenshot,
// widget_changes: [{node, type, widget, before, after}]}.
// The pytest side (tests/test_workflows.py) decides what is a failure; this script only reports.
// playwright-core comes from .harness/node (scripts/setup_browser.sh); it never downloads a browser.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const nodeDir = process.env.STORYDIFFUSION_NODE_DIR || path.join(here, '..', '..', '.harness', 'node');
const require = createRequire(path.join(nodeDir, 'package.json'));
const { chromium } = require('playwright-core');

function parseArgs(argv) {
  const args = { queue: true, chromium: process.env.CHROMIUM_PATH || '/usr/bin/chromium', timeout: 90000 };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    if (key === '--no-queue') args.queue = false;
    else if (key.startsWith('--')) args[key.slice(2)] = argv[++i];
  }
  for (const required of ['url', 'workflow', 'screenshot']) {
    if (!args[required]) throw new Error(`missing --${required}`);
  }
  args.timeout = Number(args.timeout);
  return args;
}

const args = parseArgs(process.argv.slice(2));
const t0 = Date.now();
const stage = (name) => { if (process.env.SD_BROWSER_DEBUG) process.stderr.write(`[${Date.now() - t0} ms] ${name}\n`); };
const workflow = JSON.parse(readFileSync(args.workflow, 'utf8'));
// which step a console line belongs to: 'startup' (the app starting, before our workflow exists),
// 'load' (loadGraphData of our workflow) or 'queue' (graphToPrompt + POST /prompt)
let phase = 'startup';
const report = {
  prompt_id: null, api_prompt: null, queue_status: null, queue_response: null,
  missing_node_types: [], console_errors: [], blocked_requests: [], page_errors: [], dialogs: [], node_count: 0,
  screenshot: args.screenshot, widget_changes: [],
};

// launch() always starts from a fresh, temporary profile (its own --user-data-dir)
const browser = await chromium.launch({
  executablePath: args.chromium,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.setDefaultTimeout(args.timeout);
  page.on('console', (msg) => {
    if (msg.type() === 'error') report.console_errors.push({ phase, text: msg.text(), url: msg.location().url });
  });
  // Tests run offline: the frontend's optional calls to other hosts (api.comfy.org release notes and
  // node registry) are answered at once with a network error instead of waiting on DNS; they are
  // listed in blocked_requests so the test can tell their console lines from real failures.
  const origin = new URL(args.url).origin;
  await page.route((url) => url.origin !== origin, (route) => {
    report.blocked_requests.push(route.request().url());
    return route.abort('internetdisconnected');
  });
  page.on('pageerror', (err) => report.page_errors.push({ phase, text: String(err && err.stack || err) }));
  // the queue request and its answer, as the frontend sent them
  page.on('request', (req) => {
    if (req.method() === 'POST' && new URL(req.url()).pathname.endsWith('/prompt')) {
      try { report.api_prompt = JSON.parse(req.postData() || '{}').prompt ?? null; } catch { /* reported below */ }
    }
  });
  const queued = new Promise((resolve) => {
    page.on('response', async (res) => {
      if (res.request().method() === 'POST' && new URL(res.url()).pathname.endsWith('/prompt')) {
        report.queue_status = res.status();
        try { report.queue_response = await res.json(); } catch { report.queue_response = await res.text(); }
        resolve();
      }
    });
  });

  stage('launched');
  await page.goto(args.url, { waitUntil: 'domcontentloaded' });
  // window.app is set once the graph canvas exists and every extension (node definitions) is loaded
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).length > 50);
  stage('app ready');
  // let the start-up workflow finish loading before replacing it
  await page.waitForTimeout(500);

  phase = 'load';
  const loaded = await page.evaluate(async ({ wf, name }) => {
    const registered = window.LiteGraph.registered_node_types;
    const missing = [...new Set(wf.nodes.map((n) => n.type).filter((t) => !(t in registered)))];
    await window.app.loadGraphData(wf, true, true, name);
    return { missing, nodeCount: window.app.graph.nodes.length };
  }, { wf: workflow, name: path.basename(args.workflow, '.json') });
  stage('loaded');
  report.missing_node_types = loaded.missing;
  report.node_count = loaded.nodeCount;

  await page.waitForTimeout(500);
  // any dialog the app opened while loading (missing nodes, missing models, errors): a PrimeVue dialog up to
  // frontend 1.35, a role=dialog element in 1.47
  report.dialogs = await page.evaluate(() => [...document.querySelectorAll('.p-dialog, [role="dialog"]')]
    .filter((d) => d.offsetParent !== null)
    .map((d) => (d.innerText || '').slice(0, 2000)));
  stage('dialogs read');
  await page.screenshot({ path: args.screenshot });

  stage('screenshot');
  if (args.set) {
    report.widget_changes = await page.evaluate((settings) => {
      const changes = [];
      for (const [id, values] of Object.entries(settings)) {
        const node = window.app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(values)) {
          const w = node?.widgets?.find((x) => x.name === name);
          changes.push({ node: id, type: node?.type ?? null, widget: name, before: w ? w.value : null,
                         after: value, found: !!w });
          if (!w) continue;
          w.value = value;
          w.callback?.(value, window.app.canvas, node);
        }
      }
      window.app.graph.setDirtyCanvas(true, true);
      return changes;
    }, JSON.parse(args.set));
    stage('widgets set');
  }
  if (args.queue && loaded.missing.length === 0) {
    phase = 'queue';
    // the same code path as the Queue button: graphToPrompt(), widget callbacks, POST /prompt
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    // clear the timer afterwards: a pending setTimeout keeps Node alive until it fires (a 90 s idle wait)
    let timer;
    await Promise.race([queued, new Promise((r) => { timer = setTimeout(r, args.timeout); })]);
    clearTimeout(timer);
    stage('queued');
    report.prompt_id = report.queue_response && report.queue_response.prompt_id || null;
  }
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(report) + '\n');
