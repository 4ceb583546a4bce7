import os

import pytest
import torch

# deterministic and quiet on the 2-core CI machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
