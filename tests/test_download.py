"""data.downloads: files fetched from a local HTTP server (127.0.0.1, a thread of the test; nothing leaves the
machine) through pooch: download, atomic rename, checksums, archive extraction, clear errors; huggingface.co
URLs go to hf_hub_download (faked)."""
import gzip
import hashlib
import io
import shutil
import socket
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import compose

from marco_lightning.data import download
from marco_lightning.data.download import DownloadError, ensure_files, missing_downloads

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
