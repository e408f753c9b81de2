"""``modlabel serve``: a read-only web UI over a modlabel database (with ``--allow-review``,
one that records reviews too).

* ``app``: ``create_app`` (Starlette), its security headers, token and root path;
* ``pages``: the routes (classes, a class grid, an image, scans, search, pictures);
* ``review``: review mode's routes (``--allow-review``): the queue, a label, an undo;
* ``state``: what they share (the server's state, review mode's sessions, templates);
* ``data``: what they read (keyset pages, an image's history, similar images, health);
* ``pictures``: what they draw (thumbnails, overlays, class maps), decoded in isolation.
"""

from .app import create_app
from .state import UPLOAD_MAX_BYTES

__all__ = ["UPLOAD_MAX_BYTES", "create_app"]
