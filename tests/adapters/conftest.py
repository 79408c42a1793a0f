"""Fixtures shared by the adapter tests."""

import os

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


@pytest.fixture(scope="session", autouse=True)
def small_tokenizer_folder(tmp_path_factory):
    """One folder for the small tokenizer, shared with the ranks the tests start (see
    qwen_vl_tiny.SMALL_TOKENIZER_FOLDER); pytest cleans its base folder up like any other."""
    os.environ.setdefault(
        qwen_vl_tiny.SMALL_TOKENIZER_FOLDER,
        str(tmp_path_factory.getbasetemp() / "small-tokenizer"),
    )


@pytest.fixture(scope="module")
def small_tokenizer():
    """The 2k-token tokenizer the Qwen-VL tests' tiny models use (built once per process)."""
    return qwen_vl_tiny.small_tokenizer()
