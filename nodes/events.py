"""What the pack sends the front end over ComfyUI's websocket (js/dev2pro_train_panel.js listens)."""
from __future__ import annotations

STEP_EVENT = "dev2pro.train.step"  # after every optimizer step: step, total, loss, learning rate, speed, ETA
STATUS_EVENT = "dev2pro.train.status"  # a run started, previewed, stopped, finished, failed, or its file was saved


def _server():
    try:
        from server import PromptServer
    except ImportError:  # scripts that import the pack without a server
        return None
    return getattr(PromptServer, "instance", None)


def send_event(node_id: str, data: dict, event: str = STEP_EVENT) -> None:
    server = _server()
    if server is not None:
        server.send_sync(event, {"node": node_id, **data}, server.client_id)


def send_status(run) -> None:
    """The run's state without its loss curve (the step events carry that)."""
    send_event(run.node, run.summary(losses=False), STATUS_EVENT)


def prompt_id() -> str | None:
    return getattr(_server(), "last_prompt_id", None)
