import random

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A fresh, reproducible seed per test case."""
    seed = hash(request.node.nodeid) % (2 ** 31)
    torch.manual_seed(seed)
    random.seed(seed)
    return seed
