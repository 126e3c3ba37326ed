"""Test-suite defaults: value checks that read device data are on (``HWLAYER_CHECK=1``; serving
leaves them off so a forward never reads the device), unless the environment says otherwise."""

import os

import pytest

os.environ.setdefault("HWLAYER_CHECK", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model, tokenizer)`` of the default tiny checkpoint on cpu, written to a fresh cache per module."""
    from model import load_model
    from model.tiny import ensure_default_model
    from model.tokenizer import load_tokenizer

    path = ensure_default_model(cache_dir=tmp_path_factory.mktemp("tiny"))
    return load_model(path, backend="cpu"), load_tokenizer(path)
