"""The package's layout as a table, from the code itself: one row per block (bottom to top, the order in which
blocks may import each other) with its modules and the first sentence of each docstring.

    python scripts/layout.py            # rewrite the table in docs/architecture.md
    python scripts/layout.py --check    # exit 1 when the page's table is not the code's
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_layout import ORDER  # noqa: E402 - the one list of blocks, checked by the tests

PAGE = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- layout:begin (scripts/layout.py) -->", "<!-- layout:end -->"


def first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    return text.split(". ")[0].rstrip(".").replace("|", "/")


def table() -> str:
    rows = ["| block | what it holds | modules |", "| --- | --- | --- |"]
    package = ROOT / "onnxprune"
    for block in ORDER:
        folder, single = package / block, package / f"{block}.py"
        if folder.is_dir():
            what = first_sentence(folder / "__init__.py")
            mods = sorted(p for p in folder.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
            names = ", ".join(f"`{p.relative_to(folder).with_suffix('').as_posix()}`" for p in mods)
            rows.append(f"| `{block}/` | {what} | {names} |")
        else:
            rows.append(f"| `{block}.py` | {first_sentence(single)} | |")
    gibbs = ROOT / "onnxprune_gibbs"
    mods = ", ".join(f"`{p.stem}`" for p in sorted(gibbs.glob("*.py")) if p.name != "__init__.py")
    rows.append(f"| `onnxprune_gibbs/` (its own package) | {first_sentence(gibbs / '__init__.py')} | {mods} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = PAGE.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = text[:start] + "\n" + table() + "\n" + text[end:]
    if args.check:
        return 0 if new == text else 1
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
