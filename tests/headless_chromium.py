"""Headless Chromium for the browser tests: Debian's package, driven by Playwright (no browser download).

``apt-get install chromium`` provides ``/usr/bin/chromium``; tests that need it skip without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def launch(playwright: Any, profile: Path, **options: Any) -> Any:
    """A persistent headless Chromium context (profile in ``profile``); ``options`` go to Playwright."""
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, **options
    )
