"""The driver's draws and options (no I/O): zipfian draws favour the first ranks, a cart holds
k distinct keys, and the options refuse what the benchmark does not define."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from vmsdb_eshop.generator import Scale, generate
from vmsdb_eshop.workload import MIXES, Workload, WorkloadConfig

MARKET = generate(Scale(sellers=10, products_per_seller=10, customers=5))


def _workload(**options: object) -> Workload:
    return Workload(httpx.AsyncClient(base_url="http://unused"), MARKET, WorkloadConfig(**options))  # type: ignore[arg-type]


def test_zipfian_sellers_favour_the_first_ranks_and_uniform_does_not() -> None:
    workloads = {d: _workload(distribution=d) for d in ("uniform", "zipfian")}
    draws = {d: Counter(w._key()[0] for _ in range(5000)) for d, w in workloads.items()}
    # Exponent 1 over 10 sellers: the first has 1/H(10) = 34 % of the draws, the last 3.4 %.
    assert draws["zipfian"][1] > 0.3 * 5000 and draws["zipfian"][10] < 0.05 * 5000
    assert all(0.07 * 5000 < draws["uniform"][s] < 0.13 * 5000 for s in range(1, 11))


def test_a_cart_draws_distinct_keys() -> None:
    workload = _workload(distribution="zipfian")
    for count in range(1, 11):
        keys = workload._keys(count)
        assert len(keys) == len(set(keys)) == count


def test_the_mixes_are_the_papers_and_vmodbs() -> None:
    assert {t.value: w for t, w in MIXES["paper"].weights().items()} == {
        "CUSTOMER_SESSION": 30,
        "QUERY_DASHBOARD": 5,
        "PRICE_UPDATE": 3,
        "UPDATE_PRODUCT": 2,
        "UPDATE_DELIVERY": 60,
    }
    assert {t.value: w for t, w in MIXES["vmodb"].weights().items()} == {
        "CUSTOMER_SESSION": 70,
        "QUERY_DASHBOARD": 10,
        "PRICE_UPDATE": 10,
        "UPDATE_PRODUCT": 10,
        "UPDATE_DELIVERY": 0,
    }


@pytest.mark.parametrize(
    "options", [{"distribution": "normal"}, {"mode": "open"}, {"max_items": 11}, {"max_items": 0}]
)
def test_options_outside_the_benchmark_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        WorkloadConfig(**options)  # type: ignore[arg-type]
