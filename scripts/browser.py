"""Drive ComfyUI's real front end in Debian's Chromium through Playwright (tests/test_browser.py and
scripts/workflow_thumbnails.py). Playwright's own browser download cannot work offline, so it launches
/usr/bin/chromium (apt install chromium); the flags keep Chromium off the network it cannot reach."""
from __future__ import annotations

import os

CHROMIUM = os.environ.get("DEV2PRO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def launch(playwright):
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set DEV2PRO_CHROMIUM)")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def open_comfyui(page, url: str, timeout_ms: int = 120_000) -> None:
    """Load the front end and wait until its graph and our extension are up."""
    page.goto(url)
    page.wait_for_function("() => window.app && window.app.graph && window.app.extensions?.some?.("
                           "e => e.name === 'dev2pro.TrainPanel')", timeout=timeout_ms)


def load_workflow(page, workflow: dict) -> None:
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
    page.wait_for_timeout(500)  # DOM widgets are placed on the next frames


def node_boxes(page) -> list[dict]:
    """Every node's box on the canvas, its title bar included, in graph coordinates."""
    return page.evaluate("""() => {
        const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        return window.app.graph._nodes.map((n) => ({id: n.id, title: n.title, type: n.type,
            x: n.pos[0], y: n.pos[1] - title, w: n.size[0], h: n.size[1] + title}));
    }""")


def overlaps(boxes: list[dict]) -> list[tuple[str, str]]:
    found = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and \
                    b["y"] < a["y"] + a["h"]:
                found.append((a["title"], b["title"]))
    return found


def fit_view(page, node_ids: list | None = None) -> None:
    """Zoom the canvas so the whole graph (or the nodes ``node_ids`` and their neighbours) shows."""
    page.evaluate("""(ids) => {
        const c = window.app.canvas;
        const shown = window.app.graph._nodes.filter((n) => !ids || ids.includes(String(n.id)));
        if (c.ds?.fitToBounds && shown.length) {
            const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
            let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
            for (const n of shown) {
                x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
                x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
            }
            c.ds.fitToBounds([x0 - 20, y0 - 20, x1 - x0 + 40, y1 - y0 + 40]);
        }
        c.setDirty(true, true);
    }""", [str(i) for i in node_ids] if node_ids else None)
    page.wait_for_timeout(500)
