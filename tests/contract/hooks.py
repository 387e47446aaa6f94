"""schemathesis hooks for tests/contract/run.sh.

Three ids are state the document cannot describe in a schema: a request id
(`x-request-id`) or an order id already used by another user is refused
(`409 request_id_conflict` / `order_id_conflict`, documented), and an
`Idempotency-Key` already used for another release is `422
idempotency_key_reused` (documented). Generated values, and the document's examples, repeat
across users (`"0"`, `"order-1"`...), so before each call a valid one is
replaced by a fresh UUID; invalid ones (negative cases) are sent as
generated.
"""
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
