import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# encoded splits, file hashes and peak FLOP/s are cached under $PIPELINES_CACHE: one fresh folder per test
# process (and its subprocesses), so tests neither litter ~/.cache nor read a cache an older checkout wrote
if "PIPELINES_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PIPELINES_CACHE"] = tempfile.mkdtemp(prefix="pipelines-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PIPELINES_CACHE"], True)


@pytest.fixture
def fake_stages():
    from tests import fake_stages

    fake_stages.register()
    yield fake_stages
    from pipelines.stages import STAGES

    for k in fake_stages.FAKE_STAGES:
        STAGES.pop(k, None)


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe YAML into tmp_path and return its path."""
    import yaml

    def _write(doc: dict | str, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
        return p

    return _write


def python_cmd(*code_lines: str) -> list[str]:
    return [sys.executable, "-c", "\n".join(code_lines)]
