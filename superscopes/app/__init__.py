"""The Superscopes web page: a local server (standard library ``http.server``) with a JSON API
and plain HTML/JS/CSS, run with ``superscopes app`` (``superscopes.app.main``)."""

from superscopes.app.server import LIMITS, App, main, make_server, serve

__all__ = ["LIMITS", "App", "main", "make_server", "serve"]
