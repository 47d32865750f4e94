"""The stdlib corpus: exclusions, readable-text filter, the path-hash split and the corpus hash."""

import pytest

from fdpg_scale.models.corpus import collect_documents, corpus_hash, split_documents, stdlib_dir


def _write(root, rel, data):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def test_collect_filters_and_sorts(tmp_path):
    _write(tmp_path, "b.py", "x = 1\n")
    _write(tmp_path, "a/c.py", "def f():\n    return 2\n")
    _write(tmp_path, "test/test_x.py", "assert True\n")            # excluded directory
    _write(tmp_path, "pkg/tests/t.py", "assert True\n")            # excluded at any depth
    _write(tmp_path, "site-packages/m.py", "y = 2\n")
    _write(tmp_path, "_sysconfigdata__linux.py", "build_time_vars = {}\n")  # machine-specific
    _write(tmp_path, "latin.py", b"s = '\xe9\xff'\n")                # not UTF-8
    _write(tmp_path, "blank.py", "\n   \n")                           # no text
    _write(tmp_path, "notes.txt", "not python\n")
    docs = collect_documents(tmp_path)
    assert [d.path for d in docs] == ["a/c.py", "b.py"]
    assert docs[1].text == "x = 1\n"


@pytest.mark.parametrize("setup", ["missing", "empty", "unreadable"])
def test_collect_bad_directory_names_it(tmp_path, setup):
    root = tmp_path / "corpus"
    if setup != "missing":
        root.mkdir()
    if setup == "unreadable":
        _write(root, "bad.py", b"\xff\xfe\x00")
        _write(root, "tests/ok.py", "x = 1\n")
    with pytest.raises(ValueError, match="corpus directory '.*corpus'"):
        collect_documents(root)


def test_split_is_by_path_and_never_empty(tmp_path):
    for i in range(40):
        _write(tmp_path, f"m{i:02d}.py", f"v = {i}\n")
    docs = collect_documents(tmp_path)
    train, held = split_documents(docs, 0.25)
    assert train and held and len(train) + len(held) == 40
    # The decision depends on the path alone: dropping other files does not move a held-out one.
    _, held_sub = split_documents([d for d in docs if d in held or d.path < "m10"], 0.25)
    assert {d.path for d in held} == {d.path for d in held_sub}
    # Tiny corpora still get one document on each side.
    train2, held2 = split_documents(docs[:2], 0.01)
    assert len(train2) == 1 and len(held2) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(docs[:1], 0.05)


def test_corpus_hash_tracks_content(tmp_path):
    _write(tmp_path, "a.py", "x = 1\n")
    _write(tmp_path, "b.py", "y = 2\n")
    h = corpus_hash(collect_documents(tmp_path))
    assert corpus_hash(collect_documents(tmp_path)) == h
    _write(tmp_path, "b.py", "y = 3\n")
    assert corpus_hash(collect_documents(tmp_path)) != h


def test_stdlib_corpus_is_substantial():
    docs = collect_documents()
    paths = {d.path for d in docs}
    assert "argparse.py" in paths and "json/decoder.py" in paths
    assert not any(p.startswith(("test/", "idlelib/", "encodings/")) for p in paths)
    train, held = split_documents(docs, 0.05)
    assert sum(len(d.text) for d in train) > 1_000_000 and held
    assert stdlib_dir().is_dir()
