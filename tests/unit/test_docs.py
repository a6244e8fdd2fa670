"""The documentation's own rules, checked in-process: every Python code block in docs/ is either
runnable (no marker, or ``<!-- run: np=N -->``; tests/system/test_docs_blocks.py runs them) or
marked ``<!-- not-run: REASON -->`` with a reason; the API reference lists every public name; the
training guide's combination table is the code's rule."""
import ast
import importlib.util
import os
import re

from hpc_dgrab.training.combinations import combinations_markdown
from tests.helpers import ROOT, doc_blocks, doc_python_blocks

GUIDE = os.path.join(ROOT, "docs", "guides", "training-cli.md")


def _hooks():
    path = os.path.join(ROOT, "scripts", "mkdocs_hooks.py")
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_have_python_blocks_to_run():
    blocks = doc_python_blocks()
    assert sum(b.marker != "not-run" for b in blocks) >= 5, [(b.path, b.line) for b in blocks]


def test_every_python_block_is_runnable_or_says_why_not():
    bad = []
    for b in doc_python_blocks():
        where = f"{b.path}:{b.line}"
        if b.marker_line and b.marker is None:
            bad.append(f"{where}: unreadable marker {b.marker_line.strip()!r}")
        elif b.marker == "not-run" and not b.arg:
            bad.append(f"{where}: <!-- not-run: --> needs a reason")
        elif b.marker == "run" and not re.fullmatch(r"np\s*=\s*[1-9]\d*", b.arg):
            bad.append(f"{where}: <!-- run: {b.arg} --> must be 'np=N'")
        elif b.marker != "not-run":
            try:
                ast.parse(b.code, where)
            except SyntaxError as exc:
                bad.append(f"{where}: runnable block does not parse: {exc}")
    assert not bad, "\n".join(bad)


def test_markers_stand_before_python_blocks():
    """A marker before a bash block (or anything but a Python fence) would be silently ignored."""
    misplaced = [f"{b.path}:{b.line}" for b in doc_blocks() if b.marker and b.lang not in ("python", "py")]
    assert not misplaced, misplaced


def test_api_reference_lists_every_public_name():
    import hpc_dgrab
    import hpc_dgrab.ddp

    hooks = _hooks()
    page = hooks.reference_page()
    for name in hpc_dgrab.__all__:
        assert f"::: {hpc_dgrab._EXPORTS[name]}.{name}\n" in page, name
    assert hooks.ddp_names() == list(hpc_dgrab.ddp.__all__)
    assert all(n in hooks.ddp_page() for n in hpc_dgrab.ddp.__all__)


def test_equations_become_mathml():
    page = '<p><span class="arithmatex">\\(x_i &lt; \\beta\\)</span></p>'
    out = _hooks().on_page_content(page, None, None, None)
    assert out.count("<math") == 1 and "arithmatex" not in out and "\\beta" not in out


def test_training_guide_table_is_the_codes_rule():
    with open(GUIDE, encoding="utf-8") as fh:
        assert combinations_markdown() in fh.read()


def test_readme_quickstart_is_the_tested_one():
    """The README's quickstart is not run itself: each of its lines is in the block of Getting
    started that tests/system/test_docs_blocks.py runs on 2 ranks."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    quick = text.split("```python\n", 1)[1].split("```", 1)[0]
    tested = [b for b in doc_python_blocks() if b.path == os.path.join("docs", "getting-started.md")
              and b.marker == "run"]
    assert tested, "docs/getting-started.md lost its runnable quickstart"
    missing = [ln for ln in quick.splitlines() if ln.strip() and ln not in tested[0].code.splitlines()]
    assert not missing, missing
