"""Every runnable Python code block of docs/ runs and exits 0: a block marked
``<!-- run: np=N -->`` under ``launch/local -n N``, an unmarked one as one process. Blocks marked
``<!-- not-run: REASON -->`` are skipped (tests/unit/test_docs.py checks the markers). Each block
runs in its own empty directory. About 1-2 minutes on 2 busy cores."""
import pytest

from tests.helpers import doc_python_blocks, run_cmd

BLOCKS = [b for b in doc_python_blocks() if b.marker != "not-run"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.path}:{b.line}" for b in BLOCKS])
def test_doc_block_runs(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block.code)
    proc = run_cmd([str(script)], ranks=block.ranks, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, f"{block.path}:{block.line} failed:\n{proc.stdout}\n{proc.stderr}"
