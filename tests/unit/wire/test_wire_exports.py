"""``dragoman.wire.__all__`` is complete and unique (after websockets' and httpx's export tests)."""

from __future__ import annotations

import inspect

import msgspec

import dragoman.wire
from dragoman.wire import codec, messages


def test_all_is_unique() -> None:
    assert len(dragoman.wire.__all__) == len(set(dragoman.wire.__all__))


def test_every_exported_name_exists() -> None:
    for name in dragoman.wire.__all__:
        assert hasattr(dragoman.wire, name), name


def test_every_message_struct_is_exported() -> None:
    structs = {
        name
        for name, obj in vars(messages).items()
        if inspect.isclass(obj) and issubclass(obj, msgspec.Struct) and obj.__module__ == messages.__name__
    }
    assert structs, "no Structs found: the test is looking in the wrong place"
    assert structs <= set(dragoman.wire.__all__), structs - set(dragoman.wire.__all__)


def test_every_public_codec_function_is_exported() -> None:
    functions = {
        name
        for name, obj in vars(codec).items()
        if inspect.isfunction(obj) and obj.__module__ == codec.__name__ and not name.startswith("_")
    }
    assert functions == {
        "assign_frame",
        "decode_node",
        "decode_node_outbound",
        "decode_session",
        "decode_session_outbound",
        "encode",
        "error_frame",
    }
    assert functions <= set(dragoman.wire.__all__)


def test_wire_tags_are_unique_within_each_union() -> None:
    from typing import get_args

    for union in (
        messages.NodeInbound,
        messages.NodeOutbound,
        messages.SessionInbound,
        messages.SessionOutbound,
    ):
        tags = [member.__struct_config__.tag for member in get_args(union)]
        assert len(tags) == len(set(tags))
