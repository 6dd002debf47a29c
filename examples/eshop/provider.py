"""The external payment provider: the interface a deployment replaces, and a simulated one.

The payment service calls the provider between two of its transactions, never inside one (a
blocking call to an outside system must not hold locks or a connection). What makes that safe
is the idempotency key: the provider answers a repeated request with the first answer and
charges once, so the payment service may call again after a crash or a lost answer, and only
the transaction that records the answer (once, conditionally) has effects. See
``vmsdb_eshop.payments``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Protocol

from vmsdb_eshop.schemas import card_expired

__all__ = ["Authorization", "PaymentProvider", "PaymentRequest", "SimulatedProvider"]


@dataclass(frozen=True)
class PaymentRequest:
    """One charge: ``key`` identifies it for good (a retry sends the same key)."""

    key: str
    amount: Decimal
    payment_type: str
    card_expiration: str
    on: date


@dataclass(frozen=True)
class Authorization:
    approved: bool
    reason: str = ""


class PaymentProvider(Protocol):
    """What the payment service needs of a provider; replace it with a real client."""

    async def authorize(self, request: PaymentRequest) -> Authorization:
        """Charge ``request`` once per key; the same key always gets the same answer."""
        ...


@dataclass
class SimulatedProvider:
    """A provider in process: ``latency`` seconds per call, a share ``failure_rate`` declined.

    Whether a key is declined is a pure function of the key and ``seed``, so a retried call
    gets the same answer; expired cards are always declined. ``charges`` counts approved
    charges per key, the provider's own record a checker can hold the payments against.
    """

    latency: float = 0.003
    failure_rate: float = 0.0
    seed: int = 0
    charges: Counter[str] = field(default_factory=Counter)
    calls: int = 0

    async def authorize(self, request: PaymentRequest) -> Authorization:
        self.calls += 1
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if request.payment_type in ("CREDIT_CARD", "DEBIT_CARD") and card_expired(
            request.card_expiration, request.on
        ):
            return Authorization(False, "card expired")
        if self._declines(request.key):
            return Authorization(False, "declined by the provider")
        self.charges[request.key] = 1  # idempotent: a repeated key is one charge
        return Authorization(True)

    def _declines(self, key: str) -> bool:
        digest = hashlib.sha256(f"{self.seed}/{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.failure_rate
