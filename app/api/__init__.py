"""The HTTP API apps and operators use (`python -m app.api`): FastAPI on uvicorn.

`app.create_app` builds it; `routing` holds authentication, scopes and idempotency;
`problems` every error answer; `coupons`, `catalog` and `callbacks` the endpoints.
"""
