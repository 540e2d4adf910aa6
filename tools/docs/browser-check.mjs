#!/usr/bin/env node
// Loads a ferrostream AsyncAPI docs page in headless Chromium and checks it.
//
//   node tools/docs/browser-check.mjs --url http://127.0.0.1:PORT/docs \
//        [--expect-names names.json] [--screenshot out.png] \
//        [--publish-channel ADDRESS --publish-payload TEXT] [--expect-no-form]
//
// Fails (exit 1) on: a name from names.json (a JSON array of strings) missing
// from document.body.innerText, any console error/warning, any page error, any
// failed request (network failure or HTTP status >= 400), a publish through
// the page's form that does not end in "ok", or (with --expect-no-form) any
// publish form on the page or any POST the page makes. Exit 2 on bad usage.
// Always ends with one JSON summary line on stdout. Never runs longer than
// ~55 s. Chromium: $CHROMIUM or /usr/bin/chromium.
import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const HARD_LIMIT_MS = 55_000;
const started = Date.now();

function usage(msg) {
  if (msg) console.error(`browser-check: ${msg}`);
  console.error('usage: node tools/docs/browser-check.mjs --url URL [--expect-names FILE] [--screenshot PNG]\n' +
    '         [--publish-channel ADDRESS --publish-payload TEXT] [--expect-no-form]');
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { url: null, names: null, screenshot: null, publishChannel: null, publishPayload: null, expectNoForm: false };
  const valued = { '--url': 'url', '--expect-names': 'names', '--screenshot': 'screenshot', '--publish-channel': 'publishChannel', '--publish-payload': 'publishPayload' };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let v;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) { v = a.slice(eq + 1); a = a.slice(0, eq); }
    if (a === '--expect-no-form') opts.expectNoForm = true;
    else if (a === '-h' || a === '--help') usage();
    else if (valued[a]) {
      if (v === undefined) { if (i + 1 >= argv.length) usage(`${a} needs a value`); v = argv[++i]; }
      opts[valued[a]] = v;
    } else usage(`unknown argument ${a}`);
  }
  if (!opts.url) usage('--url is required');
  if (opts.publishChannel !== null && opts.publishPayload === null) usage('--publish-channel needs --publish-payload');
  if (opts.publishChannel !== null && opts.expectNoForm) usage('--publish-channel and --expect-no-form exclude each other');
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
let names = [];
if (opts.names) {
  try {
    names = JSON.parse(readFileSync(opts.names, 'utf8'));
    if (!Array.isArray(names) || !names.every((n) => typeof n === 'string')) throw new Error('must be a JSON array of strings');
  } catch (e) { usage(`--expect-names ${opts.names}: ${e.message}`); }
}

const summary = {
  ok: false, url: opts.url, missing: [], console: [], pageErrors: [], failedRequests: [],
  publish: null, form: null, screenshot: null, errors: [], ms: 0,
};
let browser = null;
let finished = false;

async function finish(code) {
  if (finished) return;
  finished = true;
  summary.ms = Date.now() - started;
  if (browser) await Promise.race([browser.close().catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
  console.log(JSON.stringify(summary));
  process.exit(code);
}

// Whatever happens, never hang.
const watchdog = setTimeout(() => {
  summary.errors.push(`timed out after ${HARD_LIMIT_MS} ms`);
  summary.ok = false;
  finish(1);
}, HARD_LIMIT_MS);

const step = (what) => console.error(`browser-check: ${what}`);
const cssString = (s) => '"' + s.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\a ') + '"';

try {
  step(`launching ${process.env.CHROMIUM || '/usr/bin/chromium'}`);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    timeout: 20_000,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 }, serviceWorkers: 'block' });
  context.setDefaultTimeout(10_000);
  context.setDefaultNavigationTimeout(15_000);
  const page = await context.newPage();
  const posts = [];
  page.on('console', (msg) => {
    const type = msg.type();
    if (type === 'error' || type === 'warning') {
      const loc = msg.location();
      summary.console.push({ type, text: msg.text(), where: loc && loc.url ? `${loc.url}:${loc.lineNumber}` : undefined });
    }
  });
  page.on('pageerror', (err) => summary.pageErrors.push(String(err && err.stack ? err.stack : err)));
  page.on('requestfailed', (req) => summary.failedRequests.push({ method: req.method(), url: req.url(), failure: (req.failure() || {}).errorText || 'failed' }));
  page.on('response', (res) => {
    if (res.status() >= 400) summary.failedRequests.push({ method: res.request().method(), url: res.url(), failure: `HTTP ${res.status()}` });
  });
  page.on('request', (req) => { if (req.method() !== 'GET' && req.method() !== 'HEAD') posts.push({ method: req.method(), url: req.url() }); });

  step(`loading ${opts.url}`);
  const res = await page.goto(opts.url, { waitUntil: 'load' });
  if (!res) summary.errors.push('navigation gave no response');
  else if (!res.ok()) summary.errors.push(`page answered HTTP ${res.status()}`);
  await page.waitForSelector('#app main', { state: 'attached', timeout: 10_000 })
    .catch(() => summary.errors.push('the page did not render (#app main never appeared)'));
  await page.waitForLoadState('networkidle', { timeout: 5_000 }).catch(() => {});

  if (names.length) {
    const text = await page.evaluate(() => document.body.innerText);
    summary.missing = names.filter((n) => !text.includes(n));
  }

  if (opts.screenshot) {
    step(`screenshot ${opts.screenshot}`);
    await page.screenshot({ path: opts.screenshot, fullPage: true, timeout: 15_000 });
    summary.screenshot = opts.screenshot;
  }

  if (opts.publishChannel !== null) {
    const sel = `.publish-form[data-channel-address=${cssString(opts.publishChannel)}]`;
    const forms = page.locator(sel);
    const n = await forms.count();
    if (n === 0) {
      const have = await page.$$eval('.publish-form', (els) => els.map((e) => e.getAttribute('data-channel-address')));
      summary.publish = `no publish form for channel ${opts.publishChannel} (forms: ${JSON.stringify(have)})`;
      summary.errors.push(summary.publish);
    } else {
      const form = forms.first();
      const payloadBox = (await form.locator('textarea.publish-payload').count()) ? form.locator('textarea.publish-payload') : form.locator('textarea').first();
      await payloadBox.fill(opts.publishPayload);
      const result = form.locator('.publish-result');
      step(`publishing to ${opts.publishChannel}`);
      await form.locator('.publish-button').click();
      try {
        await result.and(page.locator('.ok, .error')).waitFor({ state: 'attached', timeout: 10_000 });
        const cls = await result.getAttribute('class');
        summary.publish = (await result.innerText()).trim();
        console.error(`browser-check: publish result: ${summary.publish}`);
        if (!/\bok\b/.test(cls || '')) summary.errors.push(`publish failed: ${summary.publish}`);
      } catch (e) {
        summary.publish = `no result within 10 s (${(await result.innerText().catch(() => '')).trim() || 'empty'})`;
        summary.errors.push(`publish: ${summary.publish}`);
      }
    }
  }

  if (opts.expectNoForm) {
    const counts = await page.evaluate(() => ({
      publishForms: document.querySelectorAll('.publish-form').length,
      publishButtons: document.querySelectorAll('.publish-button').length,
      forms: document.forms.length,
      textareas: document.querySelectorAll('textarea').length,
      buttons: document.querySelectorAll('button, input[type=submit]').length,
    }));
    // Press every button there is (there should be none) and see that nothing is POSTed.
    for (const b of await page.locator('button, input[type=submit]').all()) await b.click({ timeout: 2_000 }).catch(() => {});
    await page.waitForTimeout(300);
    summary.form = { ...counts, posts: posts.length };
    if (counts.publishForms || counts.publishButtons || counts.forms || counts.textareas)
      summary.errors.push(`expected no publish form, found ${JSON.stringify(counts)}`);
    if (posts.length) summary.errors.push(`the page sent ${JSON.stringify(posts)}`);
  }

  await page.waitForTimeout(200); // let late console messages arrive
} catch (e) {
  summary.errors.push(String(e && e.message ? e.message.split('\n')[0] : e));
}

clearTimeout(watchdog);
summary.ok = summary.errors.length === 0 && summary.missing.length === 0 && summary.console.length === 0 &&
  summary.pageErrors.length === 0 && summary.failedRequests.length === 0;
for (const m of summary.missing) console.error(`browser-check: missing name: ${m}`);
for (const c of summary.console) console.error(`browser-check: console ${c.type}: ${c.text}`);
for (const p of summary.pageErrors) console.error(`browser-check: page error: ${p}`);
for (const r of summary.failedRequests) console.error(`browser-check: failed request: ${r.method} ${r.url} ${r.failure}`);
for (const e of summary.errors) console.error(`browser-check: ${e}`);
await finish(summary.ok ? 0 : 1);
