"""The README's Python examples run, and its set-up commands are the Makefile's."""

import logging
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# Lightning's own advice (dataloader workers) and its use of torch's deprecated LeafSpec
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning")
def test_readme_python_blocks_run(capsys):
    """Each block runs, and prints no warning of its own making: Python
    warnings are errors here, and libraries' logged warnings (transformers
    logs them, not warns: a config's token ids outside its vocabulary, say)
    are collected and must be none."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    logged: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = logged.append
    # transformers' logger does not propagate, nor does Lightning's, which carries the callback's alerts
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("lightning.pytorch")]
    for lg in loggers:
        lg.addHandler(handler)
    torch.manual_seed(0)  # the blocks that draw without a seed: the same draws on every run
    try:
        for code in blocks:
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not [r.getMessage() for r in logged]
    out = capsys.readouterr().out
    assert "(18, 36)" in out and "1.5925 1.5335" in out
    assert "rank 0: healthy" in out and "[0, 2]" in out  # the distributed and HF examples
    assert "3 1 forward torch.exp forward" in out and "3 non-finite input" in out  # "My loss turned NaN"


def test_readme_commands_exist_in_makefile():
    text = (ROOT / "README.md").read_text()
    make = (ROOT / "Makefile").read_text()
    assert "make demo" in text and "make test" in text
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)
