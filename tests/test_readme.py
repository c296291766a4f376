"""The README's and the docs' Python examples run as written, and their relative links resolve.

Every ```python block of README.md and docs/*.md runs, in a fresh namespace, in the default test run; keep them to
seconds on CPU and offline. A block that cannot run that way is marked by an HTML comment on the line right before
its fence, ``<!-- not-run: why -->``, and is reported as skipped with that reason (keep such blocks rare).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RUN_FILES = [README, *DOCS]  # whose Python blocks run
LINK_FILES = [README, *sorted((ROOT / "docs").rglob("*.md")), ROOT / "bench" / "README.md"]  # whose links resolve

NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$", flags=re.M)


def python_blocks(path: Path) -> list[tuple[str, str, str | None]]:
    """``(id, code, not_run_reason)`` for each ```python block of ``path``, in order."""
    text = path.read_text()
    blocks = []
    for match in re.finditer(r"```python\n(.*?)^```", text, flags=re.S | re.M):
        line_before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.fullmatch(line_before.strip())
        name = f"{path.relative_to(ROOT)}[python block {len(blocks)}]"
        blocks.append((name, match.group(1), marker.group("reason") if marker else None))
    return blocks


BLOCKS = [block for path in RUN_FILES for block in python_blocks(path)]


def test_readme_has_examples():
    assert len([b for b in BLOCKS if b[0].startswith("README.md")]) >= 2


@pytest.mark.parametrize(("name", "code", "not_run"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_example_runs(name, code, not_run):
    if not_run is not None:
        pytest.skip(f"not-run: {not_run}")
    exec(compile(code, name, "exec"), {"__name__": "doc_example"})


def test_not_run_markers_have_a_reason_and_a_python_block():
    for path in RUN_FILES:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            marker = NOT_RUN.search(line)
            if marker is None:
                continue
            where = f"{path.relative_to(ROOT)}:{number + 1}"
            assert marker.group("reason"), f"{where}: a not-run marker needs a reason"
            assert number + 1 < len(lines) and lines[number + 1] == "```python", (
                f"{where}: a not-run marker goes on the line right before a ```python fence"
            )


def github_anchor(title: str) -> str:
    """The fragment GitHub gives a heading: a link's text, lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text())):
        anchor = github_anchor(match.group("title"))
        count = found.get(anchor, 0)
        found[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # links inside code blocks are code, not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m.group("target") for m in LINK.finditer(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", m.group("target"))]


@pytest.mark.parametrize("path", LINK_FILES, ids=[str(p.relative_to(ROOT)) for p in LINK_FILES])
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved})")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.relative_to(ROOT)})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: " + ", ".join(broken)


def test_link_check_sees_links_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title: with `code`, and more\n\n## Vim's help files\n\n[x](page.md#vims-help-files)\n")
    assert relative_links(page) == ["page.md#vims-help-files"]
    assert anchors(page) == {"a-title-with-code-and-more", "vims-help-files"}


def test_readme_quickstart_test_command_matches_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README.read_text()
    assert "\npython -m pytest -q\n" in ci
