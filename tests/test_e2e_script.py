"""The browser check's own helpers (`make e2e` runs the check itself, in Chromium)."""

from __future__ import annotations

from pathlib import Path

from e2e.__main__ import e2e_settings
from e2e.encryption import StoredInput

DEFAULT_PORTS = {8000, 8233, 7233, 8600, 9464, 55432}


def test_the_web_ui_of_the_run_may_call_its_codec_server(tmp_path: Path) -> None:
    settings = e2e_settings(tmp_path)
    ui = settings.temporal_ui_port
    # The browser's origin is the Web UI's, on this run's port: the codec server's CORS
    # must name it, or every payload stays encrypted on the page.
    assert settings.codec_cors_origins == (f"http://127.0.0.1:{ui}", f"http://localhost:{ui}")
    ports = [
        settings.pg_port,
        settings.temporal_port,
        ui,
        settings.simulator_port,
        settings.api_port,
        settings.worker_metrics_port,
    ]
    assert len(set(ports)) == len(ports)
    assert not DEFAULT_PORTS & set(ports)
    assert settings.data_dir == tmp_path


def test_an_input_stored_in_clear_is_named_with_its_encoding() -> None:
    clear = StoredInput("coupon:demo:u:1", ["json/plain"], in_clear=True)
    assert clear.problem is not None
    assert "coupon:demo:u:1" in clear.problem and "json/plain" in clear.problem
    assert StoredInput("coupon:demo:u:1", ["binary/encrypted"], in_clear=False).problem is None
    missing = StoredInput("coupon:demo:u:1", [], in_clear=False).problem
    assert missing is not None and "no input" in missing
