"""Rate budgets for unauthenticated routes, and the RateLimit-* headers that report them.

A budget is a sliding window (DRF's `SimpleRateThrottle`) over one key: the client's
address, or a hash of the credential in the request body. A route may spend several
budgets at once; a request passes only if every one of them has room, and the answer
reports the tightest (`RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`, the
IETF draft's names). A 429 also says `Retry-After`, in the envelope.

The windows live in Django's cache, so with the default local-memory cache each server
process counts on its own.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import APIView

BUDGETS_ATTRIBUTE = "_harmont_rate_budgets"


class RateBudget(SimpleRateThrottle):
    """A sliding window that records itself on the request, so the answer can say what is left."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.history: list[float] = []
        super().__init__()

    def allow_request(self, request: Request, view: APIView) -> bool:
        allowed = super().allow_request(request, view)
        if self.key is not None:  # a budget that doesn't apply to this request has no key
            budgets = getattr(request, BUDGETS_ATTRIBUTE, None)
            if budgets is None:
                budgets = []
                setattr(request, BUDGETS_ATTRIBUTE, budgets)
            budgets.append(self)
        return allowed

    def remaining(self) -> int:
        return max(self.num_requests - len(self.history), 0)

    def reset_seconds(self) -> int:
        """Seconds until the whole budget is back: the newest request leaves the window."""
        if not self.history:
            return 0
        return max(math.ceil(self.history[0] + self.duration - self.now), 0)

    def wait(self) -> float | None:
        """Seconds until one more request fits: the oldest request in the window leaves it."""
        if not self.history or len(self.history) < self.num_requests:
            return None
        return max(self.history[-1] + self.duration - self.now, 1)


class AddressBudget(RateBudget):
    """One budget per client address (REMOTE_ADDR, as the server in front reports it)."""

    def get_cache_key(self, request: Request, view: APIView) -> str | None:
        return self.cache_format % {"scope": self.scope, "ident": f"addr:{self.get_ident(request)}"}


class CredentialBudget(RateBudget):
    """One budget per credential the request carries (`view.throttled_credential(request)`).

    Only a hash of the credential goes into the cache key: the cache never holds a
    secret. A request without a usable credential spends none of this budget.
    """

    def get_cache_key(self, request: Request, view: APIView) -> str | None:
        credential = view.throttled_credential(request)  # type: ignore[attr-defined]
        if not credential:
            return None
        digest = hashlib.sha256(credential.encode()).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": f"{type(view).__name__}:{digest}"}


def rate_limit_headers(request: Request) -> dict[str, str]:
    """The tightest budget the request spent, as RateLimit-* headers (none if it spent none)."""
    budgets: list[RateBudget] = getattr(request, BUDGETS_ATTRIBUTE, None) or []
    if not budgets:
        return {}
    tightest = min(budgets, key=lambda b: (b.remaining(), -b.reset_seconds()))
    return {
        "RateLimit-Limit": str(tightest.num_requests),
        "RateLimit-Remaining": str(tightest.remaining()),
        "RateLimit-Reset": str(tightest.reset_seconds()),
    }


class RateLimitedView(APIView):
    """An APIView whose throttled answers, 429s included, carry the RateLimit-* headers."""

    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        for name, value in rate_limit_headers(request).items():
            response[name] = value
        return response
