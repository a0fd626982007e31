"""Prometheus metrics of the API process (being written): GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["service"])
