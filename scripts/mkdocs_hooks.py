"""MkDocs hooks for the documentation site (mkdocs.yml names this file).

* The API reference pages are generated at build time: ``reference/hpc_dgrab.md`` documents every
  name of ``_EXPORTS`` in ``hpc_dgrab/__init__.py`` (the source of ``hpc_dgrab.__all__``), in its
  order, and ``reference/ddp.md`` every name of ``hpc_dgrab.ddp.__all__``. Both lists are read from
  the source with ``ast`` (nothing is imported), so a name added to either appears in the next build.
* Equations written as ``$...$`` / ``$$...$$`` (pymdownx.arithmatex, generic mode) are converted to
  MathML here, at build time, with latex2mathml: the pages render them without JavaScript and
  without loading anything from the network.
"""
import ast
import html
import os
import re
from typing import Any, Dict, List

from mkdocs.structure.files import File, Files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assigned(path: str, name: str) -> Any:
    """The literal value assigned to ``name`` at module level in ``path``."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else (
            node.target if isinstance(node, ast.AnnAssign) else None)
        if isinstance(target, ast.Name) and target.id == name and node.value is not None:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{path}: no literal assignment to {name}")


def exports() -> Dict[str, str]:
    """``hpc_dgrab._EXPORTS``: public name -> module that defines it, in source order."""
    return _assigned(os.path.join(ROOT, "hpc_dgrab", "__init__.py"), "_EXPORTS")


def ddp_names() -> List[str]:
    return list(_assigned(os.path.join(ROOT, "hpc_dgrab", "ddp.py"), "__all__"))


def reference_page() -> str:
    names = exports()
    lines = [
        "# API reference: `hpc_dgrab`",
        "",
        "Every public name of `import hpc_dgrab as hd` (`hd.__all__`), generated from the docstrings",
        "at build time. Importing `hpc_dgrab` initialises nothing; each name is loaded on first use.",
        "",
        "| name | defined in |",
        "|---|---|",
    ]
    lines += [f"| [`hd.{n}`](#{m}.{n}) | `{m}` |" for n, m in names.items()]
    lines.append("")
    for name, module in names.items():
        lines += [f"::: {module}.{name}", ""]
    return "\n".join(lines)


def ddp_page() -> str:
    members = ddp_names()
    lines = [
        "# API reference: `hpc_dgrab.ddp`",
        "",
        "Top-k and RegTop-k as communication hooks of torch's `DistributedDataParallel`",
        "(`import hpc_dgrab.ddp as hdd`), generated from the docstrings at build time.",
        "",
        "::: hpc_dgrab.ddp",
        "    options:",
        "      show_root_heading: false",
        f"      members: [{', '.join(members)}]",
        "",
    ]
    return "\n".join(lines)


def on_files(files: Files, config: Any) -> Files:
    for uri, content in (("reference/hpc_dgrab.md", reference_page()), ("reference/ddp.md", ddp_page())):
        files.append(File.generated(config, uri, content=content))
    return files


_MATH = re.compile(r'<(span|div) class="arithmatex">\s*\\([(\[])(.*?)\\[)\]]\s*</\1>', re.S)


def _to_mathml(match: "re.Match[str]") -> str:
    from latex2mathml.converter import convert

    display = "block" if match.group(2) == "[" else "inline"
    mathml = convert(html.unescape(match.group(3)).strip(), display=display)
    return f'<div class="math">{mathml}</div>' if display == "block" else mathml


def on_page_content(content: str, page: Any, config: Any, files: Any) -> str:
    return _MATH.sub(_to_mathml, content)
