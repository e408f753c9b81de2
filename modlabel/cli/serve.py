"""``serve``: a read-only web UI over the database, for the people who would rather look
than read; with ``--allow-review``, a review page that records what people say the
images are (the ``reviews`` table, and nothing else)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from .app import app
from .edge import command, say
from .options import DbOption, db_url, reviewer_name

TOKEN_ENV = "MODLABEL_SERVE_TOKEN"


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@command(app, interruptible=False)
def serve(
    db: DbOption = None,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            help="Address to listen on. Anything but a loopback address needs --token.",
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port.")] = 8765,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            metavar="PATH",
            help="The database's ONNX model, for CAM and Grad-CAM and the search by image "
            "(default: the path the model was scanned with, where that file exists).",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            show_envvar=True,
            help="A secret every request must carry (Authorization: Bearer TOKEN, or open "
            "any page once with ?token=TOKEN, which sets a cookie). Required off loopback.",
        ),
    ] = None,
    root_path: Annotated[
        str,
        typer.Option(
            "--root-path",
            help="The path a reverse proxy serves the UI under (/modlabel), for its links.",
        ),
    ] = "",
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="Server processes (each with its own connections and decode workers): "
            "one per core or two for many concurrent users.",
        ),
    ] = 1,
    no_upload: Annotated[
        bool, typer.Option("--no-upload", help="Turn the search by uploaded image off.")
    ] = False,
    allow_review: Annotated[
        bool,
        typer.Option(
            "--allow-review",
            help="Review mode: a review page (/review) shows the review queue one image at "
            "a time; keys 1-9 pick a class in the model's order, 0 none of them, u undoes. "
            "Writes the reviews table only, through a second connection; off by default.",
        ),
    ] = False,
    reviewer: Annotated[
        str | None,
        typer.Option(
            "--reviewer",
            metavar="NAME",
            help="With --allow-review: the name the reviews are recorded under "
            "(default: the user running the server).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve a read-only web UI over the database: classes with their average CRM, a class
    grid with filters, each image with its maps, probabilities and similar images, the
    scans' health, and a search by path or by image. The database is opened read-only;
    --allow-review adds a review page that writes the reviews table and nothing else.

    Example: modlabel serve --db labels.db --model model.onnx --port 8765

    Example: modlabel serve --db labels.db --allow-review --reviewer alice
    """
    if not is_loopback(host) and not token:
        what = "read and review" if allow_review else "read"
        raise UsageError(
            f"--host {host} is reachable from other machines: pass --token (or set "
            f"${TOKEN_ENV}) so that only those who have it can {what} the archive"
        )
    if reviewer is not None and not allow_review:
        raise typer.BadParameter("needs --allow-review", param_hint="--reviewer")
    if allow_review and workers > 1:
        raise UsageError(
            "--allow-review serves one worker process (its review sessions live in it): "
            "leave --workers out"
        )
    if token is not None and len(token) < 8:
        raise UsageError("--token: at least 8 characters")
    if model is not None and not model.is_file():
        raise typer.BadParameter(f"no such file: {model}", param_hint="--model")
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serve needs its extras: pip install 'modlabel[serve]'") from None
    from .. import redaction
    from ..serve import create_app

    if token:
        redaction.remember([token])
    url = db_url(db)
    arguments = {
        "db_url": url,
        "model_path": str(model) if model is not None else None,
        "token": token,
        "root_path": root_path,
        "allow_upload": not no_upload,
        "allow_review": allow_review,
        "reviewer": reviewer_name(reviewer) if allow_review else None,
    }
    web = create_app(**arguments)  # here too: a database or model that fails says so once
    listener = _bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    say(
        f"serving {store_label(url)} at http://{shown}:{listener.getsockname()[1]}"
        f"{web.state.serve.root_path}/ "
        + (
            f"(review mode: /review records reviews as {arguments['reviewer']}; Ctrl-C stops)"
            if allow_review
            else "(read-only; Ctrl-C stops)"
        )
    )
    options = dict(
        log_level="warning",
        root_path=web.state.serve.root_path,
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    if workers > 1:
        from ..serve.app import CONFIG_ENV

        # Each worker process makes the app again from these (no secret leaves this
        # user's processes: the environment is theirs).
        os.environ[CONFIG_ENV] = json.dumps(arguments)
        config = uvicorn.Config(
            "modlabel.serve.app:app_from_environment", factory=True, workers=workers, **options
        )
    else:
        config = uvicorn.Config(web, **options)
    # uvicorn takes SIGINT and SIGTERM while it serves and shuts down gracefully, then
    # raises the signal again; modlabel's own watcher (``stopping``) must not count those
    # as the second signal that ends a process at once.
    previous = signal.set_wakeup_fd(-1)
    try:
        if workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[listener]).run()
        else:
            uvicorn.Server(config).run(sockets=[listener])
    finally:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(previous, warn_on_full_buffer=False)
    say("stopped")


def store_label(url: str) -> str:
    from ..store import safe_url

    return safe_url(url)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one line (exit 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        from ..errors import ModlabelError

        raise ModlabelError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    os.set_inheritable(sock.fileno(), True)
    return sock
