"""Carry an image folder to a machine without a network: pack it into one compressed file, unpack it there into
the same files, byte for byte.

    python benchmarks/pack_cifar10.py ../shared/data/cifar10 .gpu/cifar10.npz --check   # here: pack, verify
    python benchmarks/pack_cifar10.py --unpack .gpu/cifar10.npz /tmp/cifar10            # there: the folders again

Made for CIFAR-10 as mimkit reads it (`train/<class>/*.jpg`, `test/<class>/*.jpg`), but any folder works: every
file under SRC (hidden ones excepted) is stored under its relative path. The files are kept encoded (JPEG bytes,
not pixels), concatenated into one uint8 array with their offsets and relative paths, in `np.savez_compressed`.
A 32 px CIFAR JPEG is ~920 bytes of which ~620 are the header every file repeats (tables, JFIF), and deflate
stores that repetition almost for free: the 55.3 MB of the 60,000 CIFAR-10 files pack into ~18 MB, under the
device tool's 64 MiB working-tree limit with room for the code. `.gpu/` (the repo root) is git-ignored.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import sys
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np

MARKER = ".unpacked-from"  # in an unpacked folder: the digest of the pack it came from (a re-run skips the work)


def list_files(src: Path) -> list[str]:
    """Relative POSIX paths of the regular files under `src`, sorted; hidden files and folders are left out."""
    names = []
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            names.append(rel.as_posix())
    return sorted(names)


def pack(src: str | Path, out: str | Path) -> dict:
    """Every file of `src` into the .npz `out` (names, offsets (N + 1,), data: the bytes concatenated).
    -> {files, bytes (of the files), packed_bytes (of `out`)}."""
    src, out = Path(src), Path(out)
    names = list_files(src)
    if not names:
        raise SystemExit(f"pack_cifar10: '{src}' holds no files to pack")
    blobs = [(src / n).read_bytes() for n in names]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")  # savez appends .npz to names without it
    np.savez_compressed(tmp, names=np.array(names), offsets=offsets, data=data)
    tmp.replace(out)
    return {"files": len(names), "bytes": int(offsets[-1]), "packed_bytes": out.stat().st_size}


def _safe_name(name: str, pack_path: Path) -> PurePosixPath:
    """A stored path, refused if it could land outside the destination (absolute, '..')."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise SystemExit(f"pack_cifar10: '{pack_path}' names a file outside its folder: '{name}'")
    return p


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unpack(pack_path: str | Path, dest: str | Path) -> int:
    """Recreate the packed files under `dest`; -> the number of files. Skipped when `dest` already holds this
    pack's files (its marker names the pack's digest)."""
    pack_path, dest = Path(pack_path), Path(dest)
    digest = file_digest(pack_path)
    marker = dest / MARKER
    with np.load(pack_path, allow_pickle=False) as z:
        names, offsets = z["names"], z["offsets"]
        if marker.is_file() and marker.read_text().strip() == digest:
            return len(names)
        data = z["data"]
    if len(offsets) != len(names) + 1 or int(offsets[-1]) != data.size:
        raise SystemExit(f"pack_cifar10: '{pack_path}' is inconsistent (offsets do not cover the data)")
    for i, name in enumerate(names):
        target = dest / _safe_name(str(name), pack_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[offsets[i] : offsets[i + 1]].tobytes())
    marker.write_text(digest + "\n")
    return len(names)


def same_files(a: Path, b: Path) -> list[str]:
    """Relative paths whose bytes differ between folders `a` and `b`, or that only one of them holds."""
    names_a, names_b = set(list_files(a)), set(list_files(b))
    differ = sorted(names_a ^ names_b)
    differ += [n for n in sorted(names_a & names_b) if not filecmp.cmp(a / n, b / n, shallow=False)]
    return differ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="folder to pack (with --unpack: the .npz to unpack)")
    ap.add_argument("out", help="the .npz to write (with --unpack: the folder to recreate)")
    ap.add_argument("--unpack", action="store_true", help="unpack SRC (a pack) into the folder OUT")
    ap.add_argument("--check", action="store_true", help="after packing, unpack into a temporary folder and compare")
    ap.add_argument("--max-mb", type=float, default=50.0, help="fail when the pack is larger (MB, 10^6 bytes)")
    args = ap.parse_args(argv)
    if args.unpack:
        n = unpack(args.src, args.out)
        print(f"unpacked {n} files from '{args.src}' into '{args.out}'")
        return 0
    info = pack(args.src, args.out)
    print(f"packed {info['files']} files, {info['bytes'] / 1e6:.2f} MB, into '{args.out}': "
          f"{info['packed_bytes'] / 1e6:.2f} MB")  # fmt: skip
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            unpack(args.out, tmp)
            differ = same_files(Path(args.src), Path(tmp))
        if differ:
            print(f"pack_cifar10: {len(differ)} file(s) differ after unpacking, e.g. {differ[:3]}", file=sys.stderr)
            return 1
        print(f"checked: unpacking reproduces all {info['files']} files byte for byte")
    if info["packed_bytes"] > args.max_mb * 1e6:
        print(f"pack_cifar10: the pack is {info['packed_bytes'] / 1e6:.2f} MB, over --max-mb {args.max_mb}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
