"""Shared pytest set-up: the repo root on sys.path and the CPU torchvision fix before anything imports transformers."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; a hub call is a bug

import common  # noqa: E402,F401  (runs the torchvision fix)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long tests (the real model shapes); CI runs them, -m 'not slow' "
                                       "skips them")
