"""HTTP routes of the pack, on ComfyUI's own server: the training panel and headless clients read runs and ask
for Stop & save here.

GET  /dev2pro/runs                 every trainer run of this server session, without losses
GET  /dev2pro/runs/{node}          one run with its whole loss curve (the panel redraws from it after a reload)
POST /dev2pro/stop                 {"node": id} or {"prompt_id": id} or {}: stop those trainers after their current
                                   step, keep the adapter and run the rest of the graph; answers {"stopping": [ids]}
"""
from __future__ import annotations

import json
import logging

from ..core.live_runs import RUNS

log = logging.getLogger("dev2pro-lora")


def register(routes) -> None:
    from aiohttp import web

    @routes.get("/dev2pro/runs")
    async def runs(request):
        return web.json_response({"runs": RUNS.summaries(losses=False)})

    @routes.get("/dev2pro/runs/{node}")
    async def run(request):
        found = RUNS.get(request.match_info["node"])
        if found is None:
            return web.json_response({"error": f"no training run of node {request.match_info['node']} in this "
                                      "ComfyUI session"}, status=404)
        return web.json_response(found.summary(losses=True))

    @routes.post("/dev2pro/stop")
    async def stop(request):
        try:
            body = await request.json() if request.can_read_body else {}
        except json.JSONDecodeError:
            return web.json_response({"error": "the body must be JSON: {\"node\": id} or {\"prompt_id\": id} or {}"},
                                     status=400)
        if not isinstance(body, dict):
            body = {}
        node, prompt_id = body.get("node"), body.get("prompt_id")
        asked = RUNS.request_stop(None if node is None else str(node), prompt_id)
        if asked:
            log.info("Dev2Pro: Stop & save asked of trainer node(s) %s", ", ".join(asked))
        return web.json_response({"stopping": asked})


def register_on_server() -> None:
    """Add the routes to ComfyUI's server when one runs (not in scripts that import the pack in-process)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        register(server.routes)
