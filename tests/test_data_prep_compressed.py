"""Plain-text files compressed with gzip or zstd are read as documents, not skipped as binary."""

import gzip
import tarfile

import zstandard

from data_prep.read_report import ReadReport
from data_prep.readers import expand_inputs, read_documents

CHANGELOG = "pkg (1.2-1) unstable; urgency=low\n\n  * Fix the frobnicator.\n"
NOTES = "Release notes\n\nEverything is faster.\n"


def test_gzip_and_zstd_text_files_are_documents(tmp_path):
    docs = tmp_path / "doc"
    docs.mkdir()
    (docs / "changelog.Debian.gz").write_bytes(gzip.compress(CHANGELOG.encode()))
    (docs / "notes.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(NOTES.encode()))
    (docs / "README").write_text("plain\n")
    with tarfile.open(docs / "bundle.tar.gz", "w:gz") as bundle:  # compressed, but binary inside
        bundle.add(docs / "README", arcname="README")
    (docs / "broken.gz").write_bytes(gzip.compress(NOTES.encode())[:-12])

    report = ReadReport()
    documents = list(read_documents(expand_inputs([str(docs)], None, report), "text", report))
    assert [(d.origin.rpartition("/")[2], d.text) for d in documents] == [
        ("README", "plain\n"),
        ("changelog.Debian.gz", CHANGELOG),
        ("notes.txt.zst", NOTES),
    ]
    assert report.to_json()["binary_files_skipped"] == 1
    assert [problem["file"] for problem in report.unreadable] == [str(docs / "broken.gz")]
