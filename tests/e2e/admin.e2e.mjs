// The admin UI in headless Chromium (Debian's `chromium`, driven by
// playwright-core). Run by tests/it/ui.rs (`browser_end_to_end`), which
// starts the gateway with a mock upstream and passes its URLs:
//   LQ_ADMIN_URL, LQ_PROXY_URL, LQ_ADMIN_PASSWORD, LQ_MODEL, LQ_CHROMIUM, LQ_ARTEFACTS
// Exits non-zero with the failing step's name; screenshots go to LQ_ARTEFACTS.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run this through cargo test --test it ui)`);
  return v;
};
const admin = env('LQ_ADMIN_URL');
const proxy = env('LQ_PROXY_URL');
const password = env('LQ_ADMIN_PASSWORD');
const model = env('LQ_MODEL');
const artefacts = env('LQ_ARTEFACTS');
mkdirSync(artefacts, { recursive: true });
const shot = (name) => path.join(artefacts, `${name}.png`);

const browser = await chromium.launch({
  executablePath: env('LQ_CHROMIUM'),
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-proxy-server',
  ],
});
const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: admin });
const page = await context.newPage();
page.setDefaultTimeout(10_000);

// Nothing may load from another host, and nothing may break (CSP
// violations show up as console errors too).
let current = 'start';
const adminOrigin = new URL(admin).origin;
const foreign = [];
const problems = [];
page.on('request', (r) => {
  if (!r.url().startsWith('data:') && new URL(r.url()).origin !== adminOrigin) foreign.push(r.url());
});
page.on('console', (m) => { if (m.type() === 'error') problems.push({ step: current, text: `console: ${m.text()}` }); });
page.on('pageerror', (e) => problems.push({ step: current, text: `page error: ${e}` }));
// The wrong password's answer is a 401 page, which Chromium logs as an error.
const expected = (p) => p.step.startsWith('log in') && /status of 401/.test(p.text);

async function eventually(what, check, timeoutMs = 10_000) {
  const until = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      return await check();
    } catch (e) {
      last = e;
    }
    if (Date.now() > until) throw new Error(`${what}: ${last?.message ?? last}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function step(name, fn) {
  current = name;
  console.log(`step: ${name}`);
  await fn();
}

// Marks the document; a full page load would lose the mark.
const markPage = () => page.evaluate(() => { window.__lqNoReload = true; });
const assertNoReload = async (what) =>
  assert.equal(await page.evaluate(() => window.__lqNoReload === true), true, `${what} reloaded the page`);

const keyName = 'e2e team';
const keyRow = () => page.locator('tr.key-row', { has: page.locator('th', { hasText: keyName }) });
const quotaText = (quota) => keyRow().locator(`[data-quota="${quota}"] .bar-text`).innerText();
const fillOf = (quota) => keyRow().locator(`[data-quota="${quota}"] rect.fill`);

async function proxied(plaintext) {
  const r = await fetch(`${proxy}/v1/chat/completions`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${plaintext}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ model, messages: [{ role: 'user', content: 'Hello from the browser test' }] }),
  });
  const body = await r.text();
  return { status: r.status, body };
}

try {
  let plaintext;

  await step('log in (a wrong password first, then with the keyboard)', async () => {
    await page.goto(`${admin}/`);
    assert.match(page.url(), /\/login/);
    await page.getByLabel('Admin password').fill('not the password');
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.getByText('Wrong password.').waitFor();
    await page.getByLabel('Admin password').fill(password);
    await page.keyboard.press('Enter');
    await page.getByRole('heading', { name: 'API keys' }).waitFor();
    assert.equal(new URL(page.url()).pathname, '/');
    const cookies = await context.cookies();
    const session = cookies.find((c) => c.name === 'lq_admin_session');
    assert.ok(session, 'session cookie set');
    assert.equal(session.httpOnly, true);
    assert.equal(session.sameSite, 'Strict');
    // Keyboard focus is visible: the first Tab lands on the skip link, outlined.
    await page.keyboard.press('Tab');
    const focus = await page.evaluate(() => {
      const el = document.activeElement;
      return { cls: el.className, outline: getComputedStyle(el).outlineStyle };
    });
    assert.deepEqual(focus, { cls: 'skip', outline: 'solid' });
    await markPage();
  });

  await step('create a key and read its plaintext once', async () => {
    const form = page.locator('#create-form');
    await form.getByLabel('Name').fill(keyName);
    await form.getByLabel('Tokens per day').fill('100000');
    await form.getByLabel('Requests per day').fill('10');
    await form.getByLabel('Expires').fill('2099-12-31T23:59');
    await form.getByRole('button', { name: 'Create key' }).click();
    const keyInput = page.locator('#new-key-value');
    await keyInput.waitFor();
    plaintext = await keyInput.inputValue();
    assert.match(plaintext, /^sk-[0-9a-f]{64}$/);
    await page.getByText('This is the only time the key is shown').waitFor();
    assert.equal(await page.evaluate(() => document.activeElement.id), 'new-key-value', 'the new key has the focus');
    await page.getByRole('button', { name: 'Copy', exact: true }).click();
    await page.getByRole('button', { name: 'Copied' }).waitFor();
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), plaintext, 'the copy button copies the key');
    await keyRow().waitFor();
    assert.match(await keyRow().innerText(), /2099-12-31 23:59/);
    assert.equal(await keyRow().locator('.prefix').innerText(), `${plaintext.slice(0, 10)}…`);
    await assertNoReload('creating a key');
    await page.screenshot({ path: shot('key-created'), fullPage: true });
    await page.getByRole('button', { name: 'I have saved it, hide it' }).click();
    assert.equal(await page.locator('#new-key-value').count(), 0);
    await page.reload();
    assert.ok(!(await page.content()).includes(plaintext), 'the plaintext is shown once only');
    await markPage();
  });

  await step('edit limits in place (Escape cancels)', async () => {
    await keyRow().getByRole('button', { name: `Edit limits and expiry of ${keyName}` }).click();
    const edit = page.locator('tr.editing');
    await edit.waitFor();
    assert.equal(await page.evaluate(() => document.activeElement.name), 'daily_token_limit', 'the edit form has the focus');
    await page.keyboard.press('Escape');
    await edit.waitFor({ state: 'detached' });
    await keyRow().getByRole('button', { name: `Edit limits and expiry of ${keyName}` }).click();
    await edit.waitFor();
    assert.equal(await edit.getByLabel('Requests per day').inputValue(), '10');
    await page.screenshot({ path: shot('key-edit'), fullPage: true });
    await edit.getByLabel('Requests per day').fill('4');
    await edit.getByLabel('Tokens per month').fill('50000');
    await edit.getByRole('button', { name: 'Save' }).click();
    await edit.waitFor({ state: 'detached' });
    await eventually('the row shows the new limit', async () => assert.match(await quotaText('requests_day'), /^0 \/ 4\b/));
    assert.match(await quotaText('tokens_month'), /^0 \/ 50,000\b/);
    await page.locator('#flash', { hasText: `Saved the limits of “${keyName}”.` }).waitFor();
    await assertNoReload('editing limits');
  });

  await step('the bars move with proxied requests', async () => {
    for (let i = 0; i < 3; i++) {
      const r = await proxied(plaintext);
      assert.equal(r.status, 200, r.body);
    }
    await page.getByRole('button', { name: 'Refresh usage' }).click();
    await eventually('requests bar at 3 / 4', async () => assert.match(await quotaText('requests_day'), /^3 \/ 4 75 %/));
    assert.equal(await fillOf('requests_day').getAttribute('class'), 'fill warn', '75 % is orange');
    assert.equal(parseFloat(await fillOf('requests_day').getAttribute('width')), 75);
    assert.equal(await fillOf('tokens_day').getAttribute('class'), 'fill ok');
    assert.ok(parseFloat(await fillOf('tokens_day').getAttribute('width')) > 0, 'tokens were counted');
    await page.screenshot({ path: shot('keys'), fullPage: true });

    const fourth = await proxied(plaintext);
    assert.equal(fourth.status, 200, fourth.body);
    const fifth = await proxied(plaintext);
    assert.equal(fifth.status, 429, `the 5th request passes the limit of 4: ${fifth.body}`);
    await page.getByRole('button', { name: 'Refresh usage' }).click();
    await eventually('requests bar full and red', async () => assert.equal(await fillOf('requests_day').getAttribute('class'), 'fill over'));
    assert.match(await quotaText('requests_day'), /^4 \/ 4 100 %/);
    await assertNoReload('refreshing usage');

    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: shot('keys-phone'), fullPage: true });
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the keys page scrolls sideways on a phone (${overflow}px)`);
    await page.setViewportSize({ width: 1440, height: 900 });
  });

  await step('usage page with SVG charts', async () => {
    await page.getByRole('link', { name: 'Usage' }).click();
    await page.locator('#usage-key').selectOption({ label: `${keyName} (${plaintext.slice(0, 10)}…)` });
    await page.getByRole('button', { name: 'Show' }).click();
    await page.getByRole('heading', { name: `Tokens per day: ${keyName}` }).waitFor();
    // Per-model totals come from the flushed request log: wait for the flusher.
    await eventually('the model chart shows the model', async () => {
      if ((await page.locator('g.model-row').count()) === 0) {
        await page.reload();
      }
      assert.equal(await page.locator(`g.model-row[data-model="${model}"]`).count(), 1);
    });
    const today = await page.locator('#requests-chart-title').evaluate((t) => t.closest('svg').querySelector('g.day:last-of-type title').textContent);
    assert.match(today, /: 4 requests$/, today);
    assert.equal(await page.locator('svg.chart').count(), 3);
    await page.screenshot({ path: shot('usage'), fullPage: true });
    const download = page.waitForEvent('download');
    await page.getByRole('button', { name: 'Download CSV' }).click();
    const csv = await (await download).path();
    const text = (await import('node:fs')).readFileSync(csv, 'utf8');
    const lines = text.trim().split(/\r?\n/);
    assert.equal(lines[0], 'request_id,time,key,route,model,status,prompt_tokens,completion_tokens,duration_ms,outcome');
    assert.ok(lines.filter((l) => l.includes(`,${keyName},`)).length >= 4, text);
  });

  await step('settings: connection test and models', async () => {
    await page.getByRole('link', { name: 'Settings' }).click();
    await page.getByRole('button', { name: 'Test connection' }).click();
    await page.locator('#upstream-status', { hasText: '2 models' }).waitFor();
    const options = await page.getByLabel('Default model').locator('option').allInnerTexts();
    assert.deepEqual(options.sort(), ['llama3.2:latest', 'qwen3:8b']);
    await page.screenshot({ path: shot('settings'), fullPage: true });
    await page.getByRole('link', { name: 'Proxy info' }).click();
    await page.getByRole('heading', { name: 'openai-python' }).waitFor();
    assert.match(await page.locator('#snippet-openai').innerText(), new RegExp(`base_url="${proxy}/v1"`));
    await page.screenshot({ path: shot('proxy'), fullPage: true });
    await page.getByRole('link', { name: 'Keys' }).click();
    await keyRow().waitFor();
    await markPage();
  });

  await step('deactivate', async () => {
    await keyRow().getByRole('button', { name: `Deactivate ${keyName}` }).click();
    await keyRow().locator('.badge', { hasText: 'Inactive' }).waitFor();
    await page.locator('#flash', { hasText: 'deactivated' }).waitFor();
    assert.equal((await proxied(plaintext)).status, 403, 'a deactivated key is refused');
    await assertNoReload('deactivating');
  });

  await step('delete with confirmation', async () => {
    let asked = '';
    page.once('dialog', (d) => { asked = d.message(); d.dismiss(); });
    await keyRow().getByRole('button', { name: `Delete ${keyName}` }).click();
    await eventually('the confirmation was asked', async () => assert.match(asked, /Delete the key “e2e team”\?/));
    assert.equal(await keyRow().count(), 1, 'dismissing keeps the key');
    page.once('dialog', (d) => d.accept());
    await keyRow().getByRole('button', { name: `Delete ${keyName}` }).click();
    await keyRow().waitFor({ state: 'detached' });
    await page.locator('#flash', { hasText: `Key “${keyName}” deleted.` }).waitFor();
    assert.equal((await proxied(plaintext)).status, 401, 'a deleted key is unknown');
    await assertNoReload('deleting');
  });

  await step('log out', async () => {
    await page.getByRole('button', { name: 'Log out' }).click();
    await page.getByLabel('Admin password').waitFor();
    await page.goto(`${admin}/usage`);
    assert.match(page.url(), /\/login\?next=%2Fusage/);
  });

  await step('nothing external, no errors', async () => {
    assert.deepEqual(foreign, [], 'requests to other hosts');
    assert.deepEqual(problems.filter((p) => !expected(p)), [], 'console errors');
  });
  console.log('browser test passed');
} catch (e) {
  console.error(`FAILED at step "${current}": ${e.stack ?? e}`);
  await page.screenshot({ path: shot('failure'), fullPage: true }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
