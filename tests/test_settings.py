"""Each training setting is defined once (core/settings.py): the nodes' inputs, TrainConfig's defaults and checks,
and what ComfyUI's own validation accepts all follow from it."""
import pytest

import graphs


def node_inputs(comfy, node_type):
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    return {name: value for section in ("required", "optional") for name, value in spec.get(section, {}).items()}


@pytest.mark.parametrize("node_type, where", [("Dev2ProTrainLoRA", "train"), ("Dev2ProTrainAdvanced", "advanced")])
def test_node_inputs_are_the_settings(comfy, core, node_type, where):
    inputs = node_inputs(comfy, node_type)
    settings = core.settings.on_node(where)
    assert settings
    for s in settings:
        kind, options = inputs[s.name]
        assert options["tooltip"] == s.help and options.get("default") == s.default, s.name
        assert core.config.TrainConfig().__getattribute__(s.name) == s.default, s.name
        if s.kind == "combo":
            assert list(kind if isinstance(kind, list) else options["options"]) == list(s.options), s.name
        elif s.kind in ("int", "float"):
            assert (options["min"], options["max"]) == (s.min, s.max), s.name


def test_every_setting_in_range_is_accepted_and_every_one_outside_is_refused(core):
    for s in core.settings.SETTINGS.values():
        if s.kind in ("int", "float"):
            for ok in (s.min, s.max):
                assert s.problem(ok) is None, (s.name, ok)
            below = s.min - (1 if s.kind == "int" else abs(s.min) * 0.5 + 1e-9)
            assert s.name in s.problem(below) and str(below) in s.problem(below)
        elif s.kind == "combo":
            assert s.problem(s.options[-1]) is None and "must be one of" in s.problem("nope")


def test_a_learning_rate_below_1e_5_reaches_training_as_given(comfy, core):
    """The widget used to round 5e-6 to 1e-5; the node keeps what the prompt gives, down to the setting's min."""
    import execution
    import asyncio

    graph = graphs.training_graph("missing.safetensors", learning_rate=5e-6)
    _, options = node_inputs(comfy, "Dev2ProTrainLoRA")["learning_rate"]
    assert options["step"] <= 1e-8 and options["round"] <= 1e-8 and options["min"] <= 1e-8
    ok, error, _, node_errors = asyncio.run(execution.validate_prompt("x", graph, None))
    assert "learning_rate" not in str(node_errors)


def test_out_of_range_settings_are_refused_by_comfyui_before_the_node_runs(comfy, core):
    import asyncio
    import execution

    graph = graphs.training_graph("missing.safetensors", learning_rate=20.0)
    ok, error, _, node_errors = asyncio.run(execution.validate_prompt("x", graph, None))
    assert not ok and "learning_rate" in str(node_errors["train"])
