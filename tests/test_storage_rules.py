"""Storage's own name and size rules, case for case from supabase/storage v1.70.6
(src/storage/limits.test.ts and the 1.125 tie that JavaScript's toPrecision rounds up)."""

from __future__ import annotations

import pytest

from sona.store.storage_rules import is_valid_bucket_name, is_valid_key, parse_file_size


@pytest.mark.parametrize(
    "key",
    ["folder/file-name_01.jpg", "file/!-*'() &$=@;:+,?name", "file_name", "/", "a" * 1023 + "/"],
)
def test_storage_accepts_these_object_names(key: str) -> None:
    assert is_valid_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "file\tname",
        "file\nname",
        "file\x7f",
        "file%20name",
        'file#[]{}^~`"<>\\|',
        "ファイル-emoji-😀.txt",
    ],
)
def test_storage_refuses_these_object_names(key: str) -> None:
    assert not is_valid_key(key)


@pytest.mark.parametrize(
    ("name", "valid"),
    [("a" * 100, True), ("a" * 101, False), ("folder/name", False), (" startsWithSpace", False)],
)
def test_bucket_names_follow_storages_rules(name: str, valid: bool) -> None:
    assert is_valid_bucket_name(name) is valid


@pytest.mark.parametrize(
    ("text", "size"), [("1.125MB", 1_130_000), ("0.5GB", 500_000_000), ("3B", 3), ("20Gb", 20 * 10**9)]
)
def test_sizes_parse_like_storages_parse_file_size_to_bytes(text: str, size: int) -> None:
    assert parse_file_size(text) == size
