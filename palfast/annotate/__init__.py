"""``palfast annotate``: people answer "are these alike?" in a browser, into a RelationStore.

A local web app (Flask) over a data set of images and an answer store. Two screens:

* **pair**: two images, alike / different / skip (keys ``y`` / ``n`` / ``s``);
* **captcha**: one image and K candidates, click the alike ones, submit: K answers in one
  interaction (the paper's Figure 1).

Questions come from :func:`palfast.active.select_queries` (``pal`` by default) over the
current embeddings and the store; a trainer in another process may rewrite the embeddings
file and the app picks it up. Every answer is committed to the store (source = the
person's name) before the page says "saved", so killing the server loses nothing it
acknowledged. See docs/annotate.md.

Example (a shell)::

    pip install 'palfast[annotate]'
    palfast annotate --demo                 # scikit-learn's digits, http://127.0.0.1:8000/
    palfast annotate --data photos/ --embeddings emb.npy --store answers.sqlite
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import os
import sys

#: Default budget: the progress bar's end and where the app stops asking. PAL's digits demo
#: learns most of the classes within a few hundred answers.
DEFAULT_BUDGET = 500
#: Candidates on a captcha screen: 6 fit two rows of three and one glance (paper: "a few").
DEFAULT_CAPTCHA_K = 6
#: More candidates than fit a screen make the "click all alike" task error-prone.
MAX_CAPTCHA_K = 12
DEFAULT_PORT = 8000


DESCRIPTION = """\
Serve a local web page where people answer "are these two images alike?" for a data set,
straight into a palfast answer store (RelationStore, SQLite). Two screens: pair (two images,
keys y / n / s) and captcha (one image and K candidates: click the alike ones). Questions
come from palfast.active.select_queries over the current embeddings and the answers so far;
a trainer in another process may rewrite the --embeddings file and the page follows. Every
answer is on disk before the page says "saved". Try: palfast annotate --demo"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..active.strategies import STRATEGIES

    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter

    src = p.add_argument_group("data (one of)")
    src.add_argument("--demo", action="store_true",
                     help="scikit-learn's digits (1,797 8x8 images), nothing else needed")
    src.add_argument("--data", metavar="PATH",
                     help="a folder of images (ImageFolder-style class folders or flat; sample id "
                          "= position in sorted relative-path order), or an .npy / .npz "
                          "(key 'images') array [N, H, W(, C)]")
    p.add_argument("--embeddings", metavar="FILE.npy",
                   help="[N, D] float embeddings the questions are chosen on; re-read whenever the "
                        "file changes (a trainer rewrites it: write a temporary file, then "
                        "os.replace). Default: 16x16 grey thumbnails of the images")
    p.add_argument("--store", metavar="FILE.sqlite", default="answers.sqlite",
                   help="the RelationStore to write (created or resumed; default ./answers.sqlite)")
    p.add_argument("--strategy", choices=STRATEGIES, default="pal",
                   help="palfast.active.select_queries strategy (default pal; random needs no embeddings)")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                   help=f"answers wanted in the store; the app stops asking there (default {DEFAULT_BUDGET})")
    p.add_argument("--captcha-k", type=int, default=DEFAULT_CAPTCHA_K,
                   help=f"candidates per captcha screen, 2..{MAX_CAPTCHA_K} (default {DEFAULT_CAPTCHA_K})")
    p.add_argument("--name", default=None,
                   help="name proposed on the start page (default: your user name); each person "
                        "types their own, saved with every answer as the store record's source")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
                        "serves your network, without any login: only on a network you trust)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0 picks a free one, printed at start)")
    p.add_argument("--seed", type=int, default=0, help="seed of the query selection (default 0)")


def _fail(msg: str) -> int:
    print(f"palfast annotate: {msg}", file=sys.stderr)
    return 2


def _allowed_hosts(host: str):
    """Host names the Host header may carry: loopback names for a loopback bind (DNS
    rebinding defence); anything when serving a network on purpose."""
    from .app import LOOPBACK_NAMES

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None if host not in LOOPBACK_NAMES else LOOPBACK_NAMES
    return LOOPBACK_NAMES if ip.is_loopback else None


def build(args):
    """(app, questions, store) from parsed arguments; raises ValueError / ImportError with a fix."""
    from ..active import RelationStore
    from .app import create_app
    from .data import Embeddings, demo_data, load_data
    from .questions import Questions

    if bool(args.demo) == bool(args.data):
        raise ValueError("give exactly one of --demo (scikit-learn's digits) or --data PATH")
    if args.budget < 1:
        raise ValueError(f"--budget must be >= 1, got {args.budget}")
    if not 2 <= args.captcha_k <= MAX_CAPTCHA_K:
        raise ValueError(f"--captcha-k must be in 2..{MAX_CAPTCHA_K}, got {args.captcha_k}")
    data = demo_data() if args.demo else load_data(args.data)
    fallback = None
    if args.strategy != "random" and (args.embeddings is None or not os.path.exists(args.embeddings)):
        fallback = data.simple_embeddings()
    embeddings = Embeddings(data.n, args.embeddings, fallback=fallback)
    store = RelationStore(args.store)
    if store.num_ids > data.n:
        store.close()
        raise ValueError(f"the store {args.store!r} has answers about sample id {store.num_ids - 1}, "
                         f"but the data set has {data.n} images: wrong --store or --data?")
    questions = Questions(store, embeddings, data.n, strategy=args.strategy, budget=args.budget,
                          captcha_k=args.captcha_k, seed=args.seed)
    default_name = args.name if args.name is not None else _user_name()
    app = create_app(data, questions, default_name=default_name, allowed_hosts=_allowed_hosts(args.host))
    return app, questions, store


def _user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers): the person types a name
        return ""


def run(args) -> int:
    try:
        import flask  # noqa: F401
        from werkzeug.serving import make_server
    except ImportError:
        return _fail("needs Flask: pip install 'palfast[annotate]'")
    try:
        app, questions, store = build(args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        return _fail(str(e).removeprefix("palfast annotate: "))
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except OSError as e:
        store.close()
        return _fail(f"cannot listen on {args.host}:{args.port} ({e}); pick another --port")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"palfast annotate: serving on http://{host}:{server.server_port}/  "
          f"(store {os.path.abspath(args.store)}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        questions.close()
        store.close()
    return 0
