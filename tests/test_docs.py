"""The help pages match the nodes: one page per node where the front ends look (docs/<node>/en.md), each with
the inputs table scripts/build_docs.py derives from the live definitions, and no stale references."""
import os

import nodes
import build_docs


def test_every_node_has_a_help_page_where_the_front_end_looks(comfy):
    ours = [name for name in nodes.NODE_CLASS_MAPPINGS if name.startswith("Dev2Pro")]
    assert ours
    for name in ours:
        assert os.path.isfile(os.path.join(build_docs.DOCS, name, "en.md")), name


def test_help_pages_are_up_to_date_with_the_node_definitions(comfy):
    for path, expected in build_docs.pages(nodes).items():
        with open(path) as f:
            assert f.read() == expected, f"{path} is out of date: run scripts/build_docs.py"


def test_help_pages_name_no_known_issue_and_no_retired_behaviour(comfy):
    for path in build_docs.pages(nodes):
        with open(path) as f:
            text = f.read()
        assert "known issue" not in text.lower(), path
        assert "press Cancel again" not in text, path
