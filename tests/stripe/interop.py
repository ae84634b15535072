"""Drives the official `stripe` Python SDK against idemproxy; run by tests/stripe_sdk.rs.

    python interop.py API_BASE

API_BASE is idemproxy in front of a Stripe-shaped upstream, started with
`--error-format stripe --retry-hint-header Stripe-Should-Retry --on-conflict wait`. Each
scenario runs the SDK as an application would (stripe.Charge.create, max_network_retries = 3)
and records what the SDK saw: the charge it returned or the exception it raised, and how many
HTTP attempts it made. The result is printed as one JSON object on stdout; the Rust test checks
it against what the upstream executed. Nothing is asserted here.
"""

import json
import sys
import time

import stripe


class CountingClient(stripe.RequestsClient):
    """The SDK's default HTTP client, counting the HTTP attempts (retries included)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attempts = 0

    def request(self, method, url, headers, post_data=None):
        self.attempts += 1
        return super().request(method, url, headers, post_data)


def header(headers, name):
    """A response header, case-insensitively (the SDK hands over a requests CaseInsensitiveDict)."""
    if headers is None:
        return None
    return {k.lower(): v for k, v in dict(headers).items()}.get(name.lower())


def charge(key, timeout=10.0, **params):
    """Creates a charge with `key` through a fresh counting client with `timeout` (seconds)."""
    client = CountingClient(timeout=timeout)
    stripe.default_http_client = client
    started = time.monotonic()
    seen = {}
    try:
        created = stripe.Charge.create(currency="usd", idempotency_key=key, **params)
        headers = created.last_response.headers if created.last_response else None
        seen.update(id=created.id, amount=created.amount, replayed=header(headers, "Idempotent-Replayed"))
    except stripe.StripeError as err:
        error = err.error
        seen.update(
            exception=type(err).__name__,
            http_status=err.http_status,
            type=error.type if error else None,
            code=error.code if error else None,
            doc_url=error.doc_url if error else None,
            message=err.user_message,
            should_retry=header(err.headers, "Stripe-Should-Retry"),
            replayed=header(err.headers, "Idempotent-Replayed"),
        )
    seen.update(attempts=client.attempts, seconds=round(time.monotonic() - started, 3))
    return seen


def main():
    stripe.api_base = sys.argv[1]
    stripe.api_key = "sk_test_idemproxy_interop"
    stripe.max_network_retries = 3
    stripe.enable_telemetry = False
    seen = {"sdk_version": stripe.VERSION}
    # A charge, then the same call again: the replay, with the same charge.
    seen["create"] = charge("interop-create", amount=1000, description="create")
    seen["replay"] = charge("interop-create", amount=1000, description="create")
    # The upstream takes 1.5 s, the client gives up after 1 s and retries 0.5 s later: its
    # retry waits for the first execution (on_conflict = "wait") and gets its charge.
    seen["slow"] = charge("interop-slow", timeout=1.0, amount=1000, description="slow")
    # The same key with another amount: Stripe's idempotency error, raised at once.
    charge("interop-reuse", amount=1000, description="reuse")
    seen["reuse"] = charge("interop-reuse", amount=2000, description="reuse")
    # The upstream answers 500, which is recorded: Stripe-Should-Retry: false stops the SDK,
    # on the first answer and on the replay a later call gets.
    seen["fail"] = charge("interop-fail", amount=1000, description="fail")
    seen["fail_again"] = charge("interop-fail", amount=1000, description="fail")
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
