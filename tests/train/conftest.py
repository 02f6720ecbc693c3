"""Fixtures of the training tests."""

from pathlib import Path

import pytest

from tinygemma.data.config import InstructOptions, PrepareConfig
from tinygemma.data.instruct import prepare_instruct


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory, sample_dir) -> Path:
    """Derived instruct records of the sample's first 60 stories per split."""
    out = tmp_path_factory.mktemp("instruct")
    prepare_instruct(PrepareConfig(source=str(sample_dir), out=str(out), max_stories=60, workers=1),
                     InstructOptions(derive_instructions=True))
    return out
