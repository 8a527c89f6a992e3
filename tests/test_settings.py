"""The one settings reader: typed fields, nested sections, lists of sections, one wording of errors."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from fitting.errors import BadInput
from fitting.settings import Settings, read_yaml, to_mapping


@dataclass
class Part(Settings):
    name: str
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 0:
            raise BadInput(f"count must be >= 0, got {self.count}")


@dataclass
class Whole(Settings):
    SECTION = "whole"

    flag: bool = False
    rate: float = 0.5
    label: str = ""
    path: str | None = None
    pair: tuple[float, float] = (1.0, 2.0)
    names: tuple[str, ...] = ()
    options: dict[str, float] = field(default_factory=dict)
    parts: list[Part] = field(default_factory=list)
    part: Part = field(default_factory=lambda: Part("default"))


@pytest.mark.parametrize("text, value", [
    (True, True), (False, False), (1, True), (0, False),
    ("true", True), ("False", False), (" yes", True), ("NO", False), ("on", True), ("off", False),
    ("1", True), ("0", False),
])
def test_bools_read_the_same_way_everywhere(text, value):
    assert Whole.from_dict({"flag": text}).flag is value
    assert Whole.from_dict({"part": {"name": "p", "count": 2}, "flag": text}).flag is value


@pytest.mark.parametrize("data, message", [
    ({"flag": "maybe"}, "whole.flag: cannot read 'maybe' as bool"),
    ({"flag": 2}, "whole.flag: cannot read 2 as bool"),
    ({"rate": "abc"}, "whole.rate: cannot read 'abc' as float"),
    ({"rate": True}, "whole.rate: cannot read True as float"),
    ({"label": ["a"]}, "whole.label: cannot read ['a'] as str"),
    ({"parts": [{"name": "a"}, {"name": "b", "count": "abc"}]}, "whole.parts[1].count: cannot read 'abc' as int"),
    ({"parts": [{"name": "a", "count": 1.5}]}, "whole.parts[0].count: cannot read 1.5 as int"),
    ({"parts": [{"name": "a", "count": False}]}, "whole.parts[0].count: cannot read False as int"),
    ({"parts": [{"count": 1}]}, "whole.parts[0]: missing key 'name'"),
    ({"parts": [{"name": "a", "count": -1}]}, "whole.parts[0]: count must be >= 0, got -1"),
    ({"parts": {"name": "a"}}, "whole.parts: expected a list, found dict"),
    ({"part": [1]}, "whole.part: expected a mapping, found list"),
    ({"pair": [1.0]}, "whole.pair: expected 2 values, found 1"),
    ({"options": {"a": "x"}}, "whole.options.a: cannot read 'x' as float"),
    ({"rat": 1, "flags": 2}, "whole: unknown keys 'rat', 'flags' (known: flag, rate, label, path, pair, names, "
                             "options, parts, part)"),
])
def test_bad_values_are_one_line_that_names_the_place(data, message):
    with pytest.raises(BadInput) as caught:
        Whole.from_dict(data)
    assert str(caught.value) == message


def test_values_are_typed_and_round_trip():
    whole = Whole.from_dict({
        "rate": "1e-3", "label": 7, "path": None, "pair": ["3", 4], "names": ["a", "b"], "options": {"k": 2},
        "parts": [{"name": "x", "count": "3"}, {"name": "y", "count": 4.0}],
    })
    assert whole.rate == 1e-3 and whole.label == "7" and whole.path is None
    assert whole.pair == (3.0, 4.0) and whole.names == ("a", "b") and whole.options == {"k": 2.0}
    assert [(p.name, p.count) for p in whole.parts] == [("x", 3), ("y", 4)]
    assert Whole.from_dict({"options": None}).options == {}   # an empty YAML section
    data = to_mapping(whole)
    assert data["pair"] == [3.0, 4.0] and data["parts"][0] == {"name": "x", "count": 3}
    assert Whole.from_dict(data) == whole
    assert Whole.from_dict({"part": Part("given", 2)}).part == Part("given", 2)   # instances pass as they are


def test_yaml_errors_name_their_source():
    assert read_yaml("a: [1, 2]", "f.yaml") == {"a": [1, 2]}
    with pytest.raises(BadInput, match=r"^f\.yaml: not valid YAML \("):
        read_yaml("a: [1", "f.yaml")
