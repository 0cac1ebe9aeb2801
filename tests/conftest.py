"""Shared test setup: offline Hugging Face, few threads, float64 defaults for oracles."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# scoring='auto' measures back-ends per layer shape (drpost.scoring.calibration): one fresh cache per
# test session (inherited by the distributed tests' worker processes), never the user's ~/.cache
import tempfile  # noqa: E402

os.environ["DRPOST_CALIBRATION_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="drpost-calibration-"),
                                                      "scoring_calibration.json")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# tests/ on sys.path so test modules can `import oracles` / `import models_tiny`
sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(1)  # tiny models: one thread is fastest and robust to a busy machine

import transformers  # noqa: E402,F401  (imported after HF_HUB_OFFLINE is set)

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def import_engine():
    """``drpost.DataRegularizer``. An engine that does not import is an error of the oracle tests,
    never a skip."""
    from drpost import DataRegularizer

    return DataRegularizer
