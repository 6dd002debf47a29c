"""The eShop's own settings, from the environment (``ESHOP_*``)."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["EshopSettings", "settings"]


class EshopSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESHOP_", extra="ignore")

    #: How long add-to-cart holds the stock it leased (``ESHOP_LEASE_SECONDS``).
    lease_seconds: float = Field(default=900.0, gt=0)
    #: How long checkout, price update and product update wait for their chain's outcome.
    outcome_timeout: float = Field(default=30.0, gt=0)
    #: Sellers whose oldest open order one PATCH /shipment/{tid} delivers.
    delivery_sellers: int = Field(default=10, ge=1)
    #: The simulated payment provider's latency per call (``ESHOP_PAYMENT_LATENCY_MS``).
    payment_latency_ms: float = Field(default=3.0, ge=0)
    #: Share of payments the simulated provider declines (``ESHOP_PAYMENT_FAILURE_RATE``).
    payment_failure_rate: float = Field(default=0.0, ge=0, le=1)

    @property
    def lease_period(self) -> timedelta:
        return timedelta(seconds=self.lease_seconds)


@lru_cache(maxsize=1)
def settings() -> EshopSettings:
    return EshopSettings()
