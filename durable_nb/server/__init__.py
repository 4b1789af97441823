"""The workflow status over HTTP: a Jupyter Server extension.

Installing durable_nb enables it (etc/jupyter/jupyter_server_config.d/durable_nb.json); the
routes are under `{base_url}durable_nb/api/` and described in `openapi.yaml` beside this file.
They use the server's own authentication, authorization and XSRF rules.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "durable_nb.server"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_server.utils import url_path_join

    from .handlers import ROUTES

    base_url = serverapp.web_app.settings["base_url"]
    serverapp.web_app.add_handlers(
        ".*$", [(url_path_join(base_url, route), handler) for route, handler in ROUTES])
    serverapp.log.info("durable_nb: workflow status API at %sdurable_nb/api/", base_url)
