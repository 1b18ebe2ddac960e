"""Shared fixtures: the real models and texts, fetched once into the user's data folder (outside the repo)."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_path():
    from edgeq.assets import model_path

    return model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_path():
    from edgeq.assets import model_path

    return model_path("gemma3-270m")


@pytest.fixture(scope="session")
def hamlet_path():
    from edgeq.assets import text_path

    return text_path("hamlet")

