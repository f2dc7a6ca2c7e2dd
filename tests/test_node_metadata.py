"""Every registered node looks native in the editor: category, display name, description, tooltips, sane widgets."""
from __future__ import annotations

import inspect

import pytest

from pack_loader import load_pack

pack = load_pack()
NODES = pack.NODE_CLASS_MAPPINGS
DISPLAY = pack.NODE_DISPLAY_NAME_MAPPINGS
CATEGORY = "audio/ACE-Step"
NUMBER_TYPES = {"INT", "FLOAT"}


def inputs_of(cls) -> dict[str, tuple[str, object, dict]]:
    """name -> (section, type, options) for the required and optional inputs."""
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}, f"unknown INPUT_TYPES sections {set(spec)}"
    found = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, options = (entry[0], entry[1] if len(entry) > 1 else {})
            found[name] = (section, kind, options)
    return found


def test_the_preview_and_download_nodes_are_registered():
    assert {"AceStepPreviewImage", "AceStepDownload"} <= set(NODES)


def test_display_names_cover_exactly_the_nodes_and_are_unique():
    assert set(DISPLAY) == set(NODES)
    assert len(set(DISPLAY.values())) == len(DISPLAY)


@pytest.mark.parametrize("name", sorted(NODES))
def test_node_is_named_categorised_and_described(name):
    cls = NODES[name]
    assert name.startswith("AceStep") and cls.__name__ == name
    assert cls.CATEGORY == CATEGORY or cls.CATEGORY.startswith(CATEGORY + "/")
    assert DISPLAY[name].startswith("ACE-Step ")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) >= 40
    assert callable(getattr(cls, cls.FUNCTION))
    assert isinstance(getattr(cls, "OUTPUT_NODE", False), bool)


@pytest.mark.parametrize("name", sorted(NODES))
def test_every_output_is_named_and_explained(name):
    cls = NODES[name]
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert all(isinstance(t, str) and len(t) >= 10 for t in cls.OUTPUT_TOOLTIPS)


@pytest.mark.parametrize("name", sorted(NODES))
def test_every_input_has_a_tooltip_and_a_sane_widget(name):
    for key, (section, kind, options) in inputs_of(NODES[name]).items():
        where = f"{name}.{key}"
        assert isinstance(options.get("tooltip"), str) and len(options["tooltip"]) >= 10, f"{where} has no tooltip"
        if isinstance(kind, list):
            assert "default" not in options or options["default"] in kind, f"{where} default not in its list"
        elif kind in NUMBER_TYPES:
            assert options["min"] <= options["default"] <= options["max"], f"{where} default out of range"
            assert options.get("step", 1) > 0, f"{where} step"


@pytest.mark.parametrize("name", sorted(NODES))
def test_function_signature_matches_the_inputs(name):
    cls = NODES[name]
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    for key, (section, _, _) in inputs_of(cls).items():
        assert key in params, f"{name}.{cls.FUNCTION} does not take input {key}"
        has_default = params[key].default is not inspect.Parameter.empty
        assert has_default == (section == "optional"), f"{name}.{key}: optional inputs (only) need a default"
