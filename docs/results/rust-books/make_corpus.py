"""Build the Rust-books corpus of this folder: English technical prose from the books rustup installs.

    python docs/results/rust-books/make_corpus.py /tmp/corpus_rustbooks

Each mdBook's ``print.html`` (the whole book on one page) is reduced to the text of its ``<main>`` element
(no sidebar, scripts, styles or buttons), blank-line runs are squeezed, and the text is cut at paragraph breaks
into documents of about 16 kB; the release notes (``releases.md``) are cut the same way. `switchformer`'s data
pipeline would cut whole books too (``cut_long_documents``, at line breaks, 64 kB by default), so the pieces here
are not needed for a validation split of several books; they are kept because the runs in this folder were
trained on exactly these documents (412 of them).
"""

from __future__ import annotations

import argparse
import html.parser
from pathlib import Path

DEFAULT_DOCS = Path.home() / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html"
BOOKS = (
    "unstable-book", "rust-by-example", "book", "nomicon", "reference", "edition-guide", "embedded-book", "cargo",
    "rustc", "rustdoc", "style-guide",
)  # fmt: skip
BLOCK_TAGS = {
    "p", "div", "pre", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "table", "ul", "ol", "blockquote",
    "dt", "dd",
}  # fmt: skip
SKIPPED_TAGS = {"script", "style", "button"}
DOCUMENT_CHARS = 16_000


class MainText(html.parser.HTMLParser):
    """Collects the text inside ``<main>``, with a line break around every block element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.main_depth = 0
        self.skip_depth = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._enter_or_leave(tag, +1)

    def handle_endtag(self, tag: str) -> None:
        self._enter_or_leave(tag, -1)

    def _enter_or_leave(self, tag: str, step: int) -> None:
        if tag == "main":
            self.main_depth += step
        if tag in SKIPPED_TAGS:
            self.skip_depth += step
        if self.main_depth and tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.main_depth and not self.skip_depth:
            self.parts.append(data)


def book_text(print_html: Path) -> str:
    parser = MainText()
    parser.feed(print_html.read_text(errors="replace"))
    kept, blank_run = [], 0
    for line in "".join(parser.parts).splitlines():
        line = line.rstrip()
        blank_run = blank_run + 1 if not line.strip() else 0
        if blank_run <= 1:
            kept.append(line)
    return "\n".join(kept).strip() + "\n"


def split_documents(text: str) -> list[str]:
    """Consecutive paragraphs grouped until a group holds ``DOCUMENT_CHARS`` characters."""
    documents, group, size = [], [], 0
    for paragraph in text.split("\n\n"):
        group.append(paragraph)
        size += len(paragraph)
        if size >= DOCUMENT_CHARS:
            documents.append("\n\n".join(group) + "\n")
            group, size = [], 0
    if group:
        documents.append("\n\n".join(group) + "\n")
    return documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="folder to write the documents to (created)")
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="rustup's share/doc/rust/html folder")
    args = parser.parse_args()
    sources = {book: book_text(args.docs / book / "print.html") for book in BOOKS}
    sources["releases"] = (args.docs / "releases.md").read_text(errors="replace")
    args.output.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, text in sorted(sources.items()):
        for index, document in enumerate(split_documents(text)):
            (args.output / f"{name}-{index:04d}.txt").write_text(document)
            count += 1
    print(f"{count} documents in {args.output}")


if __name__ == "__main__":
    main()
