"""schemathesis hooks for tests/contract/run.sh.

Three ids are state the document cannot describe in a schema: a request id
(`x-request-id`) or an order id already used by another user is refused
(`409 request_id_conflict` / `order_id_conflict`, documented), and an
`Idempotency-Key` already used for another release is `422
idempotency_key_reused` (documented). Generated values, and the document's examples, repeat
across users (`"0"`, `"order-1"`...), so before each call a valid one is
replaced by a fresh UUID; invalid ones (negative cases) are sent as
generated.

A profile's date of birth lies between 1900 and today: a schema-valid date
outside is moved inside (`keep_profile_rules`).

A release's campaign has rules between its fields and with the clock that a
schema cannot state either (`422 invalid_campaign`, documented): one
currency for the discount and the minimum order, a `valid_until` after
`valid_from` and not passed yet. A body that is otherwise schema-valid is
made to keep them: the minimum takes the discount's currency, a window that
ends in the past or before it starts is moved to end a day after the later
of now and its start.
"""
import datetime
import re
import uuid

import schemathesis

REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,64}$")
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")


def valid_id(text):
    return (
        isinstance(text, str)
        and 0 < len(text) <= 128
        and text == text.strip()
        and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
    )


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers
    if headers and isinstance(headers.get("x-request-id"), str):
        if REQUEST_ID.match(headers["x-request-id"]):
            headers["x-request-id"] = str(uuid.uuid4())
    if headers and isinstance(headers.get("Idempotency-Key"), str):
        if IDEMPOTENCY_KEY.match(headers["Idempotency-Key"]):
            headers["Idempotency-Key"] = str(uuid.uuid4())
    body = case.body
    if isinstance(body, dict) and valid_id(body.get("order_id")):
        body["order_id"] = str(uuid.uuid4())
    if isinstance(body, dict) and case.path == "/api/v1/coupon" and case.method.upper() == "POST":
        keep_campaign_rules(body)
    if isinstance(body, dict) and case.path == "/api/v1/users/{id}" and case.method.upper() == "PUT":
        keep_profile_rules(body)


def keep_profile_rules(body):
    """A profile's `dob` is a date (the schema says so) between 1900-01-01
    and today (`422 invalid_profile`, documented; a schema cannot bound a
    date): a schema-valid date outside is moved inside."""
    dob = body.get("dob")
    if not isinstance(dob, str):
        return
    try:
        day = datetime.date.fromisoformat(dob)
    except ValueError:
        return
    today = datetime.datetime.now(datetime.timezone.utc).date()
    if day < datetime.date(1900, 1, 1) or day > today:
        body["dob"] = "1990-04-01"


def parse_time(text):
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None


def keep_campaign_rules(body):
    discount, minimum = body.get("discount"), body.get("min_order")
    if (
        isinstance(discount, dict)
        and isinstance(minimum, dict)
        and isinstance(discount.get("currency"), str)
        and isinstance(minimum.get("currency"), str)
    ):
        minimum["currency"] = discount["currency"]
    until, start = parse_time(body.get("valid_until")), parse_time(body.get("valid_from"))
    if until is None or until.tzinfo is None:
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    if start is not None and start.tzinfo is None:
        start = None
    # Margins: the server reads the times to the millisecond, a little later.
    margin = datetime.timedelta(milliseconds=2)
    if until > now + datetime.timedelta(minutes=1) and (start is None or until > start + margin):
        return
    latest = max(now, start) if start is not None else now
    if latest.year < 9999:
        body["valid_until"] = (latest + datetime.timedelta(days=1)).isoformat()
    else:
        body.pop("valid_from", None)
        body["valid_until"] = "2099-12-31T23:59:59Z"
