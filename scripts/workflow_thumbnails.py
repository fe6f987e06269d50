"""Writes workflows/<name>.jpg, the thumbnail ComfyUI's template browser shows beside each template: the workflow
as the real front end draws it, in Debian's Chromium (see scripts/browser.py). Run after build_workflows.py:

    COMFYUI_PATH=... python scripts/workflow_thumbnails.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import browser  # noqa: E402
import demo  # noqa: E402
from comfy_inprocess import comfyui_path  # noqa: E402

WORKFLOWS = os.path.join(demo.PACK_DIR, "workflows")


def main() -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    workdir = tempfile.mkdtemp(prefix="dev2pro-thumbnails-")
    with demo.demo_server(comfyui_path(), workdir) as server, sync_playwright() as p:
        chromium = browser.launch(p)
        page = chromium.new_page(viewport={"width": 1600, "height": 900})
        browser.open_comfyui(page, server.url)
        for name in sorted(f for f in os.listdir(WORKFLOWS) if f.endswith(".json")):
            with open(os.path.join(WORKFLOWS, name)) as f:
                browser.load_workflow(page, json.load(f))
            browser.fit_view(page)
            shot = os.path.join(workdir, name + ".png")
            page.locator("canvas").first.screenshot(path=shot)
            path = os.path.join(WORKFLOWS, name[: -len(".json")] + ".jpg")
            with Image.open(shot) as image:
                image.convert("RGB").resize((800, 450)).save(path + ".partial.jpg", quality=85)
            os.replace(path + ".partial.jpg", path)
            print("wrote", path)
        chromium.close()


if __name__ == "__main__":
    main()
