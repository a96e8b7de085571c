"""Check that every Markdown link in docs/ and README.md, and every `docs/<page>.md#anchor` pointer
in code comments, stages.yaml and configs/, resolves to a file and (when given) a heading anchor.

    python scripts/check_doc_links.py [REPO_ROOT]
"""

import re
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces -> '-')."""
    out, in_code = set(), False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m and not in_code:
            text = m.group(1).strip().lower()
            text = re.sub(r"[^\w\- ]", "", text)  # GitHub: drop punctuation except - and _
            out.add(text.replace(" ", "-"))
    return out


problems: list[str] = []
checked = 0


def check(src: Path, target: str, base: Path) -> None:
    global checked
    if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
        return
    path, _, anchor = target.partition("#")
    dest = (base / path).resolve() if path else src.resolve()
    checked += 1
    if not dest.exists():
        problems.append(f"{src}: {target}: no such file {dest}")
        return
    if anchor:
        if dest.suffix != ".md":
            problems.append(f"{src}: {target}: anchor on a non-Markdown file")
            return
        if anchor not in anchors(dest):
            problems.append(f"{src}: {target}: no heading with anchor #{anchor} in {dest.name}")


md_files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
for md in md_files:
    text = md.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        check(md, target, md.parent)

# docs pointers in code comments/docstrings and config files: docs/<page>.md[#anchor], relative to root
code = [
    *root.glob("theworld_core/**/*.py"),
    *root.glob("flows/*.py"),
    root / "stages.yaml",
    *root.glob("configs/**/*.json"),
    root / "docs" / "_pointers_todo.md",
]
for f in (c for c in code if c.exists()):
    for target in re.findall(r"docs/[A-Za-z_]+\.md(?:#[a-z0-9\-]+)?", f.read_text()):
        check(f, target, root)
print(f"{checked} links checked")
print("\n".join(problems) or "all resolve")
sys.exit(1 if problems else 0)
