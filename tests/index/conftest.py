"""Fixtures of the search-service tests: one small image index (the shipped tiny CLIP), built once for the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="package")
def index_dir(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 20 test images of the small world, indexed (flat) with ``vlprompt-tiny`` at its ``world`` weights."""
    pytest.importorskip("faiss")
    from vlprompt.index.build import build_index

    out = tmp_path_factory.mktemp("service") / "images"
    build_index(out, "vlprompt-tiny", str(small_world / "retrieval" / "test_clean.json"), pretrained="world",
                device="cpu")  # fmt: skip
    return out


@pytest.fixture(scope="package")
def index(index_dir: Path) -> Any:
    """:func:`index_dir` opened with its encoder."""
    from vlprompt.index.search import SearchIndex

    return SearchIndex(index_dir, device="cpu")
