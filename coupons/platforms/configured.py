"""The platform adapter the settings ask for: one place builds it for the worker, the API,
the command line, tests, benchmarks and chaos runs.

With the embedded simulator (no PLATFORM_URL), the WeChat and Alipay adapters use the test
merchant the simulator generated under `Settings.platform_keys_dir`; with a real platform every
id and file comes from the settings (`Settings.check` refuses missing ones).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from coupons.config import ConfigError, Settings
from coupons.platforms.base import Platform


def make_platform(settings: Settings, client: httpx.AsyncClient | None = None) -> Platform:
    if settings.platform == "wechat":
        return _wechat(settings, client)
    if settings.platform == "alipay":
        return _alipay(settings, client)
    from coupons.platforms.generic.adapter import RestPlatform

    return RestPlatform(
        settings.platform_url,
        api_key=settings.platform_api_key,
        timeout_s=settings.platform_timeout_s,
        client=client,
        callback_secret=settings.platform_callback_secret,
    )


def _file(name: str, path: Path | None, default: Path) -> Path:
    chosen = path or default
    if not chosen.is_file():
        # The path is not a secret; its content is, and is never read into a message.
        raise ConfigError(f"{name}={chosen}: no such file")
    return chosen


def _wechat(settings: Settings, client: httpx.AsyncClient | None) -> Platform:
    from coupons.platforms.wechat import protocol as wechat_protocol
    from coupons.platforms.wechat.adapter import WechatPayPlatform

    keys = settings.platform_keys_dir / "wechat"
    merchant = wechat_protocol.WechatMerchant.from_files(
        mchid=settings.wechat_mchid or wechat_protocol.SIM_MCHID,
        appid=settings.wechat_appid or wechat_protocol.SIM_APPID,
        private_key_file=_file(
            "WECHAT_PRIVATE_KEY_FILE", settings.wechat_private_key_file, keys / "apiclient_key.pem"
        ),
        serial=settings.wechat_merchant_serial,
        apiv3_key_file=_file(
            "WECHAT_APIV3_KEY_FILE", settings.wechat_apiv3_key_file, keys / "apiv3_key"
        ),
        # A merchant on platform certificates alone holds no public key: answers verify with
        # the certificates the adapter downloads.
        platform_public_key_file=None
        if settings.wechat_platform_keys == "certificates"
        else _file(
            "WECHAT_PLATFORM_PUBLIC_KEY_FILE",
            settings.wechat_platform_public_key_file,
            keys / "pub_key.pem",
        ),
        platform_public_key_id=settings.wechat_platform_public_key_id,
    )
    return WechatPayPlatform(
        settings.platform_url, merchant, timeout_s=settings.platform_timeout_s, client=client
    )


def _alipay(settings: Settings, client: httpx.AsyncClient | None) -> Platform:
    from coupons.platforms.alipay import protocol as alipay_protocol
    from coupons.platforms.alipay.adapter import AlipayPlatform

    keys = settings.platform_keys_dir / "alipay"
    app = alipay_protocol.AlipayApp.from_files(
        app_id=settings.alipay_app_id or alipay_protocol.SIM_APP_ID,
        private_key_file=_file(
            "ALIPAY_PRIVATE_KEY_FILE",
            settings.alipay_private_key_file,
            keys / "app_private_key.pem",
        ),
        alipay_public_key_file=_file(
            "ALIPAY_PUBLIC_KEY_FILE",
            settings.alipay_public_key_file,
            keys / "alipay_public_key.pem",
        ),
    )
    # No callback URL to give: Alipay sends its messages to the app's gateway address set in
    # its console (docs/platforms/alipay.md), not to one named per activity.
    return AlipayPlatform(
        settings.platform_url,
        app,
        pid=settings.alipay_pid or alipay_protocol.SIM_PID,
        user_id_type=settings.user_id_type,
        timeout_s=settings.platform_timeout_s,
        client=client,
    )
