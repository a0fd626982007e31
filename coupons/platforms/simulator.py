"""The platform simulator's entry point: the core (`coupons.platforms.simcore`) behind the face
of one platform protocol, chosen with `--mode`: generic (our own small REST protocol), WeChat
Pay API v3 vouchers or Alipay vouchers. Each face lives in its platform's folder.

Run: python -m coupons.platforms.simulator --mode generic --port 8600 --data PATH.sqlite3
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from coupons.platforms.simcore.app import create_app
from coupons.platforms.simcore.core import Face, face_knobs
from coupons.platforms.simcore.knobs import Knobs

DEFAULT_DATA = Path(".data/simulator.sqlite3")
MODES = ("generic", "wechat", "alipay")


def make_face(mode: str, keys_dir: Path) -> Face:
    """The face of `mode`; each platform's face is imported only when asked for."""
    if mode == "generic":
        from coupons.platforms.generic.simulator import GenericFace

        return GenericFace(
            api_key=os.environ.get("PLATFORM_API_KEY") or None,
            callback_secret=os.environ.get("PLATFORM_CALLBACK_SECRET") or None,
        )
    if mode == "wechat":
        from coupons.platforms.wechat.simulator import WechatFace

        return WechatFace(keys_dir)
    if mode == "alipay":
        from coupons.platforms.alipay.simulator import AlipayFace

        return AlipayFace(keys_dir)
    raise ValueError(f"unknown simulator mode {mode!r}; one of {', '.join(MODES)}")


def simulator_app(
    data_path: Path,
    knobs: Knobs | None = None,
    mode: str = "generic",
    keys_dir: Path | None = None,
) -> Starlette:
    """The simulator speaking `mode`'s protocol. Generic mode reads `PLATFORM_API_KEY` (if set,
    it guards every /v1 path) and `PLATFORM_CALLBACK_SECRET` (if set, it signs redemption
    notifications; none is sent without) now; the wechat and alipay modes keep their key
    material under `keys_dir` (made on first start)."""
    keys = keys_dir if keys_dir is not None else data_path.parent / "platform-keys"
    face = make_face(mode, keys)
    if knobs is None:
        knobs = Knobs.from_env(face_knobs=face_knobs(face))
    return create_app(data_path, face, knobs, keys)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Coupon platform simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SQLite file")
    parser.add_argument(
        "--mode", choices=MODES, default="generic", help="the platform protocol to speak"
    )
    parser.add_argument(
        "--keys", type=Path, default=None, help="key material (default: beside --data)"
    )
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Not a line per callback sent; failures and give-ups are logged by the Notifier.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = simulator_app(args.data, mode=args.mode, keys_dir=args.keys)
    # A hanging ambiguous answer must not hold up shutdown for its whole hang.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        access_log=args.access_log,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
