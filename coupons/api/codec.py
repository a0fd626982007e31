"""The codec server (being written): POST /codec/encode and /codec/decode."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["codec"])
