"""A list file: one image path per line, in the order given, with an optional label.

    images/a.jpg            unlabeled (every line, or none, carries a label)
    images/b.jpg<TAB>3      an integer label, or a class name after a TAB (names are sorted into classes)
    images/c.jpg 3          an integer label after the last space (a path may hold spaces)

Relative paths are relative to the list file's folder. Blank lines and lines starting with '#' are skipped.
Integer labels take their names from classes.txt beside the list, else '0'..'max'.
"""

from __future__ import annotations

import os
from collections import defaultdict

from ..folder import DataError, ImageSource, rank_zero_computes
from .common import check_classes, read_classes


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def parse_lines(text: str, where: str) -> tuple[list[str], list[str] | None]:
    """-> (paths as written, label texts or None). One pass of string methods per line: a million lines in a
    second or two, not a Python function call per line."""
    lines = [line for line in text.splitlines() if line and not line.isspace() and line.lstrip()[0] != "#"]
    sep = "\t" if "\t" in text else " "
    parts = [line.rpartition(sep) for line in lines]
    if sep == "\t":
        labeled = [p[1] == sep for p in parts]
    else:  # a space-separated label must be an integer (a path may hold spaces)
        labeled = [p[1] == sep and p[2].lstrip("-").isdigit() for p in parts]
    if all(labeled):
        return [p[0].strip() for p in parts], [p[2].strip() for p in parts]
    if any(labeled):
        n = labeled.index(not labeled[0])
        raise DataError(f"list file '{where}': '{lines[n][:80]}' breaks the rule that every line, or none, has a label")
    return [line.strip() for line in lines], None


def missing_files(paths: list[str]) -> list[str]:
    """The paths that do not exist, in order; one directory listing per distinct folder, not one stat per file."""
    by_folder: dict[str, set[str]] = defaultdict(set)
    for p in paths:
        by_folder[os.path.dirname(p)].add(os.path.basename(p))
    present: dict[str, set[str]] = {}
    for folder in by_folder:
        try:
            present[folder] = set(os.listdir(folder or "."))
        except OSError:
            present[folder] = set()
    return [p for p in paths if os.path.basename(p) not in present[os.path.dirname(p)]]


def read_list(path: str, check_files: bool = True) -> ImageSource:
    """The images a list file names. `check_files`: fail on a path that does not exist (rank 0 checks, under
    torch.distributed), naming it, rather than counting it as unreadable during training."""
    if not os.path.isfile(path):
        raise DataError(f"list file '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        written, texts = parse_lines(f.read(), path)
    base = os.path.join(os.path.dirname(os.path.abspath(path)), "")
    paths = [p if p[:1] == "/" else base + p for p in written]
    if not paths:
        raise DataError(f"list file '{path}' names no image")
    if check_files:
        missing = rank_zero_computes(lambda: missing_files(paths))
        if missing:
            raise DataError(f"list file '{path}' names {len(missing)} missing file(s), e.g. '{missing[0]}'")
    if texts is None:
        return ImageSource(path, paths=paths)
    if all(_is_int(t) for t in texts):
        labels = [int(t) for t in texts]
        classes = check_classes(labels, read_classes(os.path.dirname(base)), path)
        return ImageSource(path, paths=paths, labels=labels, classes=classes)
    classes = sorted(set(texts))
    index = {c: i for i, c in enumerate(classes)}
    return ImageSource(path, paths=paths, labels=[index[t] for t in texts], classes=classes)
