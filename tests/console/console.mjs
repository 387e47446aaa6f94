// The console in Debian's chromium, driven by playwright-core (run by
// tests/console/run.sh, which starts the server and sets the environment).
//
// Every number read off the page is compared with Postgres (psql on the
// run's database) or with /metrics; a disagreement that persists past a
// short deadline (the page refreshes every few seconds, the history sink
// and the gauges trail by a second or so) is a failure.
import { createRequire } from "node:module";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (run tests/console/run.sh)`);
  return value;
};
const BASE = env("CONSOLE_BASE");
const ADMIN = env("COUPON_ADMIN_TOKEN");
const API = env("COUPON_API_TOKEN");
const DATABASE_URL = env("DATABASE_URL");
const SHOTS = env("CONSOLE_SCREENSHOTS");
const CATEGORY = env("CONSOLE_CATEGORY");
const require = createRequire(path.join(env("CONSOLE_TOOLS"), "node_modules", "x.js"));
const { chromium } = require("playwright-core");

let passed = 0;
let failed = 0;
const failures = [];
function ok(what) { passed += 1; console.log(`ok: ${what}`); }
function bad(what, detail) { failed += 1; failures.push(what); console.log(`FAILED: ${what}: ${detail}`); }

function sql(query, ...params) {
  // Values go in as psql variables, quoted by psql (:'name').
  const args = ["-XAt", "-v", "ON_ERROR_STOP=1", DATABASE_URL];
  params.forEach((p, i) => args.push("-v", `p${i + 1}=${p}`));
  return execFileSync("psql", args, { input: query, encoding: "utf8" }).trim();
}
const sqlNumber = (query, ...params) => Number(sql(query, ...params) || 0);

async function metrics() {
  const text = await (await fetch(`${BASE}/metrics`)).text();
  const samples = [];
  for (const line of text.split("\n")) {
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m || line.startsWith("#")) continue;
    const labels = Object.fromEntries([...(m[2] || "").matchAll(/([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g)].map((l) => [l[1], l[2]]));
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return (name, filter = () => true) => samples.filter((s) => s.name === name && filter(s.labels)).reduce((a, s) => a + s.value, 0);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const number = (text) => Number(String(text).replace(/[^0-9.-]/g, ""));

// Compares `shown()` with `truth()` until they agree or `ms` pass; the last
// pair is reported on failure.
async function agree(what, shown, truth, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const [a, b] = [await shown(), await truth()];
      last = [a, b];
      if (JSON.stringify(a) === JSON.stringify(b)) { ok(`${what}: ${JSON.stringify(a)}`); return true; }
    } catch (error) { last = [`error: ${error.message}`]; }
    if (Date.now() > deadline) { bad(what, `page ${JSON.stringify(last[0])} vs ${JSON.stringify(last[1])}`); return false; }
    await sleep(500);
  }
}

async function storefront(method, route, body) {
  const response = await fetch(`${BASE}${route}`, {
    method,
    headers: { Authorization: `Bearer ${API}`, "content-type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: response.status, body: await response.json().catch(() => null) };
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(error.message));
  page.on("console", (message) => { if (message.type() === "error") pageErrors.push(message.text()); });
  const cell = (selector) => page.locator(selector).first().textContent({ timeout: 5000 }).then(number);

  try {
    // --- sign in: a wrong token is refused, the right one kept for the tab.
    await page.goto(`${BASE}/console`);
    await page.fill("#token", "not-the-token");
    await page.click("#login-form button");
    await page.waitForFunction(() => document.querySelector("#login-error").textContent.length > 0);
    (await page.isVisible("#nav")) ? bad("a wrong token is refused", "signed in") : ok("a wrong token is refused");
    pageErrors.length = 0; // the refused token's 401, logged by the browser
    await page.fill("#token", ADMIN);
    await page.screenshot({ path: path.join(SHOTS, "login.png") });
    await page.click("#login-form button");
    await page.waitForSelector("#nav", { state: "visible" });
    const kept = await page.evaluate(() => sessionStorage.getItem("couponAdminToken"));
    kept === ADMIN ? ok("the token is kept in sessionStorage") : bad("the token is kept in sessionStorage", kept);

    // --- employees: release a batch and follow it until it is projected.
    const count = 240;
    await page.fill("#release-employee", "console-e1");
    await page.fill("#release-category", CATEGORY);
    await page.fill("#release-count", String(count));
    await page.click("#release-button");
    await page.waitForSelector('#release-status[data-done="true"]', { timeout: 120000 });
    const batchId = (await page.textContent("#release-batch")).trim();
    await agree("the release's progress shows every coupon projected",
      () => cell("#release-projected"),
      () => sqlNumber("SELECT count(*) FROM coupons WHERE batch_id = :'p1'", batchId));
    const projected = sqlNumber("SELECT count(*) FROM coupons WHERE batch_id = :'p1'", batchId);
    projected === count ? ok(`the database has the ${count} coupons of the batch`) : bad("the batch is projected", `${projected} of ${count}`);
    // The page sent the release with an Idempotency-Key (a retried click completes it, never doubles it).
    const keyed = sql("SELECT idempotency_key FROM releases WHERE batch_id = :'p1'", batchId);
    keyed.startsWith("console-") ? ok("the release carried an Idempotency-Key") : bad("the release carried an Idempotency-Key", `stored key ${JSON.stringify(keyed)}`);
    // The pool grows to the batch's size.
    const poolRow = `#pool-table tr[data-category="${CATEGORY}"]`;
    await agree(`the pool of ${CATEGORY} shows ${count} available`, () => cell(`${poolRow} [data-field="available"]`), () => count, 15000);

    // Claims and purchases, for the other numbers: some bought, some left to expire.
    const users = Array.from({ length: 12 }, (_, i) => `console-user-${i}`);
    const granted = [];
    for (const user of users) {
      const answer = await storefront("GET", `/api/v1/coupon?id=${user}&category=${CATEGORY}`);
      if (answer.status === 200) granted.push(answer.body);
    }
    granted.length === users.length ? ok(`${users.length} claims granted`) : bad("claims granted", `${granted.length} of ${users.length}`);
    for (const grant of granted.slice(0, 5)) {
      await storefront("POST", "/api/v1/purchase", { user_id: grant.user_id, coupon_code: grant.coupon_code, order_id: `order-${grant.user_id}` });
    }
    // The same user again: rate limited (the quota is used).
    await storefront("GET", `/api/v1/coupon?id=${users[0]}&category=${CATEGORY}`);

    // --- blacklist: add from the form, check Postgres, then a claim is refused.
    await page.fill("#blacklist-user", "console-mallory");
    await page.fill("#blacklist-reason", "chargeback fraud");
    await page.fill("#blacklist-hours", "2");
    await page.click("#blacklist-form button");
    await page.waitForSelector('#blacklist-table tr[data-user="console-mallory"]');
    const row = sql("SELECT blacklisted, blacklist_reason, round(extract(epoch FROM blacklisted_until - now()) / 60) FROM users WHERE user_id = 'console-mallory'");
    const [listed, reason, minutes] = row.split("|");
    listed === "t" && reason === "chargeback fraud" && Math.abs(Number(minutes) - 120) <= 1
      ? ok(`the blacklist entry is in Postgres (${row})`) : bad("the blacklist entry is in Postgres", row);
    const refused = await storefront("GET", `/api/v1/coupon?id=console-mallory&category=${CATEGORY}`);
    refused.status === 403 ? ok("the blacklisted user's claim is refused (403)") : bad("the blacklisted user's claim is refused", refused.status);
    // Another entry, lifted with its Remove button.
    await page.fill("#blacklist-user", "console-trent");
    await page.fill("#blacklist-reason", "mistake");
    await page.fill("#blacklist-hours", "");
    await page.click("#blacklist-form button");
    await page.click('#blacklist-table tr[data-user="console-trent"] button');
    await page.waitForSelector('#blacklist-table tr[data-user="console-trent"]', { state: "detached" });
    await agree("a removed entry is lifted in Postgres",
      async () => "lifted",
      () => (sql("SELECT blacklisted FROM users WHERE user_id = 'console-trent'") === "f" ? "lifted" : "still listed"));
    await agree("the blacklist shown is the one in Postgres",
      () => page.$$eval("#blacklist-table tbody tr", (rows) => rows.map((r) => r.dataset.user)),
      () => sql("SELECT user_id FROM users WHERE blacklisted AND (blacklisted_until IS NULL OR blacklisted_until > now()) ORDER BY user_id").split("\n").filter(Boolean));

    // --- campaigns: one created from the form, with terms and eligibility;
    // claims, a purchase with its discount and a cancelled order on it; then
    // ended early from its row. The row's numbers are Postgres's throughout.
    const SALE = `${CATEGORY}-sale`;
    for (const [user, location] of [["console-de-1", "DE"], ["console-de-2", "DE"], ["console-us-1", "US"]]) {
      const put = await storefront("PUT", `/api/v1/users/${user}`, { name: user, dob: "1990-01-01", location });
      if (put.status !== 202) bad(`the profile of ${user} is accepted`, JSON.stringify(put));
    }
    await agree("the three profiles are projected", async () => 3,
      () => sqlNumber("SELECT count(*) FROM users WHERE user_id IN ('console-de-1', 'console-de-2', 'console-us-1') AND location IS NOT NULL"));
    await page.click('#nav a[data-page="campaigns"]');
    await page.waitForSelector("#page-campaigns[data-loaded]");
    const saleUntil = new Date(Date.now() + 3600000).toISOString().slice(0, 19);
    await page.fill("#campaign-employee", "console-e1");
    await page.fill("#campaign-category", SALE);
    await page.fill("#campaign-count", "20");
    await page.fill("#campaign-name", "Console sale");
    await page.selectOption("#campaign-discount-kind", "percent");
    await page.fill("#campaign-discount-value", "10");
    await page.fill("#campaign-min-amount", "5000");
    await page.fill("#campaign-min-currency", "eur");
    await page.fill("#campaign-until", saleUntil);
    await page.fill("#campaign-locations", "DE, FR");
    await page.fill("#campaign-min-age", "18");
    await page.click("#campaign-button");
    await page.waitForSelector('#campaign-status[data-done="true"]', { timeout: 120000 });
    const sale = (await page.textContent("#campaign-batch")).trim();
    const stored = sql(`SELECT name, percent_off, min_order_amount, min_order_currency, array_to_string(locations, ','), min_age,
                               to_char(valid_until AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
                          FROM campaigns WHERE batch_id = :'p1'`, sale);
    stored === `Console sale|10|5000|EUR|DE,FR|18|${saleUntil}`
      ? ok(`the campaign's terms are in Postgres (${stored})`) : bad("the campaign's terms are in Postgres", stored);
    const outsider = await storefront("GET", `/api/v1/coupon?id=console-us-1&category=${SALE}`);
    outsider.status === 404 && outsider.body.error === "sold_out"
      ? ok("a user outside the campaign's locations gets none of it (404 sold_out)") : bad("an ineligible user is refused", JSON.stringify(outsider));
    const saleGrants = [];
    for (const user of ["console-de-1", "console-de-2"]) {
      const answer = await storefront("GET", `/api/v1/coupon?id=${user}&category=${SALE}`);
      if (answer.status === 200 && answer.body.campaign === "Console sale" && answer.body.discount.percent_off === 10) saleGrants.push(answer.body);
      else bad(`${user} is granted a coupon of the campaign with its terms`, JSON.stringify(answer));
    }
    const bought = await storefront("POST", "/api/v1/purchase", { user_id: "console-de-1", coupon_code: saleGrants[0].coupon_code,
      order_id: "console-sale-order", order_total: { amount: 6000, currency: "EUR" } });
    JSON.stringify(bought.body && bought.body.discount_amount) === JSON.stringify({ amount: 600, currency: "EUR" })
      ? ok("the purchase took 10% off the order (600 EUR minor units)") : bad("the purchase applies the discount", JSON.stringify(bought));
    const cancelled = await storefront("POST", "/api/v1/purchase/console-sale-order/cancel");
    cancelled.status === 200 ? ok("the order is cancelled") : bad("the order is cancelled", JSON.stringify(cancelled));
    const saleRow = `#campaigns-table tr[data-campaign="${sale}"]`;
    const CAMPAIGN_FIELDS = ["issued", "available", "held", "funnel-claimed", "funnel-redeemed", "funnel-released", "funnel-cancelled", "funnel-expired"];
    const campaignShown = () => page.$eval(saleRow, (r, fields) => fields.map((f) => {
      const c = r.querySelector(`[data-field="${f}"]`);
      return c ? Number(c.textContent.replace(/[^0-9]/g, "")) : null;
    }), CAMPAIGN_FIELDS);
    const campaignTruth = () => {
      const coupons = sql(`SELECT count(*), count(*) FILTER (WHERE status = 'available'), count(*) FILTER (WHERE status = 'held')
                             FROM coupons WHERE batch_id = :'p1'`, sale).split("|").map(Number);
      const funnel = sql(`SELECT count(*) FILTER (WHERE h.kind = 'granted'), count(*) FILTER (WHERE h.kind = 'redeemed'),
                                 count(*) FILTER (WHERE h.kind = 'released'), count(*) FILTER (WHERE h.kind = 'cancelled'),
                                 count(*) FILTER (WHERE h.kind = 'expired')
                            FROM coupon_history h JOIN coupons c ON c.code = h.coupon_code WHERE c.batch_id = :'p1'`, sale).split("|").map(Number);
      return [...coupons, ...funnel];
    };
    await agree("the campaign's row equals Postgres (coupons now, funnel from the history)", campaignShown, campaignTruth);
    const running = await campaignShown();
    // (The second hold may have ended unbought already: HOLD_TTL is short here.)
    const pick = (row) => [0, 3, 4, 6].map((i) => row[i]);
    JSON.stringify(pick(running)) === JSON.stringify([20, 2, 1, 1])
      ? ok(`the campaign shows 20 issued, 2 claimed, 1 redeemed, 1 cancelled (${JSON.stringify(running)})`) : bad("the campaign's funnel shows what the run did", JSON.stringify(running));
    (await page.getAttribute(saleRow, "data-phase")) === "running" ? ok("the campaign is running") : bad("the campaign is running", await page.getAttribute(saleRow, "data-phase"));
    await page.screenshot({ path: path.join(SHOTS, "campaigns.png"), fullPage: true });
    // End it early from its row (the page asks first).
    page.once("dialog", (dialog) => dialog.accept());
    await page.click(`${saleRow} button`);
    await page.waitForSelector(`${saleRow}[data-phase="ended"]`, { timeout: 15000 });
    const ended = sql("SELECT ended_at IS NOT NULL, ended_by FROM campaigns WHERE batch_id = :'p1'", sale);
    ended === "t|admin-token" ? ok("the early end is in Postgres, by the console's token") : bad("the early end is in Postgres", ended);
    const late = await storefront("GET", `/api/v1/coupon?id=console-de-3&category=${SALE}`);
    late.status === 404 ? ok("after the end nothing of the campaign is granted") : bad("after the end nothing is granted", JSON.stringify(late));
    // The pool expires at once; the hold keeps its deadline (HOLD_TTL) and then expires too.
    await agree("the ended campaign's coupons all expired", async () => 20,
      () => sqlNumber("SELECT count(*) FROM coupons WHERE batch_id = :'p1' AND status = 'expired'", sale), 60000);
    await agree("the ended campaign's row equals Postgres", campaignShown, campaignTruth);
    const over = await campaignShown();
    JSON.stringify([...over.slice(0, 5), ...over.slice(6)]) === JSON.stringify([20, 0, 0, 2, 1, 1, 20])
      ? ok(`the ended campaign shows its 20 coupons expired (${JSON.stringify(over)})`) : bad("the ended campaign's funnel", JSON.stringify(over));
    (await page.$(`${saleRow} button`)) === null ? ok("an ended campaign has no End button") : bad("an ended campaign has no End button", "a button");
    await page.click('#nav a[data-page="employees"]');

    // Wait for the holds not bought to expire (HOLD_TTL) so the funnel has all three steps.
    await agree("the unbought holds expired", async () => 0,
      () => sqlNumber("SELECT count(*) FROM coupons WHERE status = 'held'"), 60000);

    // The pool per category and status equals Postgres.
    await page.click("#batches-form button");
    await agree("the pool table equals Postgres",
      () => page.$$eval("#pool-table tbody tr", (rows) => rows.map((r) => [r.dataset.category,
        ...["available", "held", "redeemed", "expired", "issued"].map((f) => Number(r.querySelector(`[data-field="${f}"]`).textContent.replace(/[^0-9]/g, "")))])),
      () => {
        const rows = sql(`SELECT category, count(*) FILTER (WHERE status = 'available'), count(*) FILTER (WHERE status = 'held'),
                                 count(*) FILTER (WHERE status = 'redeemed'), count(*) FILTER (WHERE status = 'expired'), count(*)
                            FROM coupons GROUP BY category ORDER BY category`)
          .split("\n").filter(Boolean).map((l) => l.split("|").map((v, i) => (i ? Number(v) : v)));
        const total = rows.reduce((t, r) => t.map((v, i) => (i ? v + r[i] : v)), ["all", 0, 0, 0, 0, 0]);
        return [...rows, total];
      });
    await agree("the recent batches equal Postgres",
      () => page.$$eval("#batches-table tbody tr", (rows) => rows.map((r) => [r.dataset.batch, Number(r.querySelector('[data-field="projected"]').textContent.replace(/[^0-9]/g, ""))])),
      () => sql("SELECT batch_id, count(*) FROM coupons GROUP BY batch_id ORDER BY min(generated_at) DESC, batch_id LIMIT 20")
        .split("\n").filter(Boolean).map((l) => { const [b, n] = l.split("|"); return [b, Number(n)]; }));
    await page.screenshot({ path: path.join(SHOTS, "employees.png"), fullPage: true });

    // --- analysts: the charts' numbers are the history's.
    await page.click('#nav a[data-page="analysts"]');
    await page.click('[data-range="3600"]');
    await page.waitForSelector("#page-analysts[data-loaded]");
    const range = async () => (await page.getAttribute("#page-analysts", "data-loaded")).split("-").map(Number);
    const claimTruth = async () => {
      const [since, until] = await range();
      const rows = sql(`SELECT CASE WHEN kind = 'granted' THEN 'granted'
                                    WHEN detail->>'reason' IN ('sold_out', 'rate_limited', 'blacklisted') THEN detail->>'reason'
                                    ELSE 'other' END, count(*)
                          FROM coupon_history
                         WHERE occurred_at >= to_timestamp(:'p1') AND occurred_at <= to_timestamp(:'p2')
                           AND (kind = 'granted' OR (kind = 'rejected' AND detail ? 'reason'))
                         GROUP BY 1`, since, until);
      const counts = Object.fromEntries(["granted", "sold_out", "rate_limited", "blacklisted", "other"].map((o) => [o, 0]));
      for (const line of rows.split("\n").filter(Boolean)) { const [o, n] = line.split("|"); counts[o] = Number(n); }
      return counts;
    };
    const claimShown = async () => {
      await page.click("#range-form button[type=submit]");
      await page.waitForTimeout(300);
      return Object.fromEntries(await page.$$eval("#claims-totals tbody tr", (rows) => rows.map((r) => [r.dataset.outcome, Number(r.querySelector("[data-field=total]").textContent.replace(/[^0-9]/g, ""))])));
    };
    await agree("claims by outcome equal the history in Postgres", claimShown, claimTruth);
    const shownClaims = await claimShown();
    shownClaims.granted >= granted.length && shownClaims.blacklisted >= 1 && shownClaims.rate_limited >= 1
      ? ok(`the claims chart has grants, a rate limit and a blacklisting (${JSON.stringify(shownClaims)})`)
      : bad("the claims chart has what the run did", JSON.stringify(shownClaims));
    const bars = await page.locator("#claims-chart svg rect").count();
    bars > 0 ? ok(`the claims chart draws ${bars} bars`) : bad("the claims chart draws bars", bars);
    const funnelTruth = async () => {
      const [since, until] = await range();
      return sql(`SELECT c.category, count(*) FILTER (WHERE h.kind = 'granted'), count(*) FILTER (WHERE h.kind = 'redeemed'),
                         count(*) FILTER (WHERE h.kind = 'released'), count(*) FILTER (WHERE h.kind = 'cancelled'),
                         count(*) FILTER (WHERE h.kind = 'expired')
                    FROM coupon_history h JOIN coupons c ON c.code = h.coupon_code
                   WHERE h.occurred_at >= to_timestamp(:'p1') AND h.occurred_at <= to_timestamp(:'p2')
                     AND h.kind IN ('granted', 'redeemed', 'released', 'cancelled', 'expired')
                   GROUP BY c.category ORDER BY c.category`, since, until)
        .split("\n").filter(Boolean).map((l) => l.split("|").map((v, i) => (i ? Number(v) : v)));
    };
    const funnelShown = async () => {
      await page.click("#range-form button[type=submit]");
      await page.waitForTimeout(300);
      return page.$$eval("#funnel-category tbody tr", (rows) => rows.map((r) => [r.dataset.category,
        ...["granted", "redeemed", "released", "cancelled", "expired"].map((f) => Number(r.querySelector(`[data-field="${f}"]`).textContent.replace(/[^0-9]/g, "")))]));
    };
    await agree("the funnel per category equals the history in Postgres", funnelShown, funnelTruth);
    const mine = (await funnelShown()).find((r) => r[0] === CATEGORY) || [];
    mine[1] === granted.length && mine[2] === 5 && mine[3] === granted.length - 5
      ? ok(`the funnel of ${CATEGORY}: ${mine[1]} granted → ${mine[2]} redeemed / ${mine[3]} released`)
      : bad("the funnel shows the run's grants, purchases and expirations", JSON.stringify(mine));
    await agree("the funnel per batch equals the history in Postgres",
      () => page.$$eval("#funnel-batch tbody tr", (rows) => rows.map((r) => [r.dataset.batch,
        ...["granted", "redeemed", "released", "cancelled", "expired"].map((f) => Number(r.querySelector(`[data-field="${f}"]`).textContent.replace(/[^0-9]/g, "")))])),
      async () => {
        const [since, until] = await range();
        return sql(`SELECT c.batch_id, count(*) FILTER (WHERE h.kind = 'granted'), count(*) FILTER (WHERE h.kind = 'redeemed'),
                           count(*) FILTER (WHERE h.kind = 'released'), count(*) FILTER (WHERE h.kind = 'cancelled'),
                           count(*) FILTER (WHERE h.kind = 'expired')
                      FROM coupon_history h JOIN coupons c ON c.code = h.coupon_code
                     WHERE h.occurred_at >= to_timestamp(:'p1') AND h.occurred_at <= to_timestamp(:'p2')
                       AND h.kind IN ('granted', 'redeemed', 'released', 'cancelled', 'expired')
                     GROUP BY c.batch_id, c.employee_id, c.category ORDER BY c.category, min(c.generated_at), c.batch_id`, since, until)
          .split("\n").filter(Boolean).map((l) => l.split("|").map((v, i) => (i ? Number(v) : v)));
      });
    await page.screenshot({ path: path.join(SHOTS, "analysts.png"), fullPage: true });

    // Downloads of the range: JSON lines and Parquet.
    for (const [button, format] of [["#download-jsonl", "jsonl"], ["#download-parquet", "parquet"]]) {
      const [download] = await Promise.all([page.waitForEvent("download", { timeout: 60000 }), page.click(button)]);
      const file = await download.path();
      const bytes = readFileSync(file);
      if (format === "jsonl") {
        const lines = bytes.toString("utf8").split("\n").filter(Boolean).map((l) => JSON.parse(l));
        const created = lines.filter((l) => l.payload && l.payload.batch_id === batchId).length;
        created > 0 && lines.length > granted.length
          ? ok(`the JSON lines download has ${lines.length} records, with the batch's creation`)
          : bad("the JSON lines download", `${lines.length} records, ${created} of the batch`);
      } else {
        const magic = bytes.subarray(0, 4).toString() === "PAR1" && bytes.subarray(-4).toString() === "PAR1";
        magic && bytes.length > 100 ? ok(`the Parquet download is a Parquet file (${bytes.length} bytes)`) : bad("the Parquet download", `${bytes.length} bytes`);
      }
    }

    // --- operators: the live numbers are /metrics'.
    await page.click('#nav a[data-page="operators"]');
    await page.waitForFunction(() => Number(document.querySelector("#page-operators").dataset.scrapes || 0) >= 2);
    for (const name of ["coupon_holds_active", "coupon_holds_overdue", "coupon_consumer_lag", "coupon_dead_letters_total"]) {
      await agree(`${name} equals /metrics`, () => cell(`[data-metric="${name}"]`), async () => (await metrics())(name), 15000);
    }
    await agree("HTTP 5xx equals /metrics", () => cell('[data-metric="http_5xx"]'),
      async () => (await metrics())("coupon_http_requests_total", (l) => /^5/.test(l.status || "")), 15000);
    await agree("claim decisions by outcome equal /metrics",
      () => page.$$eval("#ops-decisions tbody tr", (rows) => Object.fromEntries(rows.map((r) => [r.dataset.outcome, Number(r.querySelector("[data-field=decisions]").textContent.replace(/[^0-9]/g, ""))]))),
      async () => {
        const m = await metrics();
        return Object.fromEntries(["blacklisted", "granted", "rate_limited", "sold_out"].map((o) => [o, m("coupon_claim_decisions_total", (l) => l.outcome === o)]));
      }, 15000);
    const decided = sqlNumber("SELECT count(*) FROM claim_decisions WHERE outcome = 'granted'");
    await agree("granted decisions on /metrics equal claim_decisions in Postgres",
      async () => (await metrics())("coupon_claim_decisions_total", (l) => l.outcome === "granted"), () => decided);
    await agree("consumer lag by group equals /metrics",
      () => page.$$eval("#ops-lag tbody tr", (rows) => rows.map((r) => [r.dataset.group, Number(r.querySelector("[data-field=lag]").textContent.replace(/[^0-9]/g, ""))])),
      async () => {
        const text = await (await fetch(`${BASE}/metrics`)).text();
        const groups = {};
        for (const m of text.matchAll(/^coupon_consumer_lag\{([^}]*)\}\s+(\S+)/gm)) {
          const g = (m[1].match(/group="([^"]*)"/) || [])[1];
          groups[g] = (groups[g] || 0) + Number(m[2]);
        }
        return Object.keys(groups).sort().map((g) => [g, groups[g]]);
      }, 15000);
    // Claims for a few scrapes, so that the rate and latency tiles and charts move.
    let traffic = true;
    const load = (async () => {
      for (let i = 0; traffic; i++) {
        await storefront("GET", `/api/v1/coupon?id=console-late-${i}&category=${CATEGORY}`);
        await sleep(50);
      }
    })();
    const scrapes = Number(await page.getAttribute("#page-operators", "data-scrapes"));
    await page.waitForFunction((n) => Number(document.querySelector("#page-operators").dataset.scrapes) >= n + 4, scrapes, { timeout: 30000 });
    const latency = await page.textContent("#ops-latency-mean");
    /\d+(\.\d+)? ms/.test(latency) ? ok(`the latency tile shows ${latency}`) : bad("the latency tile shows a latency", latency);
    const rate = Number(await page.textContent("#ops-claims-rate"));
    rate > 0 ? ok(`the rate tile shows ${rate} claims/s under load`) : bad("the rate tile shows claims/s under load", rate);
    await page.screenshot({ path: path.join(SHOTS, "operators.png"), fullPage: true });
    traffic = false;
    await load;

    pageErrors.length === 0 ? ok("no error in the page's console") : bad("no error in the page's console", pageErrors.join("; "));
  } catch (error) {
    bad("the browser run", error.stack || error.message);
    await page.screenshot({ path: path.join(SHOTS, "failure.png"), fullPage: true }).catch(() => {});
  } finally {
    await browser.close();
  }
}

await main().catch((error) => bad("the console test", error.stack || error.message));
for (const f of failures) console.log(`failed: ${f}`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
