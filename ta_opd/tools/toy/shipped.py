"""The toy pair shipped with the package: ``assets/<key>/``, the default ToySpec's build.

The build is pinned (``ta_opd.tools.toy.build``), yet two machines of the same kind still built
pairs whose student accuracy differed by 0.013 greedy / 0.020 sampled (issue 18), so every number
in docs/toy.md would depend on the machine. The package therefore ships one built pair (~2 MB:
teacher/ and student/ Hugging Face folders, data/*.parquet, manifest.json) and the default run
loads it: same weights everywhere, no build. ``python -m ta_opd.tools.toy.build --ship`` rebuilds
the default spec and replaces the shipped folder (the recipe that made it).

``manifest.json`` is the build's, plus ``files``: the SHA-256 of every other file of the folder,
checked on every load so a damaged or edited install fails loudly instead of training on it.
The folder is read-only input: nothing writes into it at run time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
MANIFEST = "manifest.json"


class ShippedPairError(RuntimeError):
    """The shipped pair's files do not match its manifest."""


def file_hashes(root: Path) -> dict[str, str]:
    """{path relative to ``root``: SHA-256} of every file under ``root`` except the manifest."""
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != MANIFEST}


def check(root: Path) -> dict:
    """The manifest of the pair at ``root`` after checking that its files are exactly the
    manifest's ``files`` (no file missing, added or changed)."""
    manifest = json.loads((root / MANIFEST).read_text())
    want, got = manifest.get("files"), file_hashes(root)
    if want != got:
        diff = sorted(k for k in set(want or {}) | set(got) if (want or {}).get(k) != got.get(k))
        raise ShippedPairError(f"the shipped toy pair at {root} does not match its manifest (files differing, "
                               f"missing or added: {', '.join(diff)}); reinstall the package, or re-ship it "
                               "with: python -m ta_opd.tools.toy.build --ship")
    return manifest


def find(key: str, assets: Path = ASSETS) -> Path | None:
    """The shipped pair's folder for the cache key ``key``, or None when none is shipped for it."""
    root = assets / key
    return root if (root / MANIFEST).is_file() else None


def ship(built: Path, assets: Path = ASSETS) -> Path:
    """Copy the built pair at ``built`` into ``assets/<key>/`` with its file hashes, replacing
    every previously shipped pair (one default spec, one shipped pair)."""
    manifest = json.loads((built / MANIFEST).read_text())
    assets.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shipping-", dir=assets))
    try:
        for part in ("teacher", "student", "data"):
            shutil.copytree(built / part, tmp / part)
        for f in [tmp, *tmp.rglob("*")]:  # readable by every user of a shared install (mkdtemp and
            f.chmod(0o755 if f.is_dir() else 0o644)  # safetensors create theirs 0700 / 0600)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": file_hashes(tmp)}, indent=2) + "\n")
        check(tmp)
        for old in assets.iterdir():
            if old.is_dir() and old != tmp:
                shutil.rmtree(old)
        dest = assets / manifest["key"]
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
