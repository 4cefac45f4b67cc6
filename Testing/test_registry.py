"""Model registry: install from a local file / folder / loopback HTTP server, SHA-256 checks, cache, remove."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from afloc_engine import registry
from afloc_engine.errors import CheckpointError

MODEL_FILES = ("config.json", "model.safetensors", "MODEL_CARD.md")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_model) -> Path:
    """A real (tiny) engine model folder written by checkpoint.save_model, with a model card."""
    from afloc_engine.checkpoint import ModelInfo, save_model

    folder = tmp_path_factory.mktemp("src") / "tiny-cxr"
    info = ModelInfo(name="tiny-cxr", version="3", trained=True, description="tiny test model")
    save_model(tiny_model, folder, info, dtype=torch.float16)
    (folder / "MODEL_CARD.md").write_text("# tiny-cxr\n\nA tiny test model. Not for clinical use.\n")
    return folder


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_members(model_folder) -> dict[str, bytes]:
    return {f"tiny-cxr/{f}": (model_folder / f).read_bytes() for f in MODEL_FILES}


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """An empty per-user cache (AFLOC_HOME) for one test."""
    monkeypatch.setenv("AFLOC_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def installed_names(home: Path) -> list[str]:
    root = home / "models"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


class Server:
    """A loopback HTTP server in a thread, serving bytes by path and counting GET requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.delay_s = 0.0
        self.lie_length = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                time.sleep(server.delay_s)
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) + (1000 if server.lie_length else 0)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.close()


# --- local installs --------------------------------------------------------------------------------
def test_install_local_zip_then_load_checks_sha(home, tmp_path, model_members, model_folder, tiny_model):
    archive = tmp_path / "tiny-cxr.zip"
    archive.write_bytes(zip_bytes(model_members))
    record = registry.install(archive, sha256=sha(archive.read_bytes()))
    assert record["name"] == "tiny-cxr" and record["version"] == "3" and record["trained"] is True
    assert record["sha256"] == sha(archive.read_bytes()) and record["cached"] is False
    folder = home / "models" / "tiny-cxr"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*MODEL_FILES, "install.json"])
    assert (folder / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()
    # resolve_model hands the loader the weights' SHA-256 from the record
    resolved, expected = registry.resolve_model("tiny-cxr")
    assert resolved == folder and expected == sha((model_folder / "model.safetensors").read_bytes())

    import afloc_engine

    model = afloc_engine.load_model("tiny-cxr", "cpu")
    assert model.info.trained and model.info.sha256 == expected
    ours = model.model.image_encoder.deep_proj.weight
    assert torch.equal(ours, tiny_model.image_encoder.deep_proj.weight.half().float())

    # tampering with the installed weights is caught at load
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        afloc_engine.load_model("tiny-cxr", "cpu")


def test_install_tar_gz_and_folder_and_list(home, tmp_path, model_members, model_folder):
    archive = tmp_path / "weights.tar.gz"
    archive.write_bytes(tar_bytes(model_members))
    rec = registry.install(archive, name="from-tar")
    assert rec["name"] == "from-tar" and (home / "models" / "from-tar" / "MODEL_CARD.md").is_file()
    rec2 = registry.install(model_folder, name="from-folder")
    assert rec2["sha256"] == sha((model_folder / "model.safetensors").read_bytes())
    rows = {r["name"]: r for r in registry.list()}
    shipped = (registry.manifest.PACKAGE_WEIGHTS / "default" / "model.safetensors").is_file()
    assert rows["default"]["source"] == "package" and rows["default"]["trained"] is shipped
    for name, source_sha in (("from-tar", sha(archive.read_bytes())), ("from-folder", rec2["sha256"])):
        row = rows[name]
        assert row["source"] == "installed" and row["installed"] and row["trained"] is True
        assert row["sha256"] == source_sha and row["description"] == "tiny test model"
        assert row["size"] == sum((home / "models" / name / f).stat().st_size for f in MODEL_FILES)


def test_name_clash_refused_unless_forced(home, tmp_path, model_members, model_folder):
    registry.install(model_folder, name="m")
    other = dict(model_members)
    other["tiny-cxr/MODEL_CARD.md"] = b"# another card\n"
    archive = tmp_path / "other.zip"
    archive.write_bytes(zip_bytes(other))
    with pytest.raises(CheckpointError, match="already installed"):
        registry.install(archive, name="m")
    assert (home / "models" / "m" / "MODEL_CARD.md").read_bytes() == (model_folder / "MODEL_CARD.md").read_bytes()
    registry.install(archive, name="m", force=True)
    assert (home / "models" / "m" / "MODEL_CARD.md").read_bytes() == b"# another card\n"
    assert installed_names(home) == ["m"]
    with pytest.raises(CheckpointError, match="reserved"):
        registry.install(archive, name="default")


def test_remove(home, model_folder):
    registry.install(model_folder, name="gone")
    assert registry.resolve_model("gone")[0] is not None
    registry.remove("gone")
    assert installed_names(home) == []
    with pytest.raises(CheckpointError, match="no model named 'gone'"):
        registry.resolve_model("gone")
    with pytest.raises(CheckpointError, match="no installed model named 'gone'"):
        registry.remove("gone")


def test_changed_config_is_caught_at_load(home, model_folder):
    registry.install(model_folder, name="cfg")
    config = home / "models" / "cfg" / "config.json"
    config.write_text(config.read_text().replace('"embed_dim": 32', '"embed_dim": 64'))
    with pytest.raises(CheckpointError, match="changed since it was installed"):
        registry.resolve_model("cfg")


# --- downloads -------------------------------------------------------------------------------------
def test_download_cached_no_redownload(home, server, model_members):
    data = zip_bytes(model_members)
    server.files["/models/tiny-cxr.zip"] = data
    url = server.url("/models/tiny-cxr.zip")
    rec = registry.install(url, sha256=sha(data))
    assert rec["cached"] is False and len(server.requests) == 1
    assert installed_names(home) == ["tiny-cxr"]
    again = registry.install(url, sha256=sha(data))
    assert again["cached"] is True and again["name"] == "tiny-cxr"
    assert len(server.requests) == 1, "a model whose SHA-256 is installed must not be downloaded again"
    # no stray downloads or staging folders left behind
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-cxr"]


def test_manifest_entry_installs_by_name(home, server, tmp_path, monkeypatch, model_members):
    data = tar_bytes(model_members)
    server.files["/m.tar.gz"] = data
    manifest = tmp_path / "manifest.json"
    entry = {
        "name": "remote",
        "version": "7",
        "url": server.url("/m.tar.gz"),
        "sha256": sha(data),
        "size": len(data),
        "description": "served by the test",
    }
    manifest.write_text(json.dumps({"format": "afloc-models", "format_version": 1, "models": [entry]}))
    monkeypatch.setattr(registry.manifest, "MANIFEST", manifest)
    row = next(r for r in registry.list() if r["name"] == "remote")
    assert row["source"] == "available" and not row["installed"]
    with pytest.raises(CheckpointError, match="not installed yet"):
        registry.resolve_model("remote")
    assert registry.install("remote")["name"] == "remote"
    assert registry.install("remote")["cached"] is True
    assert len(server.requests) == 1
    assert registry.resolve_model("remote")[0] == home / "models" / "remote"


def test_wrong_sha_installs_nothing(home, server, tmp_path, model_members):
    data = zip_bytes(model_members)
    server.files["/a.zip"] = data
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        registry.install(server.url("/a.zip"), sha256="0" * 64)
    local = tmp_path / "a.zip"
    local.write_bytes(data)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        registry.install(local, sha256="f" * 64)
    assert installed_names(home) == []


def test_http_errors(home, server, model_members):
    with pytest.raises(CheckpointError, match="HTTP 404"):
        registry.install(server.url("/missing.zip"))
    server.files["/trunc.zip"] = zip_bytes(model_members)
    server.lie_length = True  # announces 1000 more bytes than it sends, then closes
    with pytest.raises(CheckpointError, match="incomplete|broken off"):
        registry.install(server.url("/trunc.zip"))
    server.lie_length = False
    server.files["/notes.zip"] = b"this is not an archive at all" * 10
    with pytest.raises(CheckpointError, match="not a model archive"):
        registry.install(server.url("/notes.zip"))
    server.delay_s = 1.5
    with pytest.raises(CheckpointError, match="timed out"):
        registry.install(server.url("/trunc.zip"), timeout=0.3)
    assert installed_names(home) == []


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://example.com/model.zip", "plain http"),
        ("ftp://127.0.0.1/model.zip", "unsupported URL scheme"),
        ("file:///etc/passwd", "unsupported URL scheme"),
    ],
)
def test_refused_urls(home, url, message):
    with pytest.raises(CheckpointError, match=message):
        registry.install(url)


# --- hostile archives -------------------------------------------------------------------------------
def hostile_archives(members: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    config, weights = members["tiny-cxr/config.json"], members["tiny-cxr/model.safetensors"]
    good = {"m/config.json": config, "m/model.safetensors": weights}
    return {
        "absolute": (zip_bytes({**good, "/tmp/evil.txt": b"x"}), "absolute path"),
        "dotdot": (zip_bytes({**good, "m/../../evil.txt": b"x"}), r"outside the archive"),
        "dotdot-tar": (tar_bytes({"../evil.txt": b"x", **good}), r"outside the archive"),
        "symlink-tar": (tar_bytes(good, links={"m/MODEL_CARD.md": "/etc/passwd"}), "is a link"),
        "code": (zip_bytes({**good, "m/__init__.py": b"import os; os.system('touch pwned')"}), "not part of a model"),
        "pickle": (zip_bytes({"m/config.json": config, "m/model.pt": weights}), "not part of a model"),
        "nested": (zip_bytes({"m/config.json": config, "m/sub/model.safetensors": weights}), "nested folders"),
        "two-models": (zip_bytes({"a/config.json": config, "b/model.safetensors": weights}), "several folders"),
        "no-config": (zip_bytes({"m/model.safetensors": weights}), "no config.json"),
        "bad-weights": (
            zip_bytes({"m/config.json": config, "m/model.safetensors": b"\x08" + b"\0" * 40}),
            "safetensors",
        ),
        "bad-config": (zip_bytes({"m/config.json": b'{"format": "pickle"}', "m/model.safetensors": weights}), "config"),
    }


def zip_with_symlink(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("m/MODEL_CARD.md")
        link.external_attr = (0o120777 << 16) | 0
        zf.writestr(link, "/etc/passwd")
    return buf.getvalue()


def test_hostile_archives_rejected(home, tmp_path, model_members):
    cases = hostile_archives(model_members)
    good = {"m/config.json": model_members["tiny-cxr/config.json"]}
    good["m/model.safetensors"] = model_members["tiny-cxr/model.safetensors"]
    cases["symlink-zip"] = (zip_with_symlink(good), "is a link")
    for label, (data, message) in cases.items():
        archive = tmp_path / f"{label}.bin"
        archive.write_bytes(data)
        with pytest.raises(CheckpointError, match=message) as info:
            registry.install(archive, name="evil")
        assert str(archive) in str(info.value), f"{label}: the error must name the file"
        assert installed_names(home) == [], f"{label}: something was installed"
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("pwned"))


def test_safetensors_header_checks(tmp_path, model_folder):
    header = registry.read_safetensors_header(model_folder / "model.safetensors")
    assert "image_encoder.deep_proj.weight" in header
    assert header["image_encoder.deep_proj.weight"]["shape"] == [32, 256, 1, 1]
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes((model_folder / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="outside the file|truncated"):
        registry.read_safetensors_header(truncated)


def test_manifest_validation(tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps({"format": "afloc-models", "models": [{"name": "x", "version": "1"}]}))
    with pytest.raises(CheckpointError, match="lacks sha256, size, description"):
        registry.read_manifest(bad)
    entry = {"name": "x", "version": 1, "sha256": "", "size": 0, "description": "", "path": "x", "url": "https://a/b"}
    bad.write_text(json.dumps({"format": "afloc-models", "models": [entry]}))
    with pytest.raises(CheckpointError, match="exactly one of 'path' or 'url'"):
        registry.read_manifest(bad)
    assert isinstance(registry.read_manifest(registry.manifest.MANIFEST), list)  # the shipped one is valid


def test_full_disk_is_a_clear_error(home, server, monkeypatch, model_members):
    import collections

    server.files["/big.zip"] = zip_bytes(model_members)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(registry.download.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match="not enough disk space"):
        registry.install(server.url("/big.zip"))
    assert installed_names(home) == []


def test_pack_then_install_round_trip(home, tmp_path, model_folder):
    for suffix in (".zip", ".tar.gz"):
        archive = tmp_path / f"release{suffix}"
        entry = registry.pack(model_folder, archive)
        assert entry["sha256"] == sha(archive.read_bytes()) and entry["size"] == archive.stat().st_size
        assert entry["name"] == "tiny-cxr" and entry["trained"] is True
        rec = registry.install(archive, sha256=entry["sha256"], name=f"rt{len(suffix)}")
        for f in MODEL_FILES:
            assert (Path(rec["path"]) / f).read_bytes() == (model_folder / f).read_bytes()
    with pytest.raises(CheckpointError, match=r"\.zip or \.tar\.gz"):
        registry.pack(model_folder, tmp_path / "release.rar")


def test_packing_the_same_folder_twice_gives_the_same_archive(tmp_path, model_folder):
    """The printed manifest entry (its SHA-256) can be checked by packing again; the archive is readable
    by others as any new file is (mkstemp's 0600 before)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for suffix in (".zip", ".tar.gz"):
        first = registry.pack(model_folder, tmp_path / "a" / f"release{suffix}")
        time.sleep(1.1)  # zip time stamps have 2 s steps: cross at least one boundary often enough
        os.utime(model_folder / "config.json")  # a newer time stamp, the same content
        second = registry.pack(model_folder, tmp_path / "b" / f"release{suffix}")
        assert first["sha256"] == second["sha256"], suffix
        assert (tmp_path / "a" / f"release{suffix}").stat().st_mode & 0o777 == 0o666 & ~mask


def test_shipped_default_is_checked_at_load(tmp_path, monkeypatch, model_folder):
    """How the lead ships the default: a folder under weights/ and a manifest entry with its SHA-256."""
    import shutil
    import warnings

    import afloc_engine

    weights = tmp_path / "weights"
    shutil.copytree(model_folder, weights / "default")
    monkeypatch.setattr(registry.manifest, "PACKAGE_WEIGHTS", weights)
    monkeypatch.setattr(registry.manifest, "MANIFEST", weights / "manifest.json")
    entry = registry.shipped_entry(weights / "default", name="default")
    assert entry["path"] == "default" and entry["sha256"] == sha((model_folder / "model.safetensors").read_bytes())
    (weights / "manifest.json").write_text(
        json.dumps({"format": "afloc-models", "format_version": 1, "models": [entry]})
    )
    assert registry.resolve_model("default") == (weights / "default", entry["sha256"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = afloc_engine.load_model("default", "cpu")
    assert not [w for w in caught if "UNTRAINED" in str(w.message)], "a trained shipped model loads without the warning"
    assert model.info.trained and model.info.sha256 == entry["sha256"]
    row = next(r for r in registry.list() if r["name"] == "default")
    assert row["trained"] is True and row["installed"] and row["size"] == entry["size"]
    with pytest.raises(CheckpointError, match="cannot be removed"):
        registry.remove("default")
    (weights / "default" / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="SHA-256 mismatch"):
        afloc_engine.load_model("default", "cpu")


def test_public_functions_are_explicit():
    """``registry.list`` is a real attribute (an alias of list_models), not a module ``__getattr__`` lookup."""
    from afloc_engine.registry import list as listed  # a from-import works only for a real attribute

    assert listed is registry.list_models
    assert "__getattr__" not in vars(registry)
    assert set(registry.__all__) <= set(vars(registry))
