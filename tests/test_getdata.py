"""Tests for getdata.sh: copying with --from, checksums, reruns, and failures without network.

Nothing here touches the network: downloads are exercised through a fake `curl` put first
on PATH, which either fails like an unreachable host or serves archives built in tmp_path.
"""

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "getdata.sh"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLITS = ("train", "valid", "test")
PENN_MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}

# Stands in for curl: serves $FAKE_WEB/<last path part of the URL> to the -o file, or
# fails with curl's "could not resolve host" status when that file is absent.
FAKE_CURL = """#!/usr/bin/env bash
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o) out=$2; shift 2 ;;
        *) url=$1; shift ;;
    esac
done
src="${FAKE_WEB:-/nonexistent}/${url##*/}"
if [ ! -f "$src" ]; then
    echo "curl: (6) Could not resolve host (fake)" >&2
    exit 6
fi
cp "$src" "$out"
"""


def run_getdata(*args, no_verify=False, extra_env=None, script=SCRIPT, cwd=None):
    env = dict(os.environ)
    env.pop("GETDATA_NO_VERIFY", None)
    if no_verify:
        env["GETDATA_NO_VERIFY"] = "1"
    env.update(extra_env or {})
    return subprocess.run(
        ["bash", str(script), *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
    )


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def make_corpus(root, name, splits=SPLITS):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"{split}.txt").write_text(f" {name} {split} line one \n {split} two \n")
    return folder


def files_under(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def snapshot(dest):
    return {name: (dest / name).stat().st_mtime_ns for name in files_under(dest)}


@pytest.fixture
def fake_net(tmp_path):
    """PATH with a fake curl first, and the folder it serves files from."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    curl = bin_dir / "curl"
    curl.write_text(FAKE_CURL)
    curl.chmod(curl.stat().st_mode | stat.S_IXUSR)
    web = tmp_path / "web"
    web.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_WEB": str(web)}
    return env, web


def test_help_documents_usage():
    result = run_getdata("--help")
    assert result.returncode == 0
    for word in ("--from", "--dest", "wikitext-103", "GETDATA_NO_VERIFY"):
        assert word in result.stdout


@pytest.mark.parametrize("args", [["nonsense-corpus"], ["--bogus-flag"]])
def test_bad_arguments_are_usage_errors(tmp_path, args):
    result = run_getdata("--dest", tmp_path / "dest", *args)
    assert result.returncode == 2
    assert args[0] in result.stderr
    assert not (tmp_path / "dest").exists()


def test_copy_from_dir_copies_every_known_corpus(tmp_path):
    source = tmp_path / "src"
    make_corpus(source, "penn")
    make_corpus(source, "wikitext-2")
    make_corpus(source, "not-a-corpus")
    dest = tmp_path / "dest"
    result = run_getdata("--from", source, "--dest", dest, no_verify=True)
    assert result.returncode == 0, result.stderr
    assert "penn: copied train valid test" in result.stdout
    assert "wikitext-2: copied train valid test" in result.stdout
    for name in ("penn", "wikitext-2"):
        for split in SPLITS:
            copied = dest / name / f"{split}.txt"
            assert copied.read_bytes() == (source / name / f"{split}.txt").read_bytes()
    assert files_under(dest) == [f"{n}/{s}.txt" for n in ("penn", "wikitext-2") for s in sorted(SPLITS)]


def test_copy_only_named_corpus(tmp_path):
    source = tmp_path / "src"
    make_corpus(source, "penn")
    make_corpus(source, "wikitext-2")
    dest = tmp_path / "dest"
    result = run_getdata("--from", source, "--dest", dest, "wikitext-2", no_verify=True)
    assert result.returncode == 0, result.stderr
    assert not (dest / "penn").exists()
    assert (dest / "wikitext-2" / "train.txt").is_file()


def test_second_run_is_a_no_op(tmp_path):
    source = tmp_path / "src"
    make_corpus(source, "penn")
    dest = tmp_path / "dest"
    assert run_getdata("--from", source, "--dest", dest, no_verify=True).returncode == 0
    before = snapshot(dest)
    result = run_getdata("--from", source, "--dest", dest, no_verify=True)
    assert result.returncode == 0, result.stderr
    assert "penn: up to date" in result.stdout
    assert snapshot(dest) == before


def test_changed_source_is_copied_again_without_verification(tmp_path):
    source = make_corpus(tmp_path / "src", "penn")
    dest = tmp_path / "dest"
    assert run_getdata("--from", tmp_path / "src", "--dest", dest, no_verify=True).returncode == 0
    (source / "valid.txt").write_text(" a different valid split \n")
    result = run_getdata("--from", tmp_path / "src", "--dest", dest, no_verify=True)
    assert result.returncode == 0, result.stderr
    assert "copied valid" in result.stdout
    assert (dest / "penn" / "valid.txt").read_text() == " a different valid split \n"


def test_named_corpus_missing_from_dir_fails(tmp_path):
    source = tmp_path / "src"
    make_corpus(source, "penn")
    dest = tmp_path / "dest"
    result = run_getdata("--from", source, "--dest", dest, "penn", "wikitext-103", no_verify=True)
    assert result.returncode != 0
    assert "wikitext-103" in result.stderr
    assert str(source) in result.stderr
    assert not dest.exists() or files_under(dest) == []


def test_missing_from_dir_fails_clearly(tmp_path):
    missing = tmp_path / "no-such-dir"
    result = run_getdata("--from", missing, "--dest", tmp_path / "dest")
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_from_dir_without_any_corpus_fails(tmp_path):
    (tmp_path / "src").mkdir()
    result = run_getdata("--from", tmp_path / "src", "--dest", tmp_path / "dest")
    assert result.returncode != 0
    assert "penn" in result.stderr


def test_checksum_mismatch_fails_and_keeps_no_bad_file(tmp_path):
    source = tmp_path / "src"
    make_corpus(source, "penn")
    dest = tmp_path / "dest"
    result = run_getdata("--from", source, "--dest", dest, "penn")
    assert result.returncode != 0
    for split in SPLITS:
        assert f"penn/{split}.txt" in result.stderr
        assert PENN_MD5[split] in result.stderr
        assert md5(source / "penn" / f"{split}.txt") in result.stderr
    assert "penn: failed train valid test\n" == result.stdout  # nothing installed: no "(verified)"
    assert not (dest / "penn").exists()


def test_checksum_mismatch_removes_a_stale_bad_file(tmp_path):
    source = tmp_path / "src"
    make_corpus(source, "penn", splits=("train",))
    stale = make_corpus(tmp_path / "dest", "penn", splits=("train",)) / "train.txt"
    stale.write_text("an older, wrong train split\n")
    result = run_getdata("--from", source, "--dest", tmp_path / "dest", "penn", "--partial")
    assert result.returncode != 0
    assert not stale.exists()
    assert "replac" not in result.stderr  # nothing replaced it
    assert f"not installed, and the wrong {stale} removed" in result.stderr


def test_missing_split_fails_and_installs_nothing_without_partial(tmp_path):
    source = tmp_path / "src"
    make_corpus(source, "wikitext-2", splits=("valid", "test"))
    dest = tmp_path / "dest"
    result = run_getdata("--from", source, "--dest", dest, "wikitext-2", no_verify=True)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "lacks train.txt" in errors[0] and "--partial" in errors[0]
    assert "wikitext-2: missing train" in result.stdout and "verified" not in result.stdout
    assert not dest.exists()  # no empty corpus folder, nor the --dest folder this run would have made


def test_missing_split_with_partial_warns_and_copies_the_rest(tmp_path):
    source = tmp_path / "src"
    make_corpus(source, "wikitext-2", splits=("valid", "test"))
    dest = tmp_path / "dest"
    result = run_getdata("--from", source, "--dest", dest, "--partial", "wikitext-2", no_verify=True)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr
    assert "train.txt" in result.stderr
    assert files_under(dest) == ["wikitext-2/test.txt", "wikitext-2/valid.txt"]


def test_partial_needs_from(tmp_path):
    result = run_getdata("--partial", "--dest", tmp_path / "dest", "penn")
    assert result.returncode == 2 and "--partial goes with --from" in result.stderr


def test_default_dest_is_data_beside_the_script(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    script = checkout / "getdata.sh"
    shutil.copy(SCRIPT, script)
    source = tmp_path / "src"
    make_corpus(source, "penn")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_getdata("--from", source, no_verify=True, script=script, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert (checkout / "data" / "penn" / "train.txt").is_file()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("corpus", ["penn", "wikitext-2", "wikitext-103"])
def test_unreachable_download_fails_cleanly(tmp_path, fake_net, corpus):
    env, _ = fake_net
    dest = tmp_path / "dest"
    result = run_getdata("--dest", dest, corpus, extra_env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1
    assert corpus in errors[0]
    assert "http" in errors[0]
    assert "--from DIR" in errors[0]
    assert "verified" not in result.stdout
    assert not dest.exists()  # neither an empty corpus folder nor the --dest this run made


def test_download_penn_from_tgz(tmp_path, fake_net):
    env, web = fake_net
    texts = {split: f" penn {split} words \n".encode() for split in SPLITS}
    with tarfile.open(web / "simple-examples.tgz", "w:gz") as archive:
        for split, data in texts.items():
            member = tarfile.TarInfo(f"./simple-examples/data/ptb.{split}.txt")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    dest = tmp_path / "dest"
    result = run_getdata("--dest", dest, "penn", no_verify=True, extra_env=env)
    assert result.returncode == 0, result.stderr
    assert "penn: downloaded train valid test" in result.stdout
    for split, data in texts.items():
        assert (dest / "penn" / f"{split}.txt").read_bytes() == data
    assert files_under(dest) == ["penn/test.txt", "penn/train.txt", "penn/valid.txt"]

    again = run_getdata("--dest", dest, "penn", no_verify=True, extra_env=env)
    assert again.returncode == 0, again.stderr
    assert "penn: up to date" in again.stdout


def test_download_penn_falls_back_to_raw_files(tmp_path, fake_net):
    env, web = fake_net
    for split in SPLITS:
        (web / f"ptb.{split}.txt").write_text(f" raw {split} \n")
    dest = tmp_path / "dest"
    result = run_getdata("--dest", dest, "penn", no_verify=True, extra_env=env)
    assert result.returncode == 0, result.stderr
    assert "simple-examples.tgz" in result.stderr
    assert (dest / "penn" / "valid.txt").read_text() == " raw valid \n"


def write_wikitext_zip(path, folder):
    with zipfile.ZipFile(path, "w") as archive:
        for split in SPLITS:
            archive.writestr(f"{folder}/wiki.{split}.tokens", f" = Title = \n {split} text \n")


def test_download_wikitext_from_zip(tmp_path, fake_net):
    env, web = fake_net
    write_wikitext_zip(web / "wikitext-2-v1.zip", "wikitext-2")
    dest = tmp_path / "dest"
    result = run_getdata("--dest", dest, "wikitext-2", no_verify=True, extra_env=env)
    assert result.returncode == 0, result.stderr
    assert (dest / "wikitext-2" / "test.txt").read_text() == " = Title = \n test text \n"
    assert files_under(dest) == ["wikitext-2/test.txt", "wikitext-2/train.txt", "wikitext-2/valid.txt"]


def test_download_with_wrong_zip_checksum_fails(tmp_path, fake_net):
    env, web = fake_net
    write_wikitext_zip(web / "wikitext-2-v1.zip", "wikitext-2")
    dest = tmp_path / "dest"
    result = run_getdata("--dest", dest, "wikitext-2", extra_env=env)
    assert result.returncode != 0
    assert "542ccefacc6c27f945fb54453812b3cd" in result.stderr
    assert files_under(dest) == []


@pytest.mark.skipif(not (SHARED_DATA / "penn").is_dir(), reason="no local copy of the corpora")
def test_copy_real_corpora_verifies_checksums(tmp_path):
    dest = tmp_path / "dest"
    result = run_getdata("--from", SHARED_DATA, "--dest", dest, "penn")
    assert result.returncode == 0, result.stderr
    assert "penn: copied train valid test (verified)" in result.stdout
    for split in SPLITS:
        assert md5(dest / "penn" / f"{split}.txt") == PENN_MD5[split]

    (dest / "penn" / "valid.txt").write_text("corrupted\n")
    result = run_getdata("--from", SHARED_DATA, "--dest", dest, "penn")
    assert result.returncode == 0, result.stderr
    assert "copied valid" in result.stdout
    assert f"replaced {dest / 'penn' / 'valid.txt'}" in result.stderr
    assert md5(dest / "penn" / "valid.txt") == PENN_MD5["valid"]

    before = snapshot(dest)
    result = run_getdata("--from", SHARED_DATA, "--dest", dest, "penn")
    assert result.returncode == 0, result.stderr
    assert "penn: up to date (verified)" in result.stdout
    assert snapshot(dest) == before


def test_verified_names_only_the_checked_splits_beside_a_failure(tmp_path):
    """A corpus with one good and one bad split: the line says which split was verified."""
    if not (SHARED_DATA / "penn").is_dir():
        pytest.skip("no local copy of the corpora")
    source = tmp_path / "src"
    (source / "penn").mkdir(parents=True)
    shutil.copy(SHARED_DATA / "penn" / "valid.txt", source / "penn" / "valid.txt")
    (source / "penn" / "test.txt").write_text("not the test split\n")
    result = run_getdata("--from", source, "--dest", tmp_path / "dest", "--partial", "penn")
    assert result.returncode == 1
    assert result.stdout == "penn: copied valid, missing train, failed test (verified valid)\n"


def test_a_failed_download_keeps_an_existing_dest(tmp_path, fake_net):
    env, _ = fake_net
    dest = tmp_path / "dest"
    dest.mkdir()
    result = run_getdata("--dest", dest, "penn", extra_env=env)
    assert result.returncode == 1 and dest.is_dir() and list(dest.iterdir()) == []
