"""Test-suite defaults: value checks that read device data are on (``HWLAYER_CHECK=1``; serving
leaves them off so a forward never reads the device), unless the environment says otherwise."""

import os

os.environ.setdefault("HWLAYER_CHECK", "1")
