// A storefront client generated from the gateway's OpenAPI document
// (openapi-typescript types + openapi-fetch), compiled with tsc and run
// against the live server by tests/contract/run.sh: a release, a claim, a
// purchase and each error status the document gives them; then a campaign
// (a profile, its terms on the claim, a purchase's discount, a cancellation,
// its early end). If the document
// and the server drift apart, this either stops compiling (a renamed field,
// a removed route) or fails here (an answer the types do not describe).
import createClient from "openapi-fetch";
import type { paths, components } from "./generated/api.js";

const base = process.env.CONTRACT_BASE ?? "http://127.0.0.1:8080";
const apiToken = process.env.COUPON_API_TOKEN ?? "";
const adminToken = process.env.COUPON_ADMIN_TOKEN ?? "";
const blacklisted = process.env.CONTRACT_BLACKLISTED_USER ?? "";

const storefront = createClient<paths>({ baseUrl: base, headers: { Authorization: `Bearer ${apiToken}` } });
const anonymous = createClient<paths>({ baseUrl: base });
const admin = createClient<paths>({ baseUrl: base, headers: { Authorization: `Bearer ${adminToken}` } });

let passed = 0;
let failed = 0;
function check(what: string, condition: boolean, detail?: unknown): void {
  if (condition) {
    passed++;
    console.log(`ok: ${what}`);
  } else {
    failed++;
    console.log(`FAILED: ${what}: ${JSON.stringify(detail)}`);
  }
}

const run = `${Date.now()}-${Math.floor(Math.random() * 1e6)}`;
const category = `ts-${run}`;
const user = `ts-user-${run}`;
const other = `ts-other-${run}`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// 401: the storefront token is required.
{
  const { error, response } = await anonymous.GET("/api/v1/coupon", { params: { query: { id: user } } });
  check("claim without a token is 401 unauthorized", response.status === 401 && error?.error === "unauthorized", error);
}
// 400: an id the document's pattern refuses.
{
  const { error, response } = await storefront.GET("/api/v1/coupon", { params: { query: { id: " padded" } } });
  check("claim with a padded id is 400 invalid_request", response.status === 400 && error?.error === "invalid_request", error);
}
// 202: an employee releases one coupon of a category of its own.
let released: components["schemas"]["CouponBatch"] | undefined;
{
  const { data, error, response } = await admin.POST("/api/v1/coupon", { body: { id: "ts-employee", category, count: 1 } });
  check("release is 202 with one code", response.status === 202 && data?.codes.length === 1, error);
  released = data;
}
// 200: claim it (once the projector has stored it: 404 sold_out until then).
let code = "";
for (let attempt = 0; attempt < 60 && !code; attempt++) {
  const { data, error, response } = await storefront.GET("/api/v1/coupon", { params: { query: { id: user, category } } });
  if (response.status === 200 && data) {
    code = data.coupon_code;
    check("claim is 200 with the released code", data.coupon_code === released?.codes[0] && data.user_id === user && data.category === category, data);
  } else if (response.status === 404 && error?.error === "sold_out") {
    await sleep(500);
  } else {
    check("claim is 200", false, { status: response.status, error });
    break;
  }
}
check("a claim was granted", code !== "", code);
// 404 sold_out: the category's only coupon is held.
{
  const { error, response } = await storefront.GET("/api/v1/coupon", { params: { query: { id: other, category } } });
  check("claim of an empty category is 404 sold_out", response.status === 404 && error?.error === "sold_out", error);
}
// 409 not_holder: another user cannot buy it.
{
  const { error, response } = await storefront.POST("/api/v1/purchase", { body: { user_id: other, coupon_code: code, order_id: `ts-o1-${run}` } });
  check("purchase by another user is 409 not_holder", response.status === 409 && error?.error === "not_holder", error);
}
// 200 redeemed.
{
  const { data, error, response } = await storefront.POST("/api/v1/purchase", { body: { user_id: user, coupon_code: code, order_id: `ts-o2-${run}` } });
  check("purchase by the holder is 200 redeemed", response.status === 200 && data?.status === "redeemed" && data.coupon_code === code, error);
}
// 409 already_redeemed.
{
  const { error, response } = await storefront.POST("/api/v1/purchase", { body: { user_id: user, coupon_code: code, order_id: `ts-o3-${run}` } });
  check("a second order is 409 already_redeemed", response.status === 409 && error?.error === "already_redeemed", error);
}
// 404 unknown_coupon.
{
  const { error, response } = await storefront.POST("/api/v1/purchase", { body: { user_id: user, coupon_code: "7ZZZZZZZZZZZZ", order_id: `ts-o4-${run}` } });
  check("purchase of an unknown code is 404 unknown_coupon", response.status === 404 && error?.error === "unknown_coupon", error);
}
// 400: an empty order id.
{
  const { error, response } = await storefront.POST("/api/v1/purchase", { body: { user_id: user, coupon_code: code, order_id: "" } });
  check("purchase with an empty order_id is 400 invalid_request", response.status === 400 && error?.error === "invalid_request", error);
}
// 429 rate_limited with Retry-After: one coupon per user per quota window.
{
  const { error, response } = await storefront.GET("/api/v1/coupon", { params: { query: { id: user } } });
  check(
    "a second claim in the window is 429 rate_limited with Retry-After",
    response.status === 429 && error?.error === "rate_limited" && Number(response.headers.get("retry-after")) > 0,
    { status: response.status, error },
  );
}
// 403 blacklisted (run.sh blacklists this user before starting the client).
if (blacklisted) {
  const { error, response } = await storefront.GET("/api/v1/coupon", { params: { query: { id: blacklisted } } });
  check("a blacklisted user's claim is 403 blacklisted", response.status === 403 && error?.error === "blacklisted", error);
}
// The status route: 200 redeemed, 400 for a string that is no code.
{
  const { data, error, response } = await storefront.GET("/api/v1/coupon/{code}", { params: { path: { code } } });
  check("status of the coupon is 200 redeemed", response.status === 200 && data?.status === "redeemed" && data.holder === null, error);
  const bad = await storefront.GET("/api/v1/coupon/{code}", { params: { path: { code: "not-a-code" } } });
  check("status of a non-code is 400 invalid_request", bad.response.status === 400 && bad.error?.error === "invalid_request", bad.error);
}
// 401 on the admin route with the storefront token.
{
  const { error, response } = await storefront.POST("/api/v1/coupon", { body: { id: "ts-employee", category } });
  check("release with the storefront token is 401 unauthorized", response.status === 401 && error?.error === "unauthorized", error);
}

// Campaigns (issue #28): a profile, a campaign with a discount, a minimum
// order and eligibility, its claim's terms, a purchase that meets them, a
// cancellation, and the campaign's early end.
const adult = `ts-adult-${run}`;
const stranger = `ts-stranger-${run}`;
const campaignCategory = `ts-campaign-${run}`;
{
  const { response } = await storefront.PUT("/api/v1/users/{id}", {
    params: { path: { id: adult } },
    body: { name: "Ada", dob: "1990-05-17", location: "DE" },
  });
  check("a profile is 202 accepted", response.status === 202, response.status);
  const bad = await storefront.PUT("/api/v1/users/{id}", {
    params: { path: { id: adult } },
    body: { name: "Ada", dob: "2999-01-01", location: "DE" },
  });
  check("a dob in the future is 422 invalid_profile", bad.response.status === 422 && bad.error?.error === "invalid_profile", bad.error);
}
let campaignId = "";
{
  const validUntil = new Date(Date.now() + 86_400_000).toISOString();
  const { data, error, response } = await admin.POST("/api/v1/coupon", {
    body: {
      id: "ts-employee",
      category: campaignCategory,
      count: 2,
      campaign: "ts winter sale",
      discount: { percent_off: 10 },
      min_order: { amount: 1000, currency: "EUR" },
      valid_until: validUntil,
      locations: ["DE"],
      min_age: 18,
    },
  });
  check("a campaign's release is 202", response.status === 202 && data?.codes.length === 2, error);
  campaignId = data?.batch_id ?? "";
}
let campaignCode = "";
for (let attempt = 0; attempt < 60 && !campaignCode; attempt++) {
  // 404 sold_out until the coupons and the profile are projected.
  const { data, response } = await storefront.GET("/api/v1/coupon", { params: { query: { id: adult, category: campaignCategory } } });
  if (response.status === 200 && data) {
    campaignCode = data.coupon_code;
    check(
      "an eligible user's claim shows the campaign's terms",
      data.campaign === "ts winter sale" && data.discount !== undefined && data.valid_until !== undefined,
      data,
    );
  } else {
    await sleep(500);
  }
}
check("the eligible user was granted a campaign coupon", campaignCode !== "", campaignCode);
{
  const { error, response } = await storefront.GET("/api/v1/coupon", { params: { query: { id: stranger, category: campaignCategory } } });
  check("a user without a profile is not granted the other coupon (404 sold_out)", response.status === 404 && error?.error === "sold_out", error);
}
const campaignOrder = `ts-campaign-order-${run}`;
{
  const { error, response } = await storefront.POST("/api/v1/purchase", {
    body: { user_id: adult, coupon_code: campaignCode, order_id: `ts-small-${run}`, order_total: { amount: 500, currency: "EUR" } },
  });
  check("an order below the minimum is 409 order_below_minimum", response.status === 409 && error?.error === "order_below_minimum", error);
  const bought = await storefront.POST("/api/v1/purchase", {
    body: { user_id: adult, coupon_code: campaignCode, order_id: campaignOrder, order_total: { amount: 2500, currency: "EUR" } },
  });
  check(
    "an order meeting the minimum is 200 with 10% off",
    bought.response.status === 200 && bought.data?.discount_amount?.amount === 250 && bought.data?.discount_amount?.currency === "EUR",
    bought.data ?? bought.error,
  );
}
{
  const first = await storefront.POST("/api/v1/purchase/{order_id}/cancel", { params: { path: { order_id: campaignOrder } } });
  const again = await storefront.POST("/api/v1/purchase/{order_id}/cancel", { params: { path: { order_id: campaignOrder } } });
  check(
    "a cancellation is 200 cancelled, and so is its repeat",
    first.response.status === 200 && first.data?.status === "cancelled" && again.response.status === 200 && again.data?.status === "cancelled",
    { first: first.data ?? first.error, again: again.data ?? again.error },
  );
  const unknown = await storefront.POST("/api/v1/purchase/{order_id}/cancel", { params: { path: { order_id: `ts-none-${run}` } } });
  check("cancelling an unknown order is 404 unknown_order", unknown.response.status === 404 && unknown.error?.error === "unknown_order", unknown.error);
}
{
  const ended = await admin.DELETE("/api/v1/campaigns/{id}", { params: { path: { id: campaignId } } });
  const again = await admin.DELETE("/api/v1/campaigns/{id}", { params: { path: { id: campaignId } } });
  check(
    "ending the campaign is 200 ended, and a repeat answers the same end",
    ended.response.status === 200 && ended.data?.status === "ended" && again.data?.ended_at === ended.data?.ended_at,
    { ended: ended.data ?? ended.error, again: again.data ?? again.error },
  );
  const unknown = await admin.DELETE("/api/v1/campaigns/{id}", { params: { path: { id: "00000000-0000-4000-8000-000000000000" } } });
  check("ending an unknown campaign is 404 unknown_campaign", unknown.response.status === 404 && unknown.error?.error === "unknown_campaign", unknown.error);
  const { error, response } = await storefront.GET("/api/v1/coupon", { params: { query: { id: `ts-late-${run}`, category: campaignCategory } } });
  check("after its end, the campaign's coupons are not granted (404 sold_out)", response.status === 404 && error?.error === "sold_out", error);
}

console.log(`typescript client: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
