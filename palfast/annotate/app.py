"""The Flask app: server-rendered pages, plain HTML forms, a little JavaScript for keys.

Safety (the app is meant for 127.0.0.1, but a browser visiting other sites can reach it):

* every POST carries the session's CSRF token (a hidden form field), and the session cookie
  is ``SameSite=Strict``;
* the ``Host`` header must name this machine when bound to a loopback address, so a web page
  cannot reach the app through DNS rebinding;
* with a ``token`` (always when serving a network: palfast/annotate/__init__.py), every
  request needs it: the printed URL carries ``?token=...``, a request with the right one
  marks the browser's session cookie as let in, and any other request gets 403 (the
  shipped static files excepted, so the 403 page has its style);
* an answer is accepted only for a question the app issued to this session, once
  (:class:`~palfast.annotate.questions.Questions`); images are served by index only;
* requests are small (``MAX_REQUEST_BYTES``); anything malformed gets a 4xx page; the reply
  that says "saved" is sent only after the store committed the answers.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import unicodedata

from flask import Flask, abort, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException

from ..active.store import StoreCorruptError, StoreError
from .data import ImageData
from .questions import KINDS, NotIssued, Questions

#: Largest request body accepted: a captcha form is a few hundred bytes.
MAX_REQUEST_BYTES = 16 * 1024
#: Parts of a multipart form (a captcha form has ~15 fields; url-encoded forms are bounded by
#: MAX_REQUEST_BYTES alone, and fields the app does not read are ignored).
MAX_FORM_PARTS = 64
#: Longest annotator name (it is stored with every answer as the record's source).
MAX_NAME = 40
#: Host names that mean "this machine".
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
#: Browsers may keep a sample's image this long: ids never change meaning while a server runs.
IMAGE_MAX_AGE_S = 3600

log = logging.getLogger("palfast.annotate")


def clean_name(raw) -> str | None:
    """A usable annotator name, or None: 1..MAX_NAME printable characters, trimmed."""
    if not isinstance(raw, str):
        return None
    name = " ".join(raw.split())
    if not 0 < len(name) <= MAX_NAME:
        return None
    if any(unicodedata.category(c).startswith("C") for c in name):
        return None
    return name


def _hostname(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def create_app(
    data: ImageData,
    questions: Questions,
    *,
    default_name: str = "",
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES,
    title: str = "",
    token: str | None = None,
) -> Flask:
    """The app over ``data`` and ``questions``. ``allowed_hosts``: host names the ``Host``
    header may carry (None: any, for a server exposed on a network on purpose).
    ``token``: the shared secret every browser must present once as ``?token=`` (None:
    no login)."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),  # sessions end with the server: nothing to leak
        SESSION_COOKIE_NAME="palfast_annotate",
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_HTTPONLY=True,
        MAX_CONTENT_LENGTH=MAX_REQUEST_BYTES,
        MAX_FORM_MEMORY_SIZE=MAX_REQUEST_BYTES,
        MAX_FORM_PARTS=MAX_FORM_PARTS,
    )
    title = title or f"palfast annotate — {data.name}"

    def owner() -> str:
        if "sid" not in session:
            session["sid"] = secrets.token_urlsafe(16)
            session["csrf"] = secrets.token_urlsafe(32)
        return session["sid"]

    @app.before_request
    def _guard():
        if allowed_hosts is not None and _hostname(request.host) not in allowed_hosts:
            abort(
                400,
                f"Host {request.host!r} is not this machine; open the address that "
                "palfast annotate printed (or start it with --host to serve others)",
            )
        if token is not None and request.endpoint != "static":
            sent = request.args.get("token")
            if sent is not None and hmac.compare_digest(sent.encode(), token.encode()):
                session["let_in"] = True  # signed with this server's key: cannot be forged
            elif not session.get("let_in"):
                abort(
                    403,
                    "this page needs its token: open the address with ?token=... "
                    "that palfast annotate printed when it started (ask whoever "
                    "started it)",
                )
        if request.method == "POST":
            sent, expected = request.form.get("csrf", ""), session.get("csrf")
            if not expected:
                abort(403, "your session is new or expired (the server restarted): reload the page")
            if not hmac.compare_digest(sent.encode(), expected.encode()):
                abort(403, "the form's security token does not match this session: reload the page")

    @app.after_request
    def _headers(resp):
        # Everything comes from this server; no inline scripts; never inside a frame.
        resp.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
        )
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        return render_template("error.html", title=title, code=e.code, name=e.name, message=e.description), e.code

    def store_unavailable(e: StoreError, what: str):
        # StoreError is what RelationStore raises when it cannot do a write or read now:
        # the file stays locked by another writer past the busy timeout, the disk is full,
        # the file or its folder is read-only (palfast/active/answer_log.py, _sqlite_error),
        # a PostgreSQL server cannot be reached or ended the session (the store connects
        # again on its next call: palfast/active/postgres_log.py).
        # A damaged store (StoreCorruptError) is not "try again later": the 500 page.
        log.warning("palfast annotate: the answer store failed: %s", e)
        abort(503, f"the answer store is locked, full, unwritable or unreachable right now ({e}); {what}")

    @app.errorhandler(StoreError)
    def _store_error(e: StoreError):
        # A page that only reads the store (refresh before a question or the counts).
        if isinstance(e, StoreCorruptError):
            return _error(e)
        try:
            store_unavailable(e, "nothing is lost: reload the page")
        except HTTPException as http:
            return _http_error(http)

    @app.errorhandler(Exception)
    def _error(e: Exception):  # a bug must not take the server down or hide the cause
        log.exception("palfast annotate: unexpected error")
        return render_template(
            "error.html",
            title=title,
            code=500,
            name="Internal error",
            message=f"{type(e).__name__}: {e}. Answers saved before this are safe; reload the page.",
        ), 500

    def render_screen(kind: str):
        me = owner()
        name = session.get("name")
        if not name:
            return redirect(url_for("start"))
        q = questions.next(kind, me, client=request.remote_addr or "")
        stats = questions.stats(me)
        stats["agreement"] = questions.agreement(name)  # shown in the header's status line
        return render_template(
            f"{kind}.html",
            title=title,
            kind=kind,
            q=q,
            name=name,
            csrf=session["csrf"],
            stats=stats,
            message=session.pop("message", None),
            exhausted=questions.exhausted,
        )

    @app.get("/")
    def start():
        owner()
        if session.get("name") and "change" not in request.args:
            return redirect(url_for(session.get("screen", "pair")))
        return render_template(
            "start.html",
            title=title,
            csrf=session["csrf"],
            name=session.get("name") or default_name,
            data=data,
            stats=questions.stats(session["sid"]),
        )

    @app.post("/start")
    def begin():
        owner()
        name = clean_name(request.form.get("name"))
        if name is None:
            abort(400, f"give a name of 1 to {MAX_NAME} printable characters: it is saved with each of your answers")
        screen = request.form.get("screen", "pair")
        if screen not in KINDS:
            abort(400, f"screen must be one of {', '.join(KINDS)}")
        session["name"], session["screen"] = name, screen
        return redirect(url_for(screen), 303)

    @app.get("/pair")
    def pair():
        session["screen"] = "pair"
        return render_screen("pair")

    @app.get("/captcha")
    def captcha():
        session["screen"] = "captcha"
        return render_screen("captcha")

    @app.post("/answer")
    def answer():
        me, name = owner(), session.get("name")
        if not name:
            abort(403, "choose a name first: open the start page")
        qid = request.form.get("qid", "")
        try:
            q = questions.get(qid, me)
        except NotIssued as e:
            abort(409, str(e))
        if q.kind == "pair":
            choice = request.form.get("answer")
            if choice not in ("yes", "no", "skip"):
                abort(400, "answer must be yes, no or skip")
            answers = None if choice == "skip" else [choice == "yes"]
        else:
            picked = request.form.getlist("alike")
            try:
                positions = {int(p) for p in picked}
            except ValueError:
                abort(400, "alike must list candidate positions (0, 1, ...)")
            if len(positions) != len(picked) or not all(0 <= p < len(q.others) for p in positions):
                abort(400, f"alike must list distinct candidate positions 0..{len(q.others) - 1}")
            answers = [p in positions for p in range(len(q.others))]
        try:
            ids = questions.answer(qid, me, name, answers)
        except NotIssued as e:  # answered meanwhile (a double submit from another tab)
            abort(409, str(e))
        except StoreCorruptError:
            raise
        except StoreError as e:  # the question stays open: the person can send it again
            store_unavailable(e, "nothing was saved, submit again")
        if ids:
            n_yes = sum(answers)
            session["message"] = f"Saved {len(ids)} answer{'s' * (len(ids) > 1)} ({n_yes} alike) as #{ids[0]}" + (
                f"–#{ids[-1]}" if len(ids) > 1 else ""
            )
        else:
            session["message"] = "Skipped (nothing saved)"
        return redirect(url_for(q.kind), 303)

    @app.post("/undo")
    def undo():
        me, name = owner(), session.get("name")
        if not name:
            abort(403, "choose a name first: open the start page")
        screen = request.form.get("screen", session.get("screen", "pair"))
        if screen not in KINDS:
            abort(400, f"screen must be one of {', '.join(KINDS)}")
        try:
            last = questions.undo(me, name)
        except StoreCorruptError:
            raise
        except StoreError as e:
            store_unavailable(e, "nothing was undone, try again")
        if last is None:
            session["message"] = "Nothing to undo"
        else:
            ids = ", ".join(f"#{i}" for i in last.ids)
            session["message"] = f"Undone: {ids} (asked again)"
            screen = last.kind
        return redirect(url_for(screen), 303)

    @app.get("/image/<int:i>.png")
    def image(i: int):
        if i >= data.n:  # the converter already refuses negatives and anything but digits
            abort(404, f"no image {i}: the data set has {data.n}")
        resp = app.response_class(data.png(i), mimetype="image/png")
        resp.headers["Cache-Control"] = f"private, max-age={IMAGE_MAX_AGE_S}"
        return resp

    return app
