"""What the driver saw, in real time: the ground truth the checker judges the services by.

The driver records every product update it sent (when it was sent, when it was acknowledged,
the price and version it set) and every checkout it issued (when it was sent and how it
ended). "Before" in the checks means *acknowledged to the driver before the other request was
sent*; nothing here comes from the services' own tables or the core's prunable event log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

__all__ = ["Checkout", "Ledger", "ProductState"]


@dataclass(frozen=True)
class ProductState:
    """A product as the driver left it: the seed (``sent`` = ``acked`` = -inf) or an update."""

    version: str
    price: Decimal
    kind: str  # "seed", "price" or "replace"
    sent: float
    acked: float


@dataclass(frozen=True)
class Checkout:
    customer_id: int
    tid: str
    sent: float
    status: str  # SUCCESS, NOT_ACCEPTED, or the HTTP error
    #: The (seller, product) keys the session put in the cart.
    keys: tuple[tuple[int, int], ...] = ()

    def shares_a_seller(self) -> bool:
        """Two items of one seller: the only carts that can show a causal anomaly."""
        sellers = [seller for seller, _ in self.keys]
        return len(set(sellers)) < len(sellers)


@dataclass
class Ledger:
    """Per product, its states in the order the driver made them (one update in flight at a
    time per product, as the benchmark's seller workers do); the checkouts it issued."""

    products: dict[tuple[int, int], list[ProductState]] = field(default_factory=dict)
    checkouts: list[Checkout] = field(default_factory=list)
    #: What ``GET /cart/{customerId}/history/{tid}`` answered, per (customer, tid).
    histories: dict[tuple[int, str], list[dict[str, Any]]] = field(default_factory=dict)
    #: Live dashboard answers checked, and those whose totals did not add up.
    dashboards: int = 0
    dashboard_anomalies: list[str] = field(default_factory=list)

    def seed(self, key: tuple[int, int], version: str, price: Decimal) -> None:
        self.products[key] = [ProductState(version, price, "seed", float("-inf"), float("-inf"))]

    def acknowledged(
        self, key: tuple[int, int], kind: str, version: str, price: Decimal, sent: float, acked: float
    ) -> None:
        self.products[key].append(ProductState(version, price, kind, sent, acked))

    def before(self, key: tuple[int, int], moment: float) -> int:
        """Index of the product's newest state acknowledged before ``moment``."""
        states = self.products[key]
        return max(i for i, s in enumerate(states) if s.acked < moment)
