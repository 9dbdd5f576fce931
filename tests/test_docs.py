"""The documentation site: the tutorials run top to bottom (nbclient, on a
kernel of this very Python), the site builds with warnings as errors and
carries what its pages promise, and the pages' Python examples run."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import docs_hooks  # noqa: E402

TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.ipynb"))


def _env(**extra: str) -> dict[str, str]:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), "NO_MKDOCS_2_WARNING": "1",
            **extra}


@pytest.mark.slow
def test_tutorials_run_and_the_site_builds(tmp_path, monkeypatch):
    """Each tutorial executes once (here); the build renders those executed
    copies instead of running them again."""
    assert len(TUTORIALS) == 3
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])  # the kernel imports this checkout's signalprop
    executed = tmp_path / "executed" / "tutorials"
    executed.mkdir(parents=True)
    for path in TUTORIALS:
        work = tmp_path / "work" / path.stem
        work.mkdir(parents=True)
        nb = docs_hooks.execute(path, work, check_python=True)  # raises on a failing cell or another kernel
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.execution_count for c in code), path.name
        assert not [o for c in code for o in c.outputs if o.output_type == "error"], path.name
        assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), f"{path.name} drew nothing"
        docs_hooks.write(nb, executed / path.name)

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                       env=_env(SIGNALPROP_DOCS_EXECUTED=str(tmp_path / "executed")), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "Converting notebook (execute=False)" in r.stderr  # rendered, not executed a second time

    def page(p: str) -> str:
        return (site / p / "index.html").read_text(encoding="utf-8")

    for p in ("getting-started", "howto/deep-net-wont-train", "howto/loss-is-nan", "howto/choose-initialization",
              "howto/watch-a-transformer", "howto/read-the-theory"):
        assert "<h1" in page(p), p
    # the tutorials with their outputs: figures and the verdicts they print
    t1 = page("tutorials/01-diagnose-and-fix")
    assert "data:image/png;base64" in t1 and "vanishing" in t1 and "healthy" in t1
    assert "alerts" in page("tutorials/02-monitor-training")
    assert "1.7610" in page("tutorials/03-theory")  # tanh's critical sigma_w2 at sigma_b2 = 0.05, as computed
    # the verdict rules are the README's own section, included at build time
    verdicts = page("verdicts")
    assert "What is judged." in verdicts and "saturated attention" in verdicts and "readme-section" not in verdicts
    # the API reference, from the docstrings, with reST roles turned into code
    api = page("reference/check") + page("reference/init") + page("reference/monitor") + page("reference/theory")
    for name in ("signalprop.probe.check.check", "signalprop.records.Report", "xavier_normal_", "critical_",
                 "signalprop.monitor.core.Monitor", "critical_sigma_w2", "propagate"):
        assert name in api, name
    assert ":func:`" not in api and ":class:`" not in api
    # nothing reaches for the network: no web fonts, no CDN scripts
    assert "fonts.googleapis" not in t1 and "cdn.jsdelivr" not in page("getting-started")


def _python_blocks() -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / "docs").rglob("*.md")):
        if "results" in path.parts:
            continue
        for code in re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            if any(line.strip().startswith("...") for line in code.splitlines()):
                continue  # a fragment with a placeholder for the reader's own code
            out.append((str(path.relative_to(ROOT)), code))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
def test_docs_examples_run():
    """Every Python block on the pages runs and logs no warning of its own
    making (as the README's examples, tests/test_readme.py)."""
    blocks = _python_blocks()
    assert len(blocks) >= 10
    logged: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = logged.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("lightning.pytorch")]
    for lg in loggers:
        lg.addHandler(handler)
    torch.manual_seed(0)
    try:
        for where, code in blocks:
            exec(compile(code, where, "exec"), {"__name__": "docs"})
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not [r.getMessage() for r in logged]


def test_readme_section_is_found_and_bounded():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = docs_hooks.readme_section(text, "How the verdict is decided")
    assert body.startswith("Every statistic is per element")
    assert "## Monitoring training" not in body and "### The zoo" in body  # down to the next heading of its level
    with pytest.raises(ValueError, match="no section 'Nope'"):
        docs_hooks.readme_section(text, "Nope")


def test_rest_roles_and_literal_blocks_become_markdown():
    sys.path.insert(0, str(ROOT / "tools"))
    from griffe_rest import convert

    text = "See :func:`signalprop.check` and :class:`~signalprop.records.Report`::\n\n    x = 1\n    y = 2\n\nDone."
    assert convert(text) == ("See `signalprop.check` and `Report`:\n\n```python\nx = 1\ny = 2\n```\n\nDone.")
