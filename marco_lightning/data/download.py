"""Fetch the official data files into `data.root` when they are missing.

A data config may carry `downloads: {file name: url}` (conf/data/msmarco.yaml does); an entry may also be
`{url: ..., sha256: ...}`, the sha256 of what the URL serves (the archive, for a member of one), checked before
the file is used. `ensure_files(cfg.data)` downloads each listed file that one of the config's paths points at
(`${data.root}/<file name>`) and that is not there yet; a path overridden to elsewhere is never downloaded.
How a URL becomes the file:
- `.tar.gz`/`.tgz` and the file name is not an archive: the member of that name (any folder inside) is extracted;
  several files from one archive share one download, and the archive is deleted afterwards;
- `.gz` and the file name does not end in `.gz`: decompressed;
- otherwise: the file itself.
The transfer is left to kept libraries: `huggingface_hub.hf_hub_download` for huggingface.co `/resolve/` URLs
(it resumes an interrupted download), `pooch` for all others (it logs the sha256 of what it fetched, to copy
into the config). pooch does not resume: an interrupted download starts over next run, the price of not
keeping an HTTP client here. Both write a temporary file and rename it, as the extraction does, so a file
under its real name is always whole.
"""
from __future__ import annotations

import gzip
import os
import shutil
import sys
import tarfile
import zlib
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from marco_lightning.errors import ConfigError, UserError

CHUNK = 1 << 20
TIMEOUT_S = 60
HF_STAGING = ".hf-download"  # hf_hub_download's local_dir in data.root: its partial files resume from there


class DownloadError(UserError, RuntimeError):
    """A file could not be fetched; the message says what to do (run again, put the file there by hand, check
    data.downloads)."""


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


def _source(name: str, entry) -> tuple[str, str | None]:
    """(url, sha256 or None) of a `downloads` entry: a URL, or {url: ..., sha256: ...}."""
    if isinstance(entry, Mapping):
        if not entry.get("url"):
            raise ConfigError(f"data.downloads.{name} needs a url: give {{url: URL, sha256: ...}} or a plain URL "
                              "string")
        return str(entry["url"]), entry.get("sha256")
    return str(entry), None


def missing_downloads(data_cfg, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
    """{url: [file names]} of the `downloads` the config's paths (of `keys`, default all) need and lack."""
    data = _plain(data_cfg)
    downloads = data.get("downloads") or {}
    if not downloads:
        return {}
    if data.get("root") is None:
        raise ConfigError("data.downloads needs data.root: set data.root=DIR, the folder the files are downloaded into")
    root = Path(data["root"]).absolute()
    keys = [k for k in data if k not in ("root", "name", "downloads")] if keys is None else list(keys)
    wanted = {os.path.normpath(Path(p).absolute()) for k in keys for p in _paths(data.get(k))}
    todo: dict[str, list[str]] = {}
    for name, entry in downloads.items():
        target = root / name
        if os.path.normpath(target) in wanted and not target.exists():
            todo.setdefault(_source(name, entry)[0], []).append(name)
    return todo


def ensure_files(data_cfg, keys: Iterable[str] | None = None) -> list[Path]:
    """Download what `missing_downloads` lists into data.root; return the files written."""
    todo = missing_downloads(data_cfg, keys)
    if not todo:
        return []
    data = _plain(data_cfg)
    root = Path(data["root"]).absolute()
    # Only one process downloads: Lightning's DDP launcher starts the other ranks after rank 0 got here, so
    # they find the files; ranks started together (SLURM) would race on the same files.
    rank = next((int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID") if os.environ.get(v)), 0)
    if rank:
        names = [n for ns in todo.values() for n in ns]
        raise DownloadError(f"rank {rank}: {names} missing in data.root={root}; download them once first "
                            "(python run.py task=prepare data=... on one process)")
    hashes: dict[str, set] = {}
    for name, entry in data["downloads"].items():
        url, sha256 = _source(name, entry)
        if sha256:
            hashes.setdefault(url, set()).add(sha256.lower())
    if clash := {u: h for u, h in hashes.items() if len(h) > 1}:
        raise ConfigError(f"data.downloads: different sha256 for one URL: {clash}; give each URL one sha256")
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for url, names in todo.items():
        written += fetch(url, root, names, next(iter(hashes.get(url, [None]))))
    return written


def _kind(url: str, name: str) -> str:
    path = urlparse(url).path.lower()
    if path.endswith((".tar.gz", ".tgz")) and not name.lower().endswith((".tar.gz", ".tgz")):
        return "tar"
    if path.endswith(".gz") and not name.lower().endswith(".gz"):
        return "gunzip"
    return "file"


def fetch(url: str, root: Path, names: list[str], sha256: str | None = None) -> list[Path]:
    """Make root/<name> for each name from one URL (see the module docstring)."""
    kinds = {_kind(url, n) for n in names}
    if len(kinds) > 1 or (kinds != {"tar"} and len(names) > 1):
        raise ConfigError(f"data.downloads: {names} share the URL {url} but it is not a tar archive; give each file "
                          "its own URL")
    kind = kinds.pop()
    if kind == "file":
        download(url, root / names[0], sha256)
        return [root / names[0]]
    archive = root / PurePosixPath(urlparse(url).path).name
    had_archive = archive.exists()
    download(url, archive, sha256, names)
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


def _hf_file(url: str) -> dict | None:
    """hf_hub_download's arguments for https://huggingface.co/[datasets/|spaces/]<repo>/resolve/<rev>/<path>."""
    u = urlparse(url)
    if u.hostname != "huggingface.co" or "/resolve/" not in u.path:
        return None
    repo, _, rest = u.path.strip("/").partition("/resolve/")
    revision, _, filename = rest.partition("/")
    kind, _, name = repo.partition("/")
    repo_type = {"datasets": "dataset", "spaces": "space"}.get(kind)
    return {"repo_id": name if repo_type else repo, "repo_type": repo_type or "model",
            "revision": unquote(revision), "filename": unquote(filename)}


def download(url: str, dest: Path, sha256: str | None = None, names: Iterable[str] = ()) -> Path:
    """url to dest (atomically), checked against sha256 if given; `names`: the files it carries, for errors."""
    import pooch

    if dest.exists() and (not sha256 or pooch.file_hash(str(dest)) == sha256.lower()):
        return dest  # an archive put there by hand (otherwise both routes below replace it)
    what = f"{url} -> {dest}" + (f" (for {', '.join(names)})" if names else "")
    hf = _hf_file(url)
    if hf is None:
        import requests

        downloader = pooch.HTTPDownloader(progressbar=True, chunk_size=CHUNK, timeout=TIMEOUT_S)
        try:
            pooch.retrieve(url, known_hash=sha256, fname=dest.name, path=dest.parent, downloader=downloader)
        except requests.HTTPError as e:
            raise DownloadError(f"cannot download {what}: HTTP {e.response.status_code} {e.response.reason}") from None
        except (requests.RequestException, OSError) as e:  # no network, a dropped connection, a full disk
            raise DownloadError(f"cannot download {what}: {e}. Run again to start over (a partial download is "
                                f"not kept), or put the file there by hand (data.root={dest.parent})") from None
        except ValueError as e:  # pooch: the sha256 does not match (it deleted the download)
            raise DownloadError(f"checksum mismatch for {what}: {e} Check data.downloads (url, sha256).") from None
        return dest
    from huggingface_hub import hf_hub_download

    print(f"Downloading {what}", file=sys.stderr)
    staging = dest.parent / HF_STAGING
    try:
        got = Path(hf_hub_download(**hf, local_dir=staging))
    except Exception as e:  # noqa: BLE001 - its HTTP client (and so its errors) changes between hub versions
        raise DownloadError(f"cannot download {what}: {type(e).__name__}: {e}. Run again to resume, or put the "
                            f"file there by hand (data.root={dest.parent})") from None
    if sha256 and (actual := pooch.file_hash(str(got))) != sha256.lower():
        got.unlink()
        raise DownloadError(f"checksum mismatch for {what}: sha256 {actual}, expected {sha256}; the download was "
                            "deleted. Check data.downloads (url, sha256).")
    os.replace(got, dest)
    shutil.rmtree(staging, ignore_errors=True)  # only hf's bookkeeping is left there
    return dest


def _copy(src, dst, desc: str, total: int | None = None) -> None:
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
              mininterval=1) as bar:
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
