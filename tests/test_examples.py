"""Every script in examples/ runs (the MNIST ones for one epoch: their full runs are the
README's)."""

import glob
import os
import runpy
import sys

import pytest

import fastnn as fn

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                         "examples", "*.py")))


@pytest.mark.skipif(not EXAMPLES, reason="examples/ is not beside tests/ (installed-package run)")
@pytest.mark.parametrize("path", EXAMPLES + [p + " seed" for p in EXAMPLES
                                              if p.endswith("mnist_cnn.py")],
                         ids=lambda p: os.path.basename(p))
def test_example_runs(path, tmp_path, monkeypatch, capsys):
    path, *args = path.split(" ")
    monkeypatch.chdir(tmp_path)             # examples save their models here
    monkeypatch.setattr(sys, "argv", [path] + args)
    fit = fn.Sequential.fit

    def one_epoch(self, *a, **k):
        if "mnist" in os.path.basename(path):
            k["epochs"] = 1
        k["verbose"] = 0
        return fit(self, *a, **k)

    monkeypatch.setattr(fn.Sequential, "fit", one_epoch)
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip()
