"""data.downloads: files fetched from a local HTTP server (127.0.0.1, a thread of the test; nothing leaves the
machine): download, resume of a partial .part, atomic rename, archive extraction, clear errors."""
import gzip
import io
import socket
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import compose

from marco_lightning.data.download import DownloadError, ensure_files, missing_downloads

PAYLOAD = b"".join(b"%d\t0\t%d\t1\n" % (i, 7 * i) for i in range(20_000))  # ~250 kB of qrels


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder; honours `Range: bytes=N-` unless the server says not to; can cut a response short."""

    def log_message(self, *args):
        pass

    def send_head(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        try:
            data = Path(self.translate_path(self.path)).read_bytes()
        except OSError:
            self.send_error(404)
            return None
        start = 0
        rng = self.headers.get("Range")
        if rng and self.server.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return None
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut_after is not None:  # announce everything, send part of it, hang up
            body = body[:self.server.cut_after]
        return io.BytesIO(body)


@pytest.fixture(autouse=True)
def _rank_zero(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
    httpd.requests, httpd.ranges, httpd.cut_after, httpd.folder = [], True, None, folder
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


@pytest.mark.parametrize("ranges", [True, False], ids=["server-resumes", "server-ignores-range"])
def test_resumes_a_partial_download(server, tmp_path, ranges):
    server.ranges = ranges
    (server.folder / "qrels.train.tsv").write_bytes(PAYLOAD)
    root = tmp_path / "data"
    root.mkdir()
    (root / "qrels.train.tsv.part").write_bytes(PAYLOAD[:100_000])
    ensure_files(data_cfg(root, {"qrels.train.tsv": f"{server.url}/qrels.train.tsv"}, train_qrels="qrels.train.tsv"))
    assert server.requests == [("/qrels.train.tsv", "bytes=100000-")]
    assert (root / "qrels.train.tsv").read_bytes() == PAYLOAD
    assert not (root / "qrels.train.tsv.part").exists()


def test_a_broken_download_leaves_no_file_and_resumes_next_time(server, tmp_path):
    (server.folder / "qrels.train.tsv").write_bytes(PAYLOAD)
    root = tmp_path / "data"
    cfg = data_cfg(root, {"qrels.train.tsv": f"{server.url}/qrels.train.tsv"}, train_qrels="qrels.train.tsv")
    server.cut_after = 60_000
    with pytest.raises(DownloadError, match="qrels.train.tsv.*resume"):
        ensure_files(cfg)
    assert not (root / "qrels.train.tsv").exists()  # the real name only ever holds a whole file
    assert (root / "qrels.train.tsv.part").read_bytes() == PAYLOAD[:60_000]
    server.cut_after = None
    ensure_files(cfg)
    assert server.requests[-1] == ("/qrels.train.tsv", "bytes=60000-")
    assert (root / "qrels.train.tsv").read_bytes() == PAYLOAD


def test_a_complete_part_file_is_just_renamed(server, tmp_path):
    (server.folder / "qrels.train.tsv").write_bytes(PAYLOAD)
    root = tmp_path / "data"
    root.mkdir()
    (root / "qrels.train.tsv.part").write_bytes(PAYLOAD)  # the server answers 416 with the total size
    ensure_files(data_cfg(root, {"qrels.train.tsv": f"{server.url}/qrels.train.tsv"}, train_qrels="qrels.train.tsv"))
    assert (root / "qrels.train.tsv").read_bytes() == PAYLOAD


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
