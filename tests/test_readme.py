"""The README's examples run as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def _blocks():
    if not os.path.exists(README):
        return []
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.skipif(not os.path.exists(README), reason="README.md is not beside tests/ (installed-package run)")
def test_readme_has_examples():
    assert len(_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may save files
    namespace = {}
    exec(compile(_blocks()[index], f"README.md example {index}", "exec"), namespace)
    if "loss" in namespace:
        assert isinstance(namespace["loss"], float)
