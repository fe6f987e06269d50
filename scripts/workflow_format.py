"""Conversions between ComfyUI's API prompt format and its UI workflow format, driven by node definitions.

ComfyUI's backend ships no converter (the front end's graphToPrompt does it), so this small one builds the
shipped UI workflow from its API twin and lets the tests check that the two stay the same graph. ``node_defs``
maps a class type to its ``INPUT_TYPES()`` dict (what ``GET /object_info`` serves) and its output types.
"""
from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control_widget(name: str, spec) -> bool:
    """The front end adds a "control after generate" widget after this one (its own rule for seed inputs)."""
    options = spec[1] if len(spec) > 1 else {}
    return bool(options.get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


def ordered_inputs(input_types: dict):
    for section in ("required", "optional"):
        yield from input_types.get(section, {}).items()


def widget_values(input_types: dict, inputs: dict) -> list:
    values = []
    for name, spec in ordered_inputs(input_types):
        if is_widget(spec) and name in inputs:
            values.append(inputs[name])
            if has_control_widget(name, spec):
                values.append("fixed")  # the front end's "control after generate" widget
    return values


def node_definition(node_class) -> dict:
    """What ``GET /object_info`` reports of a node class (V1 or V3): its inputs and its outputs."""
    outputs = list(node_class.RETURN_TYPES)
    names = getattr(node_class, "RETURN_NAMES", None) or outputs
    return {"input": node_class.INPUT_TYPES(), "output": outputs, "output_name": list(names)}


def api_to_ui(prompt: dict, node_defs: dict, positions: dict, sizes: dict | None = None,
              muted: tuple[str, ...] = ()) -> dict:
    """A UI workflow (LiteGraph JSON, version 0.4) for an API prompt whose node ids are integers; ``muted`` nodes
    are in the graph but not queued (mode 2, Ctrl+M in the editor)."""
    links, nodes = [], []
    out_links = {}
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(node_id), name])
                out_links.setdefault((int(value[0]), value[1]), []).append(len(links))
    slot_of = {}
    for order, (node_id, node) in enumerate(prompt.items()):
        definition = node_defs[node["class_type"]]
        sockets = [(name, spec) for name, spec in ordered_inputs(definition["input"])
                   if not is_widget(spec) and name in node["inputs"]]
        inputs = []
        for slot, (name, spec) in enumerate(sockets):
            slot_of[(int(node_id), name)] = slot
            inputs.append({"name": name, "type": spec[0], "link": None})
        outputs = [{"name": out_name, "type": out_type, "links": out_links.get((int(node_id), i), []), "slot_index": i}
                   for i, (out_name, out_type) in enumerate(zip(definition["output_name"], definition["output"]))]
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": list(positions[node_id]),
            "size": list((sizes or {}).get(node_id, (320, 130))), "flags": {}, "order": order,
            "mode": 2 if node_id in muted else 0, "inputs": inputs, "outputs": outputs,
            "title": node.get("_meta", {}).get("title", node["class_type"]),
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widget_values(definition["input"], node["inputs"]),
        })
    by_id = {n["id"]: n for n in nodes}
    ui_links = []
    for link_id, source, source_slot, target, name in links:
        slot = slot_of[(target, name)]
        by_id[target]["inputs"][slot]["link"] = link_id
        kind = by_id[source]["outputs"][source_slot]["type"]
        ui_links.append([link_id, source, source_slot, target, slot, kind])
    return {"last_node_id": max(by_id), "last_link_id": len(ui_links), "nodes": nodes, "links": ui_links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(workflow: dict, node_defs: dict) -> dict:
    """The API prompt a UI workflow queues: links become ``[node_id, slot]``, widget values named inputs."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        definition = node_defs[node["type"]]
        inputs = {}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        values = iter(node.get("widgets_values", []))
        for name, spec in ordered_inputs(definition["input"]):
            if not is_widget(spec):
                continue
            value = next(values, values)
            if value is values:  # fewer values than widgets: the rest keep their defaults
                break
            inputs.setdefault(name, value)
            if has_control_widget(name, spec):
                next(values)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
