"""The one content hash of a file that bigexp records and checks (checkpoint manifests, .beton records).

sha256: 260 MB/s on this 2-core Xeon (SHA-NI) against 152 MB/s for blake2b, measured on a 100 MiB file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

_CHUNK = 8 << 20


def file_sha256(path, *, progress: bool = False, desc: Optional[str] = None) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks; a byte progress bar when `progress`."""
    from tqdm import tqdm  # only when hashing (keeps `import bigexp.data` cheap)

    h = hashlib.sha256()
    path = Path(path)
    with open(path, "rb") as fh, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc or path.name,
                                      disable=not progress) as bar:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()
