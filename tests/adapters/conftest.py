"""Fixtures shared by the adapter tests."""

import pytest
import qwen_vl_tiny
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


@pytest.fixture(scope="module")
def small_tokenizer():
    """The 2k-token tokenizer the Qwen-VL tests' tiny models use (built once per process)."""
    return qwen_vl_tiny.small_tokenizer()
