"""Ids and pool ids become parts of Redis key names: what check_name and check_pool let through."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragoman.config import load_settings
from dragoman.errors import ConfigError
from dragoman.store.keys import check_name, check_pool

WORD = st.text(st.sampled_from("abcXYZ019_.-"), min_size=1, max_size=20)


@given(WORD)
def test_a_plain_id_passes(value: str) -> None:
    assert check_name("node_id", value) == value


@given(WORD, st.sampled_from(["\n", " ", ":", "{", "}", "\t", "\r\n"]))
def test_an_id_with_a_separator_anywhere_is_refused_even_at_its_end(value: str, sep: str) -> None:
    for bad in (value + sep, sep + value, value + sep + value):
        with pytest.raises(ValueError, match="must be 1-128 characters"):
            check_name("node_id", bad)


@pytest.mark.parametrize("pool", ["zh>en\n", "zh>en ", "zh en>de", "zh>", "zh<>en\n"])
def test_a_pool_id_with_a_separator_is_refused(pool: str) -> None:
    with pytest.raises(ValueError, match="pool id"):
        check_pool(pool)


def test_a_cell_name_with_a_final_newline_is_refused() -> None:
    with pytest.raises(ConfigError, match="cell name"):
        load_settings(env={}, overrides={"cells": ["c0\n"]})
