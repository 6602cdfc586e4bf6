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
    config.addinivalue_line("markers", "full: whole-script runs (train.py subprocesses, torchrun, end-to-end "
                                       "evaluations) that only the full suite runs; -m quick leaves them out")
    config.addinivalue_line("markers", "quick: given to every test marked neither slow nor full (the edit-test loop: "
                                       "python -m pytest -q tests -m quick)")


def pytest_collection_modifyitems(items):
    """The quick tier is what is left when the slow and the full tests are taken out: a new test is quick unless it
    says otherwise."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in ("slow", "full")):
            item.add_marker("quick")
