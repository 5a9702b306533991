"""What the tiny-model builders share: an all-or-nothing output folder and the command line."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out_dir: Path, name: str) -> Iterator[Path]:
    """Yields a folder to build in, beside `out_dir/name`; when the block succeeds it replaces
    that folder, so a reader never sees half a model. Files are made readable by every
    service user (safetensors writes its files owner-only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir))
    try:
        staging.chmod(0o755)
        yield staging
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        target = out_dir / name
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_command(
    argv: list[str] | None,
    description: str,
    name: str,
    marker: str,
    build: Callable[[Path, int], Path],
) -> None:
    """`--out DIR [--seed N] [--force]`: builds DIR/name unless DIR/name/marker exists."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="models folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild an existing model")
    args = parser.parse_args(argv)
    target = args.out / name
    if (target / marker).exists() and not args.force:
        print(f"{target}: exists, kept (--force rebuilds it)")
        return
    built = build(args.out, args.seed)
    size = sum(f.stat().st_size for f in built.rglob("*") if f.is_file())
    print(f"{built}: {description}, seed {args.seed}, {size / 1e6:.1f} MB")
