"""Ingestion takes the benchmark generator's rows as they are: Bogus pt-BR fields (formatted CPF,
CNPJ, phones and CEPs, accented names), 4-digit prices and 3-digit freight as JSON numbers,
versions as strings, and the DuckDB tables' extra columns; a checkout then runs on them."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx

from framework.fastapi import run_lifespan
from vmsdb_eshop.app import create_api
from vmsdb_eshop.provider import SimulatedProvider
from vmsdb_eshop.services import SERVICES

SELLER = {
    "id": 1,
    "name": "Bruna Albuquerque",
    "company_name": "Souza - Conceição",
    "email": "bruna_albuquerque@bol.com.br",
    "phone": "(11) 3456-7890",
    "mobile_phone": "(11) 91234-5678",
    "cpf": "123.456.789-09",
    "cnpj": "12.345.678/0001-95",
    "address": "Rua Açaí, 1234",
    "complement": "Apto. 12",
    "city": "São João del-Rei",
    "state": "MG",
    "zip_code": "36300-000",
    "order_count": 0,  # a column of the generator's table the sample does not keep
}
CUSTOMER = {
    "id": 1,
    "first_name": "João",
    "last_name": "Conceição",
    "address": "Travessa Pará, 45",
    "complement": "Casa 2",
    "birth_date": "1984-03-15",
    "zip_code": "01310-100",
    "city": "São Paulo",
    "state": "SP",
    "card_number": "5162408182144592",
    "card_security_number": "412",
    "card_expiration": "0839",
    "card_holder_name": "JOAO CONCEICAO",
    "card_type": "MasterCard",
    "success_payment_count": 0,
    "failed_payment_count": 0,
    "delivery_count": 0,
    "data": "Ipsum é lorem.",
}
PRODUCT = {
    "seller_id": 1,
    "product_id": 1,
    "name": "Incrível Granito Cadeira",
    "sku": "ABC-123-XYZ",
    "category": "Ferramentas",
    "description": "Ótima cadeira de granito.",
    "price": 4321.99,
    "freight_value": 123.45,
    "status": "approved",
    "version": "0",
    "active": True,
}
STOCK = {
    "seller_id": 1,
    "product_id": 1,
    "qty_available": 10000,
    "qty_reserved": 0,
    "order_count": 0,
    "ytd": 0,
    "data": "Lorem ipsum.",
    "version": "0",
}


async def test_the_generators_rows_are_ingested_and_sold(vmsdb_app_factory: Any) -> None:
    async with vmsdb_app_factory(SERVICES, create_tables=False, migrate=True) as app:
        api = create_api(app, provider=SimulatedProvider(latency=0))
        transport = httpx.ASGITransport(app=api)
        async with run_lifespan(api), httpx.AsyncClient(transport=transport, base_url="http://e") as http:
            for path, row in (("/seller", SELLER), ("/customer", CUSTOMER), ("/product", PRODUCT)):
                response = await http.post(path, json=row)
                assert response.status_code == 201, (path, response.text)
            assert (await http.post("/stock", json=STOCK)).status_code == 201
            await app.drain()
            product = (await http.get("/product/1/1")).json()
            assert Decimal(str(product["price"])) == Decimal("4321.99")
            assert (await http.get("/seller/1")).json()["cnpj"] == "12.345.678/0001-95"
            item = {
                "SellerId": 1,
                "ProductId": 1,
                "ProductName": PRODUCT["name"],
                "UnitPrice": 4321.99,
                "FreightValue": 123.45,
                "Quantity": 2,
                "Voucher": 0.0,
                "Version": "0",
            }
            assert (await http.patch("/cart/1/add", json=item)).status_code == 200
            checkout = {
                "CustomerId": 1,
                "FirstName": CUSTOMER["first_name"],
                "LastName": CUSTOMER["last_name"],
                "Street": CUSTOMER["city"],  # the driver shuffles the address fields
                "Complement": CUSTOMER["address"],
                "City": CUSTOMER["complement"],
                "State": "SP",
                "ZipCode": CUSTOMER["zip_code"],
                "PaymentType": "CREDIT_CARD",
                "CardNumber": CUSTOMER["card_number"],
                "CardHolderName": CUSTOMER["card_holder_name"],
                "CardExpiration": CUSTOMER["card_expiration"],
                "CardSecurityNumber": CUSTOMER["card_security_number"],
                "CardBrand": CUSTOMER["card_type"],
                "Installments": 3,
                "instanceId": "1",
            }
            response = await http.post("/cart/1/checkout", json=checkout)
            assert response.status_code == 200, response.text
            (order,) = (await http.get("/order/1")).json()
            assert Decimal(str(order["total_items"])) == Decimal("8643.98")
            assert order["estimated_delivery_date"] is not None
            assert all(i["shipping_limit_date"] is not None for i in order["items"])
            await app.drain()
            (entry,) = (await http.get("/seller/dashboard/1")).json()["orderEntries"]
            assert entry["product_category"] == "Ferramentas"
