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

A public BEIR dataset by name (`data=beir data.name=scifact`, or a hub dataset id): `fetch_beir` makes a plain
BEIR folder of the hub's copy in the cache, with one hub call (`hub_snapshot`, huggingface_hub's
snapshot_download: it resumes an interrupted transfer), and a marker written last, so a folder without it is
never taken for complete.
"""
from __future__ import annotations

import gzip
import json
import os
import re
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
BEIR_ORG = "BeIR"  # a short name (scifact) is this organisation's dataset (BeIR/scifact; qrels: BeIR/scifact-qrels)
BEIR_FETCHED = ".fetched.json"  # written last into a fetched BEIR folder: its presence means complete


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


# --- a public BEIR dataset, by name ---------------------------------------------------------------------------

def beir_repo(name: str) -> str:
    """The hub dataset id of `data.name`: a short BEIR name (scifact) is BeIR's (BeIR/scifact); an id is itself."""
    name = str(name).strip().strip("/")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", name):
        raise ConfigError(f"data.name={name!r}: a BEIR dataset name (scifact) or a hub dataset id (BeIR/scifact), "
                          "letters, digits, '.', '_' and '-'; or set data.root=DIR to a BEIR folder on disk")
    return name if "/" in name else f"{BEIR_ORG}/{name}"


def hub_snapshot(repo_id: str, local_dir: Path, patterns: list[str]) -> Path:
    """The one hub call: the files of dataset `repo_id` matching `patterns`, into local_dir (resumed there)."""
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", local_dir=local_dir,
                                                  allow_patterns=patterns))


def _one(files: list[Path], what: str, repo: str) -> Path | None:
    if len(files) > 1:
        raise DownloadError(f"{repo} holds several {what} ({[str(f) for f in files]}); fetch the one you want by "
                            "hand and set data.root=DIR")
    return files[0] if files else None


def fetch_beir(name: str, into) -> Path:
    """`into` as a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) of hub dataset `name`
    (`beir_repo`), fetched once: a folder with its marker is returned as it is.

    The corpus and queries (`corpus.jsonl[.gz]`, `queries.jsonl[.gz]`: BeIR's layout) come from the dataset repo,
    decompressed; the qrels (`*.tsv`) from it too when it has them (a plain BEIR folder on the hub), else from
    `<repo>-qrels` (BeIR's). The hub's files wait in `.<name>.download` beside `into` (an interrupted fetch resumes
    there), the folder is built in `.<name>.partial`, its files are moved into `into` and the marker written last.
    """
    into = Path(into).absolute()
    marker = into / BEIR_FETCHED
    if marker.is_file():
        return into
    repo = beir_repo(name)
    rank = next((int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID") if os.environ.get(v)), 0)
    if rank:  # as ensure_files: one process fetches (run.py task=mine on one process first)
        raise DownloadError(f"rank {rank}: the BEIR dataset {repo} is not fetched into {into} yet; fetch it once "
                            f"first (python run.py task=mine data=beir data.name={name} on one process)")
    into.parent.mkdir(parents=True, exist_ok=True)
    staging, partial = into.parent / f".{into.name}.download", into.parent / f".{into.name}.partial"
    print(f"Fetching the BEIR dataset {repo} into {into}", file=sys.stderr)

    def snapshot(repo_id, folder, patterns):
        try:
            return hub_snapshot(repo_id, staging / folder, patterns)
        except Exception as e:  # noqa: BLE001 - its HTTP client (and so its errors) changes between hub versions
            raise DownloadError(f"cannot fetch the hub dataset {repo_id} (data.name={name}): {type(e).__name__}: "
                                f"{e}. Run again to resume, or put a BEIR folder on disk and set data.root=DIR"
                                ) from None

    got = snapshot(repo, "dataset", ["*corpus.jsonl", "*corpus.jsonl.gz", "*queries.jsonl", "*queries.jsonl.gz",
                                     "*.tsv"])
    files = {}
    for kind in ("corpus", "queries"):
        found = _one(sorted(got.rglob(f"{kind}.jsonl")), f"{kind}.jsonl files", repo) or \
            _one(sorted(got.rglob(f"{kind}.jsonl.gz")), f"{kind}.jsonl.gz files", repo)
        if found is None:
            raise DownloadError(f"the hub dataset {repo} (data.name={name}) has no {kind}.jsonl[.gz]: not a BEIR "
                                "dataset? Name one (scifact, nfcorpus, ... or a hub id), or set data.root=DIR")
        files[kind] = found
    qrels_repo, qrels = repo, sorted(got.rglob("*.tsv"))
    if not qrels:
        qrels_repo = f"{repo}-qrels"
        qrels = sorted(snapshot(qrels_repo, "qrels", ["*.tsv"]).rglob("*.tsv"))
    if not qrels:
        raise DownloadError(f"no qrels for {repo}: neither it nor {qrels_repo} holds <split>.tsv files; set "
                            "data.root=DIR to a BEIR folder with qrels/")
    if len({q.stem for q in qrels}) < len(qrels):
        raise DownloadError(f"{qrels_repo} holds several qrels files of one split name ({[str(q) for q in qrels]});"
                            " fetch the ones you want by hand and set data.root=DIR")

    shutil.rmtree(partial, ignore_errors=True)
    (partial / "qrels").mkdir(parents=True)
    for kind, src in files.items():
        dest = partial / f"{kind}.jsonl"
        if src.name.endswith(".gz"):
            try:
                with gzip.open(src, "rb") as f, open(dest, "wb") as out:
                    _copy(f, out, f"gunzip {src.name}")
            except (OSError, EOFError, zlib.error) as e:
                shutil.rmtree(staging, ignore_errors=True)  # a damaged transfer: fetched afresh next time
                raise DownloadError(f"cannot decompress {src.name} of {repo}: {e}; run again to fetch it afresh"
                                    ) from None
        else:
            shutil.copyfile(src, dest)
    for q in qrels:
        shutil.copyfile(q, partial / "qrels" / q.name)
    written = ["corpus.jsonl", "queries.jsonl", *(f"qrels/{q.name}" for q in qrels)]
    (into / "qrels").mkdir(parents=True, exist_ok=True)  # a folder task=mine wrote into (mined/) keeps its files
    for rel in written:
        os.replace(partial / rel, into / rel)
    (partial / BEIR_FETCHED).write_text(json.dumps({"repo": repo, "qrels_repo": qrels_repo, "files": written}))
    os.replace(partial / BEIR_FETCHED, marker)  # last: the folder is complete
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return into
