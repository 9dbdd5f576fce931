"""MkDocs hooks (``hooks:`` in mkdocs.yml).

A page line ``<!-- readme-section: TITLE -->`` is replaced by the README's
section of that title (down to the next heading of its level or above), so
the site and the README say the same thing from one text.

The tutorials are executed once, here, with nbclient, on a kernel that runs
this very Python (the project's venv when MkDocs runs from it), and the site
shows their outputs.

The notebooks are kept in git without outputs, so no figure or number on
the site is older than the code.  ``SIGNALPROP_DOCS_EXECUTED=DIR`` points
the build at notebooks already executed into DIR (the docs test executes
them itself, then builds without running them a second time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

TUTORIALS = "tutorials/"
KERNEL_NAME = "signalprop-docs"
CELL_TIMEOUT_S = 300  # one cell; the tutorials' cells take seconds on a 2-core CPU


def kernel_env() -> dict[str, str]:
    """The kernel's environment: this process's, with matplotlib's inline
    backend (the Makefile exports ``MPLBACKEND=agg`` for the tests, which
    would leave every figure out of the page) and one torch thread (the
    tutorials' small models gain nothing from a second one, and the build
    shares the CPU with the tests)."""
    env = dict(os.environ)
    if env.get("PYTHONPATH"):  # the kernel runs in another directory: relative entries would point elsewhere
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("COLUMNS", None)  # printed reports fit the page's 80 columns, not the caller's terminal
    return env


def execute(path: str | Path, workdir: str | Path, *, check_python: bool = False) -> Any:
    """Run the notebook at ``path`` top to bottom in ``workdir`` (files it
    writes land there) on a kernel started with ``sys.executable``, and
    return it with its outputs.  A cell that raises raises here
    (``nbclient.exceptions.CellExecutionError``, naming the cell).

    ``check_python``: also run ``sys.executable`` in the kernel and check
    that it is this process's Python (the cell is not kept)."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    specs = Path(tempfile.mkdtemp(prefix="signalprop-kernel-"))
    try:
        # a kernel spec of our own: a "python3" spec installed by the user elsewhere must not run the tutorials
        (specs / KERNEL_NAME).mkdir()
        (specs / KERNEL_NAME / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "signalprop docs", "language": "python"}))
        km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)]),
                                # local sockets under an absolute path (the kernel runs in workdir): over TCP the
                                # kernel warns that its traffic is unencrypted
                                transport="ipc", ip=str(specs / "ipc"))
        probe = None
        if check_python:
            probe = nbformat.v4.new_code_cell("import sys; print(sys.executable)")
            nb.cells.append(probe)
        client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                                resources={"metadata": {"path": str(workdir)}})
        client.execute(cleanup_kc=True, env=kernel_env())
    finally:
        shutil.rmtree(specs, ignore_errors=True)
    if probe is not None:
        nb.cells.remove(probe)
        ran = "".join(o.get("text", "") for o in probe.outputs).strip()
        if os.path.realpath(ran) != os.path.realpath(sys.executable):
            raise RuntimeError(f"{path}: the kernel ran {ran!r}, not this process's Python {sys.executable!r}")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def write(nb: Any, path: str | Path) -> None:
    import nbformat

    nbformat.write(nb, str(path))


_build_dir: str | None = None
_SECTION = re.compile(r"^<!-- readme-section: (.+?) -->$", re.M)


def readme_section(readme: str, title: str) -> str:
    """The body of README's section ``title`` (its heading left out), down to
    the next heading of its level or above outside a code block."""
    lines = readme.split("\n")
    start = level = None
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#+) (.*)$", line)
        if heading is None:
            continue
        if start is None and heading.group(2).strip() == title:
            start, level = i + 1, len(heading.group(1))
        elif start is not None and level is not None and len(heading.group(1)) <= level:
            return "\n".join(lines[start:i]).strip() + "\n"
    if start is None:
        raise ValueError(f"README.md has no section {title!r} (a docs page includes it)")
    return "\n".join(lines[start:]).strip() + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "<!-- readme-section:" not in markdown:
        return markdown
    readme = (Path(config.config_file_path).parent / "README.md").read_text(encoding="utf-8")
    return _SECTION.sub(lambda m: readme_section(readme, m.group(1)), markdown)



def on_files(files: Any, config: Any) -> Any:
    """Each tutorial's page is rendered from its executed copy."""
    global _build_dir
    given = os.environ.get("SIGNALPROP_DOCS_EXECUTED")
    for f in files:
        if not (f.src_uri.startswith(TUTORIALS) and f.src_uri.endswith(".ipynb")):
            continue
        name = f.src_uri[len(TUTORIALS):]
        if given:
            done = Path(given) / TUTORIALS / name
            if not done.exists():
                raise FileNotFoundError(f"SIGNALPROP_DOCS_EXECUTED={given} has no executed {TUTORIALS}{name}")
        else:
            if _build_dir is None:
                _build_dir = tempfile.mkdtemp(prefix="signalprop-docs-")
            done = Path(_build_dir) / TUTORIALS / name
            done.parent.mkdir(parents=True, exist_ok=True)
            work = Path(_build_dir) / "work" / name
            work.mkdir(parents=True, exist_ok=True)
            write(execute(f.abs_src_path, work), done)
        f.abs_src_path = str(done)  # mkdocs-jupyter renders (and offers for download) this file
    return files


def on_post_build(config: Any) -> None:
    global _build_dir
    if _build_dir is not None:
        shutil.rmtree(_build_dir, ignore_errors=True)
        _build_dir = None
