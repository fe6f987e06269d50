"""The pack in ComfyUI's real front end: a server on the demo models (main.py --cpu), Debian's Chromium driven by
Playwright. The shipped templates load with no node over another; the training panel draws a growing loss chart,
comes back after a page reload, and Stop & save ends the run with the file saved and named on the panel; the
console shows no error from the pack. Screenshots go to $DEV2PRO_ARTIFACTS (default: artifacts/browser/)."""
import json
import os
import time

import pytest
from playwright.sync_api import sync_playwright
from safetensors import safe_open

import browser
import demo

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.environ.get("DEV2PRO_ARTIFACTS", os.path.join(PACK, "artifacts", "browser"))
TEMPLATES = sorted(f for f in os.listdir(os.path.join(PACK, "workflows")) if f.endswith(".json"))
TRAINER = "9"  # the trainer's node id in the shipped graph and the demo


@pytest.fixture(scope="module")
def chromium():
    with sync_playwright() as p:
        b = browser.launch(p)
        yield b
        b.close()


@pytest.fixture
def page(chromium, server):
    context = chromium.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.pack_errors = []

    def on_console(message):
        if message.type == "error" and "dev2pro" in (message.text + str(message.location)).lower():
            page.pack_errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: page.pack_errors.append(str(error)) if "dev2pro" in str(error.stack).lower()
            else None)
    browser.open_comfyui(page, server.url)
    yield page
    context.close()


def screenshot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, f"{name}.png"))


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_load_with_no_node_over_another(page, name):
    with open(os.path.join(PACK, "workflows", name)) as f:
        workflow = json.load(f)
    browser.load_workflow(page, workflow)
    boxes = browser.node_boxes(page)
    assert len(boxes) == len(workflow["nodes"])
    assert browser.overlaps(boxes) == []
    # the panel takes no widget value: the saved workflow keeps the template's widget order
    saved = {n["id"]: n.get("widgets_values") for n in page.evaluate("() => window.app.graph.serialize().nodes")}
    widgets = page.evaluate("""() => Object.fromEntries(window.app.graph._nodes.map((n) => [n.id,
        (n.widgets ?? []).filter((w) => w.name !== "dev2pro_training_panel").length]))""")
    trainers = [n for n in workflow["nodes"] if n["type"] in ("Dev2ProTrainLoRA", "Dev2ProContinueTraining")]
    assert trainers
    for n in trainers:
        assert saved[n["id"]][: len(n["widgets_values"])] == n["widgets_values"], n["title"]
        assert len(saved[n["id"]]) == widgets[str(n["id"])], n["title"]
    browser.fit_view(page)
    screenshot(page, f"template_{name[:-5]}")
    assert page.pack_errors == []


def test_learning_rate_widget_keeps_values_below_1e_5(page, server):
    with open(os.path.join(PACK, "workflows", "dev2pro_train_and_apply.json")) as f:
        browser.load_workflow(page, json.load(f))
    kept = page.evaluate(f"""() => {{
        const w = window.app.graph.getNodeById({TRAINER}).widgets.find((w) => w.name === "learning_rate");
        const out = [];
        for (const v of [5e-6, 3e-7, 2.5e-4]) {{ w.value = v; w.callback?.(v); out.push(w.value); }}
        return out;
    }}""")
    assert [round(v / e, 6) for v, e in zip(kept, [5e-6, 3e-7, 2.5e-4])] == [1.0, 1.0, 1.0], kept


def panel_points(page) -> int:
    return page.evaluate(f"""() => Number(document.querySelector('[data-dev2pro-panel="{TRAINER}"] canvas')
        ?.dataset.points ?? -1)""")


def panel_text(page) -> str:
    return page.evaluate(f"""() => document.querySelector('[data-dev2pro-panel="{TRAINER}"]')?.innerText ?? ''""")


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_panel_follows_training_survives_a_reload_and_stop_and_save_keeps_the_adapter(page, server):
    workflow = demo.demo_ui_workflow(server, train_steps=2000, preview_every=5)
    browser.load_workflow(page, workflow)
    boxes = browser.node_boxes(page)
    assert browser.overlaps(boxes) == [], "the demo workflow, panel and previews node included"
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    wait_for(lambda: panel_points(page) >= 3, 300, "the chart's first points")
    first = panel_points(page)
    wait_for(lambda: panel_points(page) > first, 120, "the chart to gain points")
    wait_for(lambda: "step 5" in panel_text(page) and page.evaluate(
        f"() => document.querySelectorAll('[data-dev2pro-panel=\"{TRAINER}\"] figure').length") > 0, 300,
        "the first preview with its step")
    text = panel_text(page)
    assert "loss" in text and "s/step" in text and "left" in text and "/2000" in text
    browser.fit_view(page, [TRAINER, "10", "11"])
    screenshot(page, "panel_during_run")

    # a reload mid-run: the panel redraws what happened so far from the pack's route, and goes on
    seen = panel_points(page)
    page.reload()
    browser.open_comfyui(page, server.url)
    if not page.evaluate(f"() => !!window.app.graph.getNodeById({TRAINER})"):
        browser.load_workflow(page, workflow)  # a front end that did not restore the open workflow
    wait_for(lambda: panel_points(page) >= seen, 60, "the curve so far after the reload")
    after = panel_points(page)
    wait_for(lambda: panel_points(page) > after, 120, "new points after the reload")
    browser.fit_view(page, [TRAINER, "10", "11"])
    screenshot(page, "panel_after_reload")

    page.locator(f'[data-dev2pro-panel="{TRAINER}"] button').click()
    def saved_text():
        text = panel_text(page)
        return text if "saved as models/loras/dev2pro/demo_lora" in text else None

    status = wait_for(saved_text, 300, "'saved as' on the panel")
    assert "stopped at step" in status
    wait_for(lambda: page.evaluate("() => window.app.graph.getNodeById(10).dev2proText?.length"), 60,
             "Save LoRA naming its file")
    page.wait_for_timeout(500)
    assert browser.overlaps(browser.node_boxes(page)) == [], "nodes that grew with their results overlap no other"
    browser.fit_view(page, [TRAINER, "10", "11"])
    screenshot(page, "panel_after_stop_and_save")
    run = server.get(f"/dev2pro/runs/{TRAINER}")
    assert run["status"] == "stopped" and run["step"] < 2000
    [saved] = run["saved"]
    with safe_open(os.path.join(server.workdir, saved), framework="pt") as f:
        assert f.metadata()["ss_steps"] == str(run["step"])
        assert f.metadata()["dev2pro_stopped_early"] == f"stopped by Stop & save at step {run['step']} of 2000"
    # the rest of the graph ran: Flux-dev sampled with the adapter
    wait_for(lambda: os.listdir(os.path.join(server.workdir, "output", "dev2pro")) if os.path.isdir(
        os.path.join(server.workdir, "output", "dev2pro")) else None, 300, "the sample image")
    assert page.pack_errors == []
