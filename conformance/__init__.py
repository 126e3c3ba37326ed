"""hwlayer conformance suite: ``pytest conformance/ --backend NAME`` (see conftest.py)."""
