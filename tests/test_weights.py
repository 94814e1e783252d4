"""``python -m repa_e_fast.weights``: fetch from a loopback HTTP server with Range support,
resume, checksum checks, clear errors with exit code 2, ``list``."""

import hashlib
import http.server
import os
import threading

import pytest

from repa_e_fast import weights

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = {}  # path -> bytes
        self.cut_after = None  # first full response stops after this many bytes
        self.ranges = []  # Range headers seen

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        if header:
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_after is not None and not header:
            self.wfile.write(body[:self.server.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    s = Server()
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    yield s
    s.shutdown()
    s.server_close()


def use_registry(monkeypatch, **entries):
    monkeypatch.setattr(weights, "REGISTRY", entries)


def test_fetch_resumes_an_interrupted_transfer_and_checks_the_hash(server, monkeypatch, tmp_path, capsys):
    server.files["/w/model.pth"] = PAYLOAD
    server.cut_after = 300_000
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    use_registry(monkeypatch, model=[weights.WeightFile(server.url("/w/model.pth"), "sub/model.pth", sha256=sha)])
    assert weights.main(["--dir", str(tmp_path), "fetch", "model"]) == 0
    assert (tmp_path / "sub/model.pth").read_bytes() == PAYLOAD
    assert not (tmp_path / "sub/model.pth.part").exists()
    assert server.ranges == [None, "bytes=300000-"]  # the second request resumed where the first stopped
    # Present files are not fetched again; `list` shows them.
    assert weights.main(["--dir", str(tmp_path), "fetch", "model"]) == 0 and len(server.ranges) == 2
    weights.main(["--dir", str(tmp_path), "list"])
    assert "present" in capsys.readouterr().out


def test_fetch_resumes_a_part_file_left_by_an_earlier_run(server, monkeypatch, tmp_path):
    server.files["/vgg.pth"] = PAYLOAD
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    use_registry(monkeypatch, lpips=[weights.WeightFile(server.url("/vgg.pth"), "vgg.pth", md5=md5)])
    (tmp_path / "vgg.pth.part").write_bytes(PAYLOAD[:1000])
    assert weights.main(["--dir", str(tmp_path), "fetch", "lpips"]) == 0
    assert server.ranges == ["bytes=1000-"] and (tmp_path / "vgg.pth").read_bytes() == PAYLOAD


def test_checksum_mismatch_is_a_clear_error(server, monkeypatch, tmp_path, capsys):
    server.files["/net-0123abcd.pth"] = PAYLOAD
    use_registry(monkeypatch, net=[weights.WeightFile(server.url("/net-0123abcd.pth"), "net-0123abcd.pth",
                                                      sha256_prefix="0123abcd")])
    assert weights.main(["--dir", str(tmp_path), "fetch", "net"]) == 2
    err = capsys.readouterr().err
    assert "error: net-0123abcd.pth: sha256 mismatch (expected a hash starting 0123abcd" in err
    assert not os.listdir(tmp_path)  # neither the file nor a .part to resume from


def test_wrong_url_and_unknown_name_are_clear_errors(server, monkeypatch, tmp_path, capsys):
    use_registry(monkeypatch, gone=[weights.WeightFile(server.url("/missing.pth"), "missing.pth")])
    assert weights.main(["--dir", str(tmp_path), "fetch", "gone"]) == 2
    assert "error: missing.pth: HTTP 404 Not Found from http://127.0.0.1:" in capsys.readouterr().err
    assert weights.main(["--dir", str(tmp_path), "fetch", "gone", "nope"]) == 2
    assert "error: unknown weights nope; known: gone" in capsys.readouterr().err
    closed = server.url("/x").rsplit(":", 1)[0] + ":9/x"  # the discard port: nothing listens
    use_registry(monkeypatch, closed=[weights.WeightFile(closed, "x.pth")])
    assert weights.main(["--dir", str(tmp_path), "fetch", "closed"]) == 2
    assert "error: x.pth: cannot reach http://127.0.0.1:9/x" in capsys.readouterr().err


def test_registry_names_and_paths_match_the_loaders():
    paths = {f.path for files in weights.REGISTRY.values() for f in files}
    assert {"dinov2_vitb14_pretrain.pth", "dinov2_vitl14_reg4_pretrain.pth", "vgg16-397923af.pth", "vgg.pth",
            "pt_inception-2015-12-05-6726825d.pth", "sdvae/sdvae-f8d4.pt", "e2e-sdvae/e2e-sdvae-400k.pt",
            "e2e-vavae/e2e-vavae-400k-latents-stats.pt", "sit-repae-sdvae/checkpoints/0400000.pt"} <= paths
    from repa_e_fast.config import TrainConfig

    config = TrainConfig()
    for default in (config.vae_ckpt, config.lpips_vgg16_ckpt, config.lpips_lin_ckpt):
        assert os.path.relpath(default, "pretrained") in paths
    # Only published checksums: the hub-style name prefixes and taming-transformers' MD5.
    for files in weights.REGISTRY.values():
        for f in files:
            assert not f.sha256
            assert not f.sha256_prefix or f.sha256_prefix in f.path
