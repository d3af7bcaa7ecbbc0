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


def parse_line(line: str) -> tuple[str, str | None]:
    """-> (path, label text or None)."""
    if "\t" in line:
        path, label = line.rsplit("\t", 1)
        return path.strip(), label.strip()
    head, _, last = line.rpartition(" ")
    if head and _is_int(last):
        return head.strip(), last
    return line.strip(), None


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
    base = os.path.dirname(os.path.abspath(path))
    paths, texts = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            p, label = parse_line(line)
            paths.append(p if os.path.isabs(p) else os.path.join(base, p))
            texts.append(label)
            if (label is None) != (texts[0] is None):
                raise DataError(f"list file '{path}' line {n}: every line needs a label, or none does")
    if not paths:
        raise DataError(f"list file '{path}' names no image")
    if check_files:
        missing = rank_zero_computes(lambda: missing_files(paths))
        if missing:
            raise DataError(f"list file '{path}' names {len(missing)} missing file(s), e.g. '{missing[0]}'")
    if texts[0] is None:
        return ImageSource(path, paths=paths)
    if all(_is_int(t) for t in texts):
        labels = [int(t) for t in texts]
        return ImageSource(path, paths=paths, labels=labels, classes=check_classes(labels, read_classes(base), path))
    classes = sorted(set(texts))
    index = {c: i for i, c in enumerate(classes)}
    return ImageSource(path, paths=paths, labels=[index[t] for t in texts], classes=classes)
