"""data.downloads: files fetched from a local HTTP server (127.0.0.1, a thread of the test; nothing leaves the
machine) through pooch: download, atomic rename, checksums, archive extraction, clear errors; huggingface.co
URLs go to hf_hub_download (faked); a public BEIR dataset by name through snapshot_download (faked by a local
folder shaped like the hub's repos)."""
import gzip
import hashlib
import io
import json
import shutil
import socket
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import compose, run_cli

from marco_lightning.data import download
from marco_lightning.data.download import DownloadError, ensure_files, missing_downloads
from marco_lightning.errors import ConfigError

PAYLOAD = b"".join(b"%d\t0\t%d\t1\n" % (i, 7 * i) for i in range(20_000))  # ~250 kB of qrels


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder, records (path, Range header) of each request; can cut a response short."""

    def log_message(self, *args):
        pass

    def send_head(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        try:
            data = Path(self.translate_path(self.path)).read_bytes()
        except OSError:
            self.send_error(404)
            return None
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.server.cut_after is not None:  # announce everything, send part of it, hang up
            data = data[:self.server.cut_after]
        return io.BytesIO(data)


@pytest.fixture(autouse=True)
def _rank_zero(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
    httpd.requests, httpd.cut_after, httpd.folder = [], None, folder
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def data_cfg(root, downloads, **paths):
    return {"name": "t", "root": str(root), "downloads": downloads,
            **{k: str(root / v) if isinstance(v, str) else [str(root / x) for x in v] for k, v in paths.items()}}


def test_downloads_a_missing_file_atomically(server, tmp_path):
    (server.folder / "qrels.train.tsv").write_bytes(PAYLOAD)
    root = tmp_path / "data"
    cfg = data_cfg(root, {"qrels.train.tsv": f"{server.url}/qrels.train.tsv"}, train_qrels="qrels.train.tsv")
    assert ensure_files(cfg) == [root / "qrels.train.tsv"]
    assert (root / "qrels.train.tsv").read_bytes() == PAYLOAD
    assert sorted(p.name for p in root.iterdir()) == ["qrels.train.tsv"]  # no .part left
    server.requests.clear()
    assert ensure_files(cfg) == [] and server.requests == []  # present: nothing fetched


def test_a_broken_download_leaves_no_file_and_starts_over_next_time(server, tmp_path):
    (server.folder / "qrels.train.tsv").write_bytes(PAYLOAD)
    root = tmp_path / "data"
    cfg = data_cfg(root, {"qrels.train.tsv": f"{server.url}/qrels.train.tsv"}, train_qrels="qrels.train.tsv")
    server.cut_after = 60_000  # announces 250 kB, sends 60 kB, hangs up
    with pytest.raises(DownloadError, match=r"qrels.train.tsv.*Run again to start over"):
        ensure_files(cfg)
    assert list(root.iterdir()) == []  # the real name only ever holds a whole file; no temp file is left
    server.cut_after = None
    ensure_files(cfg)
    assert server.requests[-1] == ("/qrels.train.tsv", None)  # from the start: no Range
    assert (root / "qrels.train.tsv").read_bytes() == PAYLOAD


def test_a_matching_sha256_is_accepted_a_wrong_one_leaves_no_file(server, tmp_path):
    (server.folder / "qrels.train.tsv").write_bytes(PAYLOAD)
    root = tmp_path / "data"
    url = f"{server.url}/qrels.train.tsv"
    wrong = data_cfg(root, {"qrels.train.tsv": {"url": url, "sha256": "0" * 64}}, train_qrels="qrels.train.tsv")
    with pytest.raises(DownloadError, match=r"checksum mismatch for http://127.0.0.1:\d+/qrels.train.tsv -> .*"
                                            r"qrels.train.tsv.*data.downloads"):
        ensure_files(wrong)
    assert list(root.iterdir()) == []
    right = data_cfg(root, {"qrels.train.tsv": {"url": url, "sha256": hashlib.sha256(PAYLOAD).hexdigest()}},
                     train_qrels="qrels.train.tsv")
    assert missing_downloads(right) == {url: ["qrels.train.tsv"]}
    assert ensure_files(right) == [root / "qrels.train.tsv"]
    assert (root / "qrels.train.tsv").read_bytes() == PAYLOAD


def test_huggingface_urls_go_to_hf_hub_download(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "scores.pkl.gz").write_bytes(gzip.compress(b"scores", mtime=0))
    calls = []

    def fake_hf_hub_download(repo_id, filename, *, local_dir, **kw):  # what the hub client does with local_dir
        calls.append({"repo_id": repo_id, "filename": filename, **kw})
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(hub / Path(filename).name, out)
        (Path(local_dir) / ".cache").mkdir(exist_ok=True)
        return str(out)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_hf_hub_download)
    root = tmp_path / "data"
    cfg = data_cfg(root, {
        "ce.pkl.gz": "https://huggingface.co/datasets/sentence-transformers/msmarco-hard-negatives/resolve/main/"
                     "scores.pkl.gz",
        "ce.pkl": {"url": "https://huggingface.co/org/model/resolve/refs%2Fpr%2F3/sub/scores.pkl.gz",
                   "sha256": hashlib.sha256(gzip.compress(b"scores", mtime=0)).hexdigest()}},
        teacher_scores="ce.pkl.gz", other="ce.pkl")
    assert ensure_files(cfg) == [root / "ce.pkl.gz", root / "ce.pkl"]
    assert calls == [{"repo_id": "sentence-transformers/msmarco-hard-negatives", "filename": "scores.pkl.gz",
                      "repo_type": "dataset", "revision": "main"},
                     {"repo_id": "org/model", "filename": "sub/scores.pkl.gz", "repo_type": "model",
                      "revision": "refs/pr/3"}]
    assert (root / "ce.pkl.gz").read_bytes() == gzip.compress(b"scores", mtime=0)
    assert (root / "ce.pkl").read_bytes() == b"scores"  # decompressed, as from any other host
    assert sorted(p.name for p in root.iterdir()) == ["ce.pkl", "ce.pkl.gz"]  # hf's staging folder is gone
    (root / "ce.pkl.gz").unlink()
    cfg["downloads"]["ce.pkl.gz"] = {"url": cfg["downloads"]["ce.pkl.gz"], "sha256": "0" * 64}
    with pytest.raises(DownloadError, match=r"checksum mismatch for https://huggingface.co/datasets/.*ce.pkl.gz"):
        ensure_files(cfg)
    assert not (root / "ce.pkl.gz").exists()
    assert not any(p.is_file() for p in (root / download.HF_STAGING).rglob("*"))


def test_a_failing_hub_download_is_named(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no connection to the hub")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    root = tmp_path / "data"
    url = "https://huggingface.co/datasets/o/n/resolve/main/x.jsonl.gz"
    with pytest.raises(DownloadError) as e:
        ensure_files(data_cfg(root, {"x.jsonl.gz": url}, hard_negatives="x.jsonl.gz"))
    assert url in str(e.value) and str(root / "x.jsonl.gz") in str(e.value) and "no connection" in str(e.value)


def test_extracts_members_of_one_tar_gz_and_decompresses_gz(server, tmp_path):
    members = {"queries.train.tsv": b"1\tq one\n", "queries.dev.tsv": b"2\tq two\n", "queries.eval.tsv": b"3\tx\n"}
    with tarfile.open(server.folder / "queries.tar.gz", "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (server.folder / "test2019.tsv.gz").write_bytes(gzip.compress(b"4\tdl19 query\n"))
    root = tmp_path / "data"
    cfg = data_cfg(root, {"queries.train.tsv": f"{server.url}/queries.tar.gz",
                          "queries.dev.tsv": f"{server.url}/queries.tar.gz",
                          "msmarco-test2019-queries.tsv": f"{server.url}/test2019.tsv.gz"},
                   queries=["queries.train.tsv", "queries.dev.tsv", "msmarco-test2019-queries.tsv"])
    ensure_files(cfg)
    assert [p for p, _ in server.requests].count("/queries.tar.gz") == 1  # one download for both members
    assert (root / "queries.train.tsv").read_bytes() == members["queries.train.tsv"]
    assert (root / "queries.dev.tsv").read_bytes() == members["queries.dev.tsv"]
    assert (root / "msmarco-test2019-queries.tsv").read_bytes() == b"4\tdl19 query\n"
    # the archives were only carriers; the member nobody asked for was not extracted
    assert sorted(p.name for p in root.iterdir()) == ["msmarco-test2019-queries.tsv", "queries.dev.tsv",
                                                      "queries.train.tsv"]


def test_a_missing_archive_member_is_named(server, tmp_path):
    with tarfile.open(server.folder / "collection.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("other.tsv")
        tar.addfile(info, io.BytesIO(b""))
    root = tmp_path / "data"
    cfg = data_cfg(root, {"collection.tsv": f"{server.url}/collection.tar.gz"}, collection="collection.tsv")
    with pytest.raises(DownloadError, match=r"collection.tar.gz.*no member.*collection.tsv"):
        ensure_files(cfg)


def test_unreachable_server_error_names_the_url_and_the_file(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/msmarco-hard-negatives.jsonl.gz"
    root = tmp_path / "data"
    cfg = data_cfg(root, {"msmarco-hard-negatives.jsonl.gz": url}, hard_negatives="msmarco-hard-negatives.jsonl.gz")
    with pytest.raises(DownloadError) as e:
        ensure_files(cfg)
    assert url in str(e.value) and str(root / "msmarco-hard-negatives.jsonl.gz") in str(e.value)
    assert not (root / "msmarco-hard-negatives.jsonl.gz").exists()


def test_only_rank_zero_downloads(server, tmp_path, monkeypatch):
    (server.folder / "qrels.train.tsv").write_bytes(PAYLOAD)
    root = tmp_path / "data"
    cfg = data_cfg(root, {"qrels.train.tsv": f"{server.url}/qrels.train.tsv"}, train_qrels="qrels.train.tsv")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DownloadError, match=r"rank 1: \['qrels.train.tsv'\] missing.*task=prepare"):
        ensure_files(cfg)
    assert server.requests == []
    monkeypatch.setenv("RANK", "0")
    assert ensure_files(cfg) == [root / "qrels.train.tsv"]


def test_http_error_is_named(server, tmp_path):
    root = tmp_path / "data"
    cfg = data_cfg(root, {"qrels.train.tsv": f"{server.url}/nope.tsv"}, train_qrels="qrels.train.tsv")
    with pytest.raises(DownloadError, match=r"nope.tsv.*HTTP 404"):
        ensure_files(cfg)


def test_only_files_the_config_points_at_are_fetched(tmp_path):
    root = tmp_path / "data"
    elsewhere = tmp_path / "mine.tsv"
    cfg = data_cfg(root, {"collection.tsv": "http://x/c.tar.gz", "qrels.train.tsv": "http://x/q.tsv",
                          "queries.dev.tsv": "http://x/queries.tar.gz"},
                   train_qrels="qrels.train.tsv", queries=["queries.dev.tsv"])
    cfg["collection"] = str(elsewhere)  # overridden away from data.root: never downloaded
    assert missing_downloads(cfg) == {"http://x/q.tsv": ["qrels.train.tsv"],
                                      "http://x/queries.tar.gz": ["queries.dev.tsv"]}
    assert missing_downloads(cfg, keys=["train_qrels"]) == {"http://x/q.tsv": ["qrels.train.tsv"]}
    assert missing_downloads({"root": str(root), "collection": str(root / "c.tsv")}) == {}  # no downloads key


def test_msmarco_config_lists_a_source_for_its_files(tmp_path):
    data = compose(["data=msmarco", f"data.root={tmp_path}"], tmp_path).data
    todo = missing_downloads(data)
    names = {n for ns in todo.values() for n in ns}
    assert names == {"collection.tsv", "queries.train.tsv", "queries.dev.tsv", "msmarco-test2019-queries.tsv",
                     "qrels.train.tsv", "msmarco-hard-negatives.jsonl.gz",
                     "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz", "2019qrels-pass.txt",
                     "msmarco-passagetest2019-top1000.tsv"}  # every file the config names, val_run included
    assert all(urlparse(u).scheme == "https" for u in todo)
    assert todo["https://msmarco.z22.web.core.windows.net/msmarcoranking/queries.tar.gz"] == [
        "queries.train.tsv", "queries.dev.tsv"]


# --- a public BEIR dataset by name (data=beir data.name=scifact): snapshot_download faked by a local "hub" --------

def beir_hub(tmp_path) -> Path:
    """A stand-in for the hub, shaped as it is: BeIR/scifact holds corpus.jsonl.gz and queries.jsonl.gz (and files
    not fetched), BeIR/scifact-qrels holds train.tsv and test.tsv; mteb/tiny holds a whole plain folder."""
    from test_beir import make_folder

    folder = make_folder(tmp_path / "original")
    hub = tmp_path / "hub"
    for repo, files in {"BeIR/scifact": {"corpus.jsonl.gz": gzip.compress((folder / "corpus.jsonl").read_bytes()),
                                         "queries.jsonl.gz": gzip.compress((folder / "queries.jsonl").read_bytes()),
                                         "README.md": b"# SciFact", "scifact.py": b"# a loading script"},
                        "BeIR/scifact-qrels": {f"{s}.tsv": (folder / "qrels" / f"{s}.tsv").read_bytes()
                                               for s in ("train", "test")},
                        "mteb/tiny": {"corpus.jsonl": (folder / "corpus.jsonl").read_bytes(),
                                      "queries.jsonl": (folder / "queries.jsonl").read_bytes(),
                                      "qrels/test.tsv": (folder / "qrels" / "test.tsv").read_bytes()}}.items():
        for name, data in files.items():
            (hub / repo / name).parent.mkdir(parents=True, exist_ok=True)
            (hub / repo / name).write_bytes(data)
    return hub


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub.snapshot_download over beir_hub: the files matching allow_patterns (the hub's own filter)
    copied into local_dir; each call recorded. `fake_hub.fail` names a repo whose fetch fails."""
    from huggingface_hub.utils import filter_repo_objects

    hub = beir_hub(tmp_path)
    calls = []

    def snapshot_download(repo_id, *, repo_type=None, local_dir=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, repo_type))
        if repo_id == snapshot_download.fail or not (hub / repo_id).is_dir():
            raise OSError(f"404 for {repo_id}")
        files = [p.relative_to(hub / repo_id).as_posix() for p in (hub / repo_id).rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(hub / repo_id / name, Path(local_dir) / name)
        return str(local_dir)

    snapshot_download.calls, snapshot_download.fail, snapshot_download.hub = calls, None, hub
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return snapshot_download


def test_a_beir_dataset_by_name_is_fetched_once_into_the_cache(tmp_path, fake_hub):
    from marco_lightning.data.beir import BeirFolder
    from marco_lightning.data.sources import build_source

    cfg = compose(["task=mine", "data=beir", "data.name=scifact"], tmp_path)
    root = tmp_path / "cache" / "beir" / "BeIR" / "scifact"
    assert cfg.data.root == str(root)  # resolving data.root fetches
    assert fake_hub.calls == [("BeIR/scifact", "dataset"), ("BeIR/scifact-qrels", "dataset")]
    original = tmp_path / "original"
    for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"):
        assert (root / name).read_bytes() == (original / name).read_bytes(), name  # decompressed, in place
    assert sorted(p.name for p in root.iterdir()) == [".fetched.json", "corpus.jsonl", "qrels", "queries.jsonl"]
    assert sorted(p.name for p in root.parent.iterdir()) == ["scifact"]  # staging and partial folders gone
    assert len(BeirFolder(root).qrels("test")) == 8
    assert cfg.data.mined_dir == str(root / "mined") and cfg.data.collection == str(root / "corpus.jsonl")
    source = build_source(cfg.data)
    assert source.name == "beir-scifact"  # the stores' prefix, as for data.root=.../scifact
    assert source.spelling == "data.name=scifact"  # what its messages tell to run (task=mine data=beir ...)

    again = compose(["task=mine", "data=beir", "data.name=BeIR/scifact"], tmp_path)  # the hub id: the same folder
    assert again.data.root == str(root) and len(fake_hub.calls) == 2  # reused: no hub call
    mine = compose(["task=mine", "data=beir", "data.name=scifact", "model=tiny", "task.systems=[bm25]",
                    "task.depth=5", "task.run_depth=20"], tmp_path)
    from marco_lightning.tasks.mine import main

    assert main(mine)["root"] == str(root)
    assert (root / "mined" / "hard-negatives.jsonl.gz").is_file() and len(fake_hub.calls) == 2

    given = compose(["task=mine", "data=beir", "data.name=nfcorpus", f"data.root={original}"], tmp_path)
    assert given.data.root == str(original) and given.data.mined_dir == str(original / "mined")
    assert build_source(given.data).spelling == f"data.root={original}"
    assert len(fake_hub.calls) == 2  # data.root wins: nothing fetched


def test_an_interrupted_fetch_leaves_no_folder_that_looks_complete(tmp_path, fake_hub):
    into = tmp_path / "cache" / "beir" / "BeIR" / "scifact"
    fake_hub.fail = "BeIR/scifact-qrels"
    with pytest.raises(DownloadError, match=r"cannot fetch the hub dataset BeIR/scifact-qrels \(data.name=scifact\)"
                                            r": OSError: 404.*Run again to resume.*data.root=DIR"):
        download.fetch_beir("scifact", into)
    assert not (into / download.BEIR_FETCHED).exists()
    fake_hub.fail = None
    assert download.fetch_beir("scifact", into) == into and (into / download.BEIR_FETCHED).is_file()
    assert [r for r, _ in fake_hub.calls] == ["BeIR/scifact", "BeIR/scifact-qrels"] * 2
    assert json.loads((into / download.BEIR_FETCHED).read_text())["files"] == [
        "corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/train.tsv"]


def test_a_hub_dataset_holding_its_qrels_and_names_that_cannot_work(tmp_path, fake_hub):
    into = download.fetch_beir("mteb/tiny", tmp_path / "tiny")
    assert fake_hub.calls == [("mteb/tiny", "dataset")]  # qrels/ in the dataset itself: no -qrels repo
    assert sorted(p.name for p in (into / "qrels").iterdir()) == ["test.tsv"]
    with pytest.raises(DownloadError, match="the hub dataset BeIR/nothing .* has no corpus.jsonl"):
        (fake_hub.hub / "BeIR" / "nothing").mkdir()
        download.fetch_beir("nothing", tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"data.name='../up': a BEIR dataset name"):
        download.beir_repo("../up")


def test_data_beir_without_root_or_name_says_to_set_one(tmp_path):
    r = run_cli(["task=mine", "data=beir", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                 f"paths.cache_dir={tmp_path / 'cache'}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "data=beir needs data.root=DIR" in r.stderr and "data.name=NAME" in r.stderr
