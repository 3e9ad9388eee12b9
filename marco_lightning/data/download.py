"""Fetch the official data files into `data.root` when they are missing.

A data config may carry `downloads: {file name: url}` (conf/data/msmarco.yaml does). `ensure_files(cfg.data)`
downloads each listed file that one of the config's paths points at (`${data.root}/<file name>`) and that is not
there yet; a path overridden to elsewhere is never downloaded. How a URL becomes the file:
- `.tar.gz`/`.tgz` and the file name is not an archive: the member of that name (any folder inside) is extracted;
  several files from one archive share one download, and the archive is deleted afterwards;
- `.gz` and the file name does not end in `.gz`: decompressed;
- otherwise: the file itself.
Downloads stream into `<name>.part` and are renamed when complete and of the announced size, so a file under
its real name is always whole; a `.part` left by an interrupted download is resumed with an HTTP Range request
when the server allows it (otherwise it starts over).
"""
from __future__ import annotations

import gzip
import http.client
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

CHUNK = 1 << 20
TIMEOUT_S = 60


class DownloadError(RuntimeError):
    pass


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return dict(cfg)


def _paths(value) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return [str(v) for v in value if isinstance(v, (str, os.PathLike))]
    return []


def missing_downloads(data_cfg, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
    """{url: [file names]} of the `downloads` the config's paths (of `keys`, default all) need and lack."""
    data = _plain(data_cfg)
    downloads = data.get("downloads") or {}
    if not downloads:
        return {}
    if data.get("root") is None:
        raise ValueError("data.downloads needs data.root: the folder the files are downloaded into")
    root = Path(data["root"]).absolute()
    keys = [k for k in data if k not in ("root", "name", "downloads")] if keys is None else list(keys)
    wanted = {os.path.normpath(Path(p).absolute()) for k in keys for p in _paths(data.get(k))}
    todo: dict[str, list[str]] = {}
    for name, url in downloads.items():
        target = root / name
        if os.path.normpath(target) in wanted and not target.exists():
            todo.setdefault(str(url), []).append(name)
    return todo


def ensure_files(data_cfg, keys: Iterable[str] | None = None) -> list[Path]:
    """Download what `missing_downloads` lists into data.root; return the files written."""
    todo = missing_downloads(data_cfg, keys)
    if not todo:
        return []
    root = Path(_plain(data_cfg)["root"]).absolute()
    # Only one process downloads: Lightning's DDP launcher starts the other ranks after rank 0 got here, so
    # they find the files; ranks started together (SLURM) would race on the same .part files.
    rank = next((int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID") if os.environ.get(v)), 0)
    if rank:
        names = [n for ns in todo.values() for n in ns]
        raise DownloadError(f"rank {rank}: {names} missing in data.root={root}; download them once first "
                            "(python run.py task=prepare data=... on one process)")
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for url, names in todo.items():
        written += fetch(url, root, names)
    return written


def _kind(url: str, name: str) -> str:
    path = urlparse(url).path.lower()
    if path.endswith((".tar.gz", ".tgz")) and not name.lower().endswith((".tar.gz", ".tgz")):
        return "tar"
    if path.endswith(".gz") and not name.lower().endswith(".gz"):
        return "gunzip"
    return "file"


def fetch(url: str, root: Path, names: list[str]) -> list[Path]:
    """Make root/<name> for each name from one URL (see the module docstring)."""
    kinds = {_kind(url, n) for n in names}
    if len(kinds) > 1 or (kinds != {"tar"} and len(names) > 1):
        raise ValueError(f"data.downloads: {names} share the URL {url} but it is not a tar archive")
    kind = kinds.pop()
    if kind == "file":
        download(url, root / names[0])
        return [root / names[0]]
    archive = root / PurePosixPath(urlparse(url).path).name
    had_archive = archive.exists()
    download(url, archive)
    if kind == "tar":
        extract(archive, root, names, url)
    else:
        try:
            with gzip.open(archive, "rb") as src, _atomic(root / names[0]) as f:
                _copy(src, f, f"gunzip {archive.name}")
        except (OSError, EOFError, zlib.error) as e:
            raise DownloadError(f"cannot decompress {archive} ({url}): {e}; delete it to download it again") from None
    if not had_archive:  # only a carrier: the extracted files are what the config reads
        archive.unlink()
    return [root / n for n in names]


def download(url: str, dest: Path) -> Path:
    """Stream url to dest via dest.part, resuming a partial .part with a Range request; verify the size."""
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "marco-lightning"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    print(f"Downloading {url} -> {dest}" + (f" (resuming at {offset:,} bytes)" if offset else ""), file=sys.stderr)
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        total = _content_range(e.headers.get("Content-Range"))[1] if e.code == 416 else None
        if e.code == 416 and total == offset:  # the .part was complete already
            os.replace(part, dest)
            return dest
        if e.code == 416:  # a .part that does not fit the file on the server: start over
            part.unlink()
            return download(url, dest)
        raise DownloadError(f"cannot download {url} -> {dest}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url} -> {dest}: {reason}. Check the network, or put the file there "
                            f"by hand (data.root={dest.parent})") from None
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(f"{url}: asked for bytes from {offset}, the server sent from {start}")
            mode = "ab"
        else:  # 200: the server ignored the Range header (or there was none): from the start
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        if total is not None:
            free = shutil.disk_usage(dest.parent).free
            if total - offset > free:
                raise DownloadError(f"{url} needs {(total - offset) / 1e9:.1f} GB in {dest.parent}, "
                                    f"{free / 1e9:.1f} GB are free")
        try:
            with open(part, mode) as f:
                _copy(response, f, dest.name, total, offset)
        except (OSError, http.client.HTTPException) as e:  # a dropped connection: the next run resumes the .part
            raise DownloadError(f"downloading {url} -> {dest} broke off at {part.stat().st_size:,} bytes ({e}); "
                                f"run again to resume from {part}") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"downloading {url} -> {dest}: got {size:,} of {total:,} bytes; run again to resume "
                            f"from {part}")
    os.replace(part, dest)
    return dest


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of `bytes 100-199/1000` or `bytes */1000`."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = None if span == "*" else int(span.split("-")[0])
    return start, None if total in ("", "*") else int(total)


def _copy(src, dst, desc: str, total: int | None = None, initial: int = 0) -> None:
    from tqdm import tqdm

    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   file=sys.stderr, mininterval=1) as bar:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            bar.update(len(chunk))


@contextmanager
def _atomic(dest: Path):
    """A file to write dest through: dest.part, renamed to dest on success, deleted on failure."""
    part = dest.with_name(dest.name + ".part")
    try:
        with open(part, "wb") as f:
            yield f
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def extract(archive: Path, root: Path, names: list[str], url: str = "") -> None:
    """Extract the members named `names` (by their base name, in any folder) of a tar.gz into root."""
    wanted = set(names)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in wanted:
                    with tar.extractfile(member) as src, _atomic(root / name) as f:
                        _copy(src, f, f"extract {name}", member.size)
                    wanted.discard(name)
                    if not wanted:
                        break
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DownloadError(f"cannot extract {sorted(wanted)} from {archive} ({url}): {e}; delete the archive to "
                            "download it again") from None
    if wanted:
        raise DownloadError(f"{archive} ({url}) has no member(s) {sorted(wanted)}: check data.downloads")
