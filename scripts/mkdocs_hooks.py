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


def _summaries(names: Dict[str, str]) -> Dict[str, str]:
    """First sentence of each name's docstring, read statically with griffe (as mkdocstrings does)."""
    try:
        import griffe

        pkg = griffe.load("hpc_dgrab", search_paths=[ROOT], resolve_aliases=True)
    except Exception:  # the reference below still renders; only the summary column stays empty
        return {}
    out = {}
    for name, module in names.items():
        try:
            obj = pkg[module[len("hpc_dgrab."):] + "." + name if module != "hpc_dgrab" else name]
            doc = obj.docstring.value if obj.docstring else ""
        except Exception:
            doc = ""
        first = " ".join(doc.strip().split("\n\n")[0].split()).split(". ")[0].rstrip(".")
        out[name] = _ROLE_MD.sub(r"`\1`", first)
    return out


def _inline_html(text: str) -> str:
    """``code`` and `code` spans of a docstring line as HTML (everything else escaped)."""
    parts = re.split(r"``?([^`]+)``?", text)
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def reference_page() -> str:
    names = exports()
    summary = _summaries(names)
    lines = [
        "# API reference: `hpc_dgrab`",
        "",
        "Every public name of `import hpc_dgrab as hd` (`hd.__all__`), generated from the docstrings",
        "at build time. Importing `hpc_dgrab` initialises nothing; each name is loaded on first use.",
        "The contracts of the modules that define them follow the names.",
        "",
        '<table class="hd-summary"><thead><tr><th>name</th><th>summary</th></tr></thead><tbody>',
    ]
    lines += [f'<tr><td><a href="#{m}.{n}"><code>hd.{n}</code></a></td>'
              f'<td>{_inline_html(summary.get(n, ""))}</td></tr>' for n, m in names.items()]
    lines += ["</tbody></table>", ""]
    for name, module in names.items():
        lines += [f"::: {module}.{name}", ""]
    lines += ["## Module contracts", ""]
    for module in dict.fromkeys(names.values()):
        lines += [f"::: {module}", "    options:", "      members: false", "      show_root_full_path: true",
                  "      heading_level: 3", ""]
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


#: Sphinx cross-reference roles in docstrings (:func:`x`, :class:`~a.b.C`): shown as plain code
_ROLE_MD = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`~?([^`]*)`")
_ROLE_HTML = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):(<code>)(~[\w.]*\.)?")
_MATH = re.compile(r'<(span|div) class="arithmatex">\s*\\([(\[])(.*?)\\[)\]]\s*</\1>', re.S)


def _to_mathml(match: "re.Match[str]") -> str:
    from latex2mathml.converter import convert

    display = "block" if match.group(2) == "[" else "inline"
    mathml = convert(html.unescape(match.group(3)).strip(), display=display)
    return f'<div class="math">{mathml}</div>' if display == "block" else mathml


def on_page_content(content: str, page: Any, config: Any, files: Any) -> str:
    return _ROLE_HTML.sub(r"\1", _MATH.sub(_to_mathml, content))
