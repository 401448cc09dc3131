"""Catalog HTTP routes: parse, call the domain, shape the reply."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response

from services.catalog import domain
from services.catalog.schemas import MAX_ID, Product, ProductIn, ProductPage
from services.catalog.state import CatalogState
from services.common.app import JSONResponse
from services.common.errors import problem_body
from services.common.identity import Caller, current_admin
from services.common.openapi import link

router = APIRouter(prefix="/api/v1", tags=["catalog"])

ProductIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="Product id")]

_EXAMPLE = problem_body(404, "not-found", None, "product 7 does not exist")
_PROBLEM = {"content": {"application/problem+json": {"example": _EXAMPLE}}}


async def catalog_state(request: Request) -> CatalogState:
    state: CatalogState = request.state.app_state
    return state


State = Annotated[CatalogState, Depends(catalog_state)]


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of If-None-Match against our strong tag."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in if_none_match.split(","))


PRODUCT = "/api/v1/products/{product_id}"
_READ_PRODUCT = link(
    PRODUCT, "get", "the product", parameters={"product_id": "$request.path.product_id"}
)
_ORDER_PRODUCT = link(
    "/api/v1/orders",
    "post",
    "order one unit of it",
    request_body={"product_id": "$request.path.product_id", "quantity": 1},
)


@router.get(
    "/products",
    response_model=ProductPage,
    responses={
        200: {
            "links": {
                "GetFirstProduct": link(
                    PRODUCT,
                    "get",
                    "the first product of the page",
                    parameters={"product_id": "$response.body#/items/0/id"},
                )
            }
        }
    },
)
async def list_products(
    state: State,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> Response:
    body = await domain.list_products(pool=state.db, after=after, limit=limit)
    return Response(body, media_type="application/json")


@router.get(
    "/products/{product_id}",
    response_model=Product,
    responses={304: {"description": "Not modified"}, 404: _PROBLEM},
)
async def get_product(
    state: State,
    product_id: ProductIdPath,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    product = await domain.get_product(pool=state.db, cache=state.cache, product_id=product_id)
    headers = {"ETag": product.etag, "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, product.etag):
        return Response(status_code=304, headers=headers)
    return Response(product.body, media_type="application/json", headers=headers)


@router.put(
    "/admin/products/{product_id}",
    response_model=Product,
    responses={
        200: {
            "description": "Replaced",
            "links": {"GetProduct": _READ_PRODUCT, "OrderProduct": _ORDER_PRODUCT},
        },
        201: {
            "model": Product,
            "description": "Created",
            "links": {"GetProduct": _READ_PRODUCT, "OrderProduct": _ORDER_PRODUCT},
        },
        403: _PROBLEM,
        409: _PROBLEM,
    },
)
async def put_product(
    state: State,
    product_id: ProductIdPath,
    data: ProductIn,
    _admin: Annotated[Caller, Depends(current_admin)],
) -> Response:
    product, created = await domain.put_product(
        pool=state.db,
        cache=state.cache,
        product_id=product_id,
        data=data,
        inventory=state.inventory,
    )
    return Response(
        product.body,
        status_code=201 if created else 200,
        media_type="application/json",
        headers={"ETag": product.etag},
    )


__all__ = ["JSONResponse", "router"]
