"""A prompt file that is not UTF-8 text (another encoding, binary) is a clear `PromptError` naming
the file and the byte offset, from the Python API and from the command line (no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from microscope.errors import PromptError
from microscope.prompts import load_prompts

LATIN1 = "hello\ncafé au lait\n".encode("latin-1")  # byte 9 is 0xe9
BINARY = b"\x00\x01\x02 not text"


@pytest.mark.parametrize("name, data, message", [
    ("latin.txt", LATIN1, "not UTF-8 text: byte offset 9 (line 2)"),
    ("latin.jsonl", LATIN1, "not UTF-8 text: byte offset 9 (line 2)"),
    ("utf16.txt", "hello\n".encode("utf-16"), "not UTF-8 text: byte offset 0 (line 1)"),
    ("blob.txt", BINARY, "a binary file, not text: a NUL byte at byte offset 0"),
])
def test_a_prompt_file_that_is_not_utf8_text_names_the_file_and_offset(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(PromptError) as err:
        load_prompts(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_the_dump_command_reports_a_non_utf8_prompt_file_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(LATIN1)
    done = subprocess.run([sys.executable, "-m", "microscope", "dump", "--model", "organism", "--prompts", str(bad),
                           "--hooks", "blocks.0.hook_resid_post", "--out", str(tmp_path / "s.zarr")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {bad}: not UTF-8 text: byte offset 9 (line 2) is b'\\xe9' " \
                                  f"(invalid continuation byte); save the file as UTF-8"
