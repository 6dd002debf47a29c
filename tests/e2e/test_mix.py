"""The benchmark's full transaction mix from concurrent clients, then every consistency check."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Eshop, assert_holds
from vmsdb_eshop.generator import Scale
from vmsdb_eshop.schemas import TransactionType
from vmsdb_eshop.workload import Mix, Workload, WorkloadConfig


@pytest.fixture
def scale() -> Scale:
    # Few units of few products: concurrent sessions compete for stock and some sell out.
    return Scale(sellers=4, products_per_seller=5, customers=40, qty_per_product=30, discount_share=0.3)


async def test_full_mix_holds_every_consistency_property(eshop: Eshop) -> None:
    # The benchmark's mix, with seller updates made more frequent so that a few seconds see
    # price updates and replacements race with checkouts.
    mix = Mix(customer_session=35, query_dashboard=8, price_update=10, update_product=5, update_delivery=42)
    config = WorkloadConfig(duration=8.0, concurrency=8, mix=mix, max_items=5, payment_failure_rate=0.1)
    result = await Workload(eshop.http, eshop.market, config).run()

    assert result.errors == []
    assert result.dashboard_anomalies == 0
    assert all(result.stats[t].count > 0 for t in TransactionType), result.stats
    assert result.outcomes["SUCCESS"] > 0
    verdict = await eshop.verdict()
    assert_holds(verdict)
    checked = {r.name: r.checked for r in verdict.results}
    assert all(n > 0 for n in checked.values()), checked
