"""Fixtures shared by the TRL adapter tests (the other adapter tests build their own)."""

import pytest
import trl_tiny


@pytest.fixture(scope="module")
def trl_one_thread():
    """Torch on one thread for the module (see trl_tiny.one_thread)."""
    with trl_tiny.one_thread():
        yield


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The small tokenizer the TRL tests' tiny models use."""
    return trl_tiny.write_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
