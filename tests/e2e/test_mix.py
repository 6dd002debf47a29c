"""Both of the benchmark's mixes from concurrent clients, zipfian, with payments declined by the
provider, then the full verdict: every check examined something and none found a violation."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Eshop, assert_holds
from vmsdb_eshop.check import evidence_of
from vmsdb_eshop.generator import Scale
from vmsdb_eshop.schemas import TransactionType
from vmsdb_eshop.workload import MIXES, Workload, WorkloadConfig


@pytest.fixture
def scale() -> Scale:
    # Few units of few products: concurrent sessions compete for stock and some sell out.
    return Scale(sellers=4, products_per_seller=5, customers=40, qty_per_product=30, discount_share=0.3)


@pytest.mark.parametrize(("mix", "mode"), [("paper", "continuous"), ("vmodb", "closed")])
async def test_mix_holds_the_full_verdict(eshop: Eshop, mix: str, mode: str) -> None:
    config = WorkloadConfig(
        duration=6.0,
        concurrency=8,
        mix=MIXES[mix],
        distribution="zipfian",
        mode=mode,
        payment_failure_rate=0.15,
    )
    eshop.provider.failure_rate = config.payment_failure_rate
    result = await Workload(eshop.http, eshop.market, config).run()

    assert result.errors == []
    shares = MIXES[mix].weights()
    ran = {t for t in TransactionType if result.stats[t].count}
    # Only the mix's types ran, and at least those of 5 % or more (the 2-3 % ones may not come
    # up in a few seconds).
    assert {t for t, share in shares.items() if share >= 5} <= ran <= {t for t, s in shares.items() if s > 0}
    assert result.outcomes["SUCCESS"] > 0
    assert result.outcomes["NOT_ACCEPTED/payment"] > 0, result.outcomes  # the failure path ran
    assert eshop.provider.calls > 0
    verdict = await eshop.verdict(evidence_of(eshop.market, result, provider=eshop.provider))
    assert_holds(verdict, complete=True)
    assert verdict.ok
