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
    PALFAST_ANNOTATE_TOKEN=... palfast annotate --demo --host 0.0.0.0   # a team on a network

On a network every browser must show a shared token once (``?token=`` in the printed URL);
see docs/annotate.md, "A team on a network: the token".
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import os
import secrets
import shlex
import socket
import sys
import urllib.parse

#: Default budget: the progress bar's end and where the app stops asking. PAL's digits demo
#: learns most of the classes within a few hundred answers.
DEFAULT_BUDGET = 500
#: Candidates on a captcha screen: 6 fit two rows of three and one glance (paper: "a few").
DEFAULT_CAPTCHA_K = 6
#: More candidates than fit a screen make the "click all alike" task error-prone.
MAX_CAPTCHA_K = 12
DEFAULT_PORT = 8000
#: TCP ports are 16-bit; 0 asks the system for a free one (printed at start).
MAX_PORT = 65535
#: Where ``--token`` is read from when not given (keeps it out of the process list).
TOKEN_ENV = "PALFAST_ANNOTATE_TOKEN"
#: Where ``--store`` is read from when not given (a PostgreSQL URL with a password stays
#: out of the process list).
STORE_ENV = "PALFAST_STORE"
#: The store written when neither ``--store`` nor ``$PALFAST_STORE`` names one.
DEFAULT_STORE = "answers.sqlite"
#: Shortest token accepted: a guessable word would let anyone on the network in.
MIN_TOKEN_CHARS = 12
#: Random bytes of a generated token (32 URL-safe characters), as Jupyter generates its own.
TOKEN_BYTES = 24
#: ``--index`` choices: palfast.knn's indexes but IVF-PQ (a compressed index trades recall
#: for memory; the rows' float32 copy of IVF fits wherever the embeddings file does).
INDEXES = ("auto", "exact", "ivf", "ivf-join", "hnsw")
#: The indexes ``--nlist`` and ``--nprobe`` apply to (both cluster the rows into lists).
LIST_INDEXES = ("ivf", "ivf-join")


DESCRIPTION = """\
Serve a local web page where people answer "are these two images alike?" for a data set,
straight into a palfast answer store (RelationStore: an SQLite file, or a PostgreSQL
database given as a postgresql:// URL). Two screens: pair (two images,
keys y / n / s) and captcha (one image and K candidates: click the alike ones). Questions
come from palfast.active.select_queries over the current embeddings and the answers so far;
a trainer in another process may rewrite the --embeddings file and the page follows. Every
answer is on disk before the page says "saved". Try: palfast annotate --demo

On a network (--host 0.0.0.0) people open the printed URL with its ?token=...: the token is
$PALFAST_ANNOTATE_TOKEN or --token, else a random one; traffic is plain HTTP (docs/annotate.md)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..active.policy import POLICIES
    from ..active.strategies import STRATEGIES

    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter

    src = p.add_argument_group("data (one of)")
    src.add_argument(
        "--demo", action="store_true", help="scikit-learn's digits (1,797 8x8 images), nothing else needed"
    )
    src.add_argument(
        "--data",
        metavar="PATH",
        help="a folder of images (ImageFolder-style class folders or flat; sample id "
        "= position in sorted relative-path order), or an .npy / .npz "
        "(key 'images') array [N, H, W(, C)]",
    )
    p.add_argument(
        "--embeddings",
        metavar="FILE.npy",
        help="[N, D] float16/32/64 embeddings the questions are chosen on, "
        "memory-mapped (never read whole); re-read whenever the file changes. "
        "A trainer must replace it atomically: write a temporary file, then "
        "os.replace (rewriting it in place under the live map is unsafe). "
        "Default: 16x16 grey thumbnails of the images",
    )
    p.add_argument(
        "--store",
        metavar="FILE.sqlite|URL",
        default=None,
        help="the RelationStore to write, created or resumed: an SQLite file, or a "
        "PostgreSQL database as postgresql://user@host/db (needs psycopg: "
        f"pip install 'palfast[postgres]'). Default: ${STORE_ENV} if set, else "
        f"./{DEFAULT_STORE}. Prefer the variable for a URL with a password (a "
        "--store value is visible to other users in the process list)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="pal",
        help="palfast.active.select_queries strategy (default pal; random needs no embeddings)",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=DEFAULT_BUDGET,
        help=f"answers wanted in the store; the app stops asking there (default {DEFAULT_BUDGET})",
    )
    p.add_argument(
        "--captcha-k",
        type=int,
        default=DEFAULT_CAPTCHA_K,
        help=f"candidates per captcha screen, 2..{MAX_CAPTCHA_K} (default {DEFAULT_CAPTCHA_K})",
    )
    p.add_argument(
        "--name",
        default=None,
        help="name proposed on the start page (default: your user name); each person "
        "types their own, saved with every answer as the store record's source",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only). 0.0.0.0 "
        "(or this machine's address) serves your network over plain HTTP: a "
        "token is then required (generated unless --token or "
        f"${TOKEN_ENV} gives one) and a warning is printed",
    )
    p.add_argument(
        "--token",
        default=None,
        metavar="SECRET",
        help=f"shared secret every browser must show once: people open the printed "
        f"URL ending in ?token=SECRET, the page then remembers them (a session "
        f"cookie); any other request gets 403. Default: ${TOKEN_ENV} if set; "
        f"else none on 127.0.0.1 and a random one on a network. At least "
        f"{MIN_TOKEN_CHARS} characters; prefer the variable (a --token value "
        f"is visible to other users in the process list)",
    )
    p.add_argument(
        "--no-token",
        action="store_true",
        help="serve a network without any login (anyone who can reach the port "
        "sees the images and writes answers); only on a network you trust",
    )
    p.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"port, 0..{MAX_PORT} (default {DEFAULT_PORT}; 0 picks a free one, printed at start)",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="first",
        help="how the store resolves answers that disagree (docs/active.md, 'Answers from "
        "people who make mistakes'): first = the first answer wins (default); majority = "
        "each pair's majority answer; confirm = a merge of two known classes waits for a "
        "second 'alike' answer. The log is the same file under every policy",
    )
    p.add_argument(
        "--reask",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share in [0, 1] of each refill of questions spent first on asking again the "
        "answers a second one could overturn (contested ones, then joins of two classes by size, then "
        "single-sample joins least similar first; needs --policy "
        "confirm or majority; default 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the query selection (default 0)")
    add_index_arguments(p)


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    """``--index``, ``--nlist``, ``--nprobe``, ``--ef-search``: the k-NN index of
    select_queries' candidate graph (palfast.knn; docs/annotate.md, "Large pools")."""
    from .._checks import int_at_least
    from ..knn import AUTO_EXACT_MAX_ROWS, DEFAULT_EF_SEARCH, DEFAULT_JOIN_NPROBE, DEFAULT_NPROBE
    from .questions import SELECT_K

    g = p.add_argument_group(
        "k-NN index (large pools)",
        "Each sample's nearest neighbours (palfast.knn) are searched once per embeddings\n"
        "file, in the background, and every refill reuses them; on a large pool an\n"
        "approximate index makes that search affordable.",
    )
    g.add_argument(
        "--index",
        choices=INDEXES,
        default="auto",
        help=f"auto (default): exact up to {AUTO_EXACT_MAX_ROWS:,} samples, above "
        "ivf-join; exact: every similarity (N^2 D work per search); ivf-join: "
        "palfast's IVF self search (torch only, no faiss needed); ivf: FAISS inverted "
        "lists, approximate; hnsw: FAISS graph index, approximate, no training "
        "(pip install faiss-cpu for these two)",
    )
    g.add_argument(
        "--nlist",
        type=int_at_least(1),
        default=None,
        metavar="LISTS",
        help="--index ivf or ivf-join: lists the samples are clustered into, 1..N "
        "(default: about 4*sqrt(N), at most N/39)",
    )
    g.add_argument(
        "--nprobe",
        type=int_at_least(1),
        default=None,
        metavar="LISTS",
        help=f"--index ivf or ivf-join: lists scanned per sample, 1..nlist; more is "
        f"slower and finds more true neighbours (default {DEFAULT_NPROBE} for ivf, "
        f"{DEFAULT_JOIN_NPROBE} for ivf-join, at most nlist)",
    )
    g.add_argument(
        "--ef-search",
        type=int_at_least(SELECT_K),
        default=None,
        metavar="NODES",
        help=f"--index hnsw: nodes explored per sample, >= {SELECT_K} (the neighbours "
        f"searched); more is slower and finds more true neighbours "
        f"(default {DEFAULT_EF_SEARCH})",
    )


def check_index_args(args, n: int | None = None) -> None:
    """The k-NN index options: each applies to its index only; with the pool size ``n``,
    ``--nlist`` at most n and ``--nprobe`` at most the lists. Raises ValueError naming them."""
    from ..knn import default_nlist

    for opt, value, indexes in (
        ("--nlist", args.nlist, LIST_INDEXES),
        ("--nprobe", args.nprobe, LIST_INDEXES),
        ("--ef-search", args.ef_search, ("hnsw",)),
    ):
        if value is not None and args.index not in indexes:
            named = " or ".join(indexes)
            raise ValueError(
                f"{opt} applies to --index {named} only, got --index {args.index}; "
                f"add --index {indexes[0]} or drop {opt}"
            )
    if n is not None and args.nlist is not None and args.nlist > n:
        raise ValueError(f"--nlist must be at most the {n} samples (each list is trained on samples), got {args.nlist}")
    lists = args.nlist if args.nlist is not None else None if n is None else default_nlist(n)
    if lists is not None and args.nprobe is not None and args.nprobe > lists:
        raise ValueError(
            f"--nprobe must be at most the {lists} lists"
            f"{'' if args.nlist is not None else ' (the default --nlist)'}, "
            f"got {args.nprobe}"
        )


def port_number(text: str) -> int:
    """argparse type of ``--port``: an integer 0..MAX_PORT (argparse names the option)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer 0..{MAX_PORT}, got {text!r}") from None
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_PORT} (0 picks a free port), got {port}")
    return port


def _fail(msg: str) -> int:
    _say(msg)
    return 2


def _say(msg: str, stream=None) -> None:
    """One line on ``stream`` (default stderr), written by one ``write`` call and flushed.
    print() writes the text and its newline separately, and stderr writes each through
    at once: a line of the refill thread (the k-NN graph search) could then be cut by a
    line of the main thread, in a terminal or a log that takes both streams."""
    stream = sys.stderr if stream is None else stream
    stream.write(f"palfast annotate: {msg}\n")
    stream.flush()


def _is_loopback(host: str) -> bool:
    from .app import LOOPBACK_NAMES

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK_NAMES


def _allowed_hosts(host: str):
    """Host names the Host header may carry: for a loopback bind the loopback names and the
    address served on (``--host 127.0.0.2`` must accept its own printed URL), a DNS
    rebinding defence; None (anything) when serving a network on purpose."""
    from .app import LOOPBACK_NAMES

    if not _is_loopback(host):
        return None
    return LOOPBACK_NAMES + ((host,) if host not in LOOPBACK_NAMES else ())


def login_token(args) -> str | None:
    """The token every browser must present (None: no login): ``--token``, else
    ``$PALFAST_ANNOTATE_TOKEN``, else a random one when serving a network (not with
    ``--no-token``). Raises ValueError for a token that is too short or not one word."""
    given = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    where = "--token" if args.token is not None else f"${TOKEN_ENV}"
    if args.no_token:
        if args.token is not None:
            raise ValueError("give --token or --no-token, not both")
        return None
    if given is None:
        return None if _is_loopback(args.host) else secrets.token_urlsafe(TOKEN_BYTES)
    if len(given) < MIN_TOKEN_CHARS or not given.isprintable() or any(c.isspace() for c in given):
        raise ValueError(
            f"{where} must be at least {MIN_TOKEN_CHARS} printable characters "
            f"without spaces (got {len(given)}); generate one with: python -c "
            f"'import secrets; print(secrets.token_urlsafe())'"
        )
    return given


def store_location(args) -> str:
    """Where the store is: ``--store``, else ``$PALFAST_STORE``, else DEFAULT_STORE."""
    return args.store or os.environ.get(STORE_ENV) or DEFAULT_STORE


def shown_store(store: str) -> str:
    """The store as messages show it: a URL without its password, a file as an absolute path."""
    from ..active.postgres_log import is_postgres_url, shown

    return shown(store) if is_postgres_url(store) else os.path.abspath(store)


def check_store(store: str) -> None:
    """``--store`` names an SQLite file in an existing directory or a postgresql:// URL
    (whether the server answers is found when the store opens); raises ValueError."""
    from ..active.postgres_log import URL_SCHEMES, is_postgres_url

    if is_postgres_url(store):
        return
    scheme = urllib.parse.urlsplit(store).scheme
    if "://" in store and len(scheme) > 1:  # "C://..." is a Windows drive, not a scheme
        raise ValueError(
            f"--store {store.split('://')[0]}://...: a store URL must start with "
            f"{' or '.join(URL_SCHEMES)} (PostgreSQL); give a PostgreSQL URL or "
            f"the path of an SQLite file"
        )
    folder = os.path.dirname(os.path.abspath(store))
    if not os.path.isdir(folder):
        raise ValueError(
            f"--store {store!r}: the directory {folder!r} does not exist; "
            f"create it first (mkdir -p {shlex.quote(folder)}) or give a --store "
            f"path in an existing directory"
        )


def check_args(args) -> None:
    """The checks that need no data, no store and no port: raises ValueError with a fix.
    Sets ``args.store`` to :func:`store_location`."""
    if bool(args.demo) == bool(args.data):
        raise ValueError("give exactly one of --demo (scikit-learn's digits) or --data PATH")
    if args.budget < 1:
        raise ValueError(f"--budget must be >= 1, got {args.budget}")
    if not 2 <= args.captcha_k <= MAX_CAPTCHA_K:
        raise ValueError(f"--captcha-k must be in 2..{MAX_CAPTCHA_K}, got {args.captcha_k}")
    check_index_args(args)
    from ..active.policy import check_policy_options

    check_policy_options("", getattr(args, "policy", "first"), getattr(args, "reask", 0.0))
    args.store = store_location(args)
    check_store(args.store)


def build(args, token: str | None = None):
    """(app, questions, store) from parsed arguments and the :func:`login_token`; raises
    ValueError / ImportError with a fix."""
    from ..active import RelationStore
    from ..active.store import StoreError
    from .app import create_app
    from .data import Embeddings, demo_data, load_data
    from .questions import Questions

    check_args(args)
    data = demo_data() if args.demo else load_data(args.data)
    fallback = None
    if args.strategy != "random" and (args.embeddings is None or not os.path.exists(args.embeddings)):
        fallback = data.simple_embeddings()
    check_index_args(args, data.n)
    embeddings = Embeddings(data.n, args.embeddings, fallback=fallback)
    try:
        store = RelationStore(args.store, policy=getattr(args, "policy", "first"))
    except (StoreError, ValueError) as e:
        # locked, read-only, unreadable, unreachable server, not a store: the store's
        # message says why (and names a URL without its password).
        raise ValueError(f"--store: {str(e).removeprefix('RelationStore: ')}") from None
    if store.num_ids > data.n:
        store.close()
        raise ValueError(
            f"the store {shown_store(args.store)!r} has answers about sample id "
            f"{store.num_ids - 1}, "
            f"but the data set has {data.n} images: wrong --store or --data?"
        )
    try:
        questions = Questions(
            store,
            embeddings,
            data.n,
            strategy=args.strategy,
            budget=args.budget,
            captcha_k=args.captcha_k,
            seed=args.seed,
            reask=getattr(args, "reask", 0.0),
            index=args.index,
            nlist=args.nlist,
            nprobe=args.nprobe,
            ef_search=args.ef_search,
            progress=_say,
        )
    except BaseException:
        store.close()
        raise
    default_name = args.name if args.name is not None else _user_name()
    app = create_app(data, questions, default_name=default_name, allowed_hosts=_allowed_hosts(args.host), token=token)
    return app, questions, store


def _user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers): the person types a name
        return ""


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, taken before the data is loaded so that a busy
    port fails at once (Werkzeug's own bind would print and ``sys.exit`` instead)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as Werkzeug chooses
    return socket.create_server((host, port), family=family)


def _url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def _warn_network(host: str, port: int, query: str, has_token: bool) -> None:
    """Say loudly, on stderr, that the page is open to the network and what protects it."""
    lines = [
        f"WARNING: listening on {host}:{port} serves every machine that can reach this "
        f"one, over plain HTTP (nothing is encrypted: anyone on the network path can read "
        f"the pages, the images, the token and the answers)."
    ]
    if _is_ip(host) and ipaddress.ip_address(host).is_unspecified:  # 0.0.0.0, ::
        lines.append(
            f"From other machines open {_url(socket.gethostname(), port)}{query} (or "
            f"this machine's address instead of its name)."
        )
    if has_token:
        lines.append(
            "Anyone with the token can read the images and write answers: share the "
            "URL only with your team, and only on a network you trust."
        )
    else:
        lines.append(
            "--no-token: there is NO LOGIN. Anyone who can reach this port can read "
            "the images and write answers. Use it only on a network you trust."
        )
    for line in lines:
        _say(line)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def run(args) -> int:
    try:
        import flask  # noqa: F401
        from werkzeug.serving import make_server
    except ImportError:
        return _fail("needs Flask: pip install 'palfast[annotate]'")
    try:
        check_args(args)
        token = login_token(args)
    except ValueError as e:
        return _fail(str(e))
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        # create_server re-raises with the address appended: keep the system's reason only
        # (a negative errno is getaddrinfo's: the host name does not resolve).
        reason = (
            str(e)
            if not e.errno
            else os.strerror(e.errno)
            if e.errno > 0
            else "not an address or host name of this machine"
        )
        return _fail(
            f"cannot listen on {args.host}:{args.port} ({reason}); pick "
            f"another --port (0 picks a free one) or another --host"
        )
    with sock:
        try:
            app, questions, store = build(args, token)
        except (ValueError, ImportError, FileNotFoundError) as e:
            return _fail(str(e).removeprefix("palfast annotate: "))
        try:
            # Werkzeug serves a duplicate of the socket's descriptor; ours closes here.
            server = make_server(args.host, args.port, app, threaded=True, fd=sock.fileno())
        except BaseException:
            questions.close()
            store.close()
            raise
    query = "" if token is None else "?" + urllib.parse.urlencode({"token": token})
    if not _is_loopback(args.host):
        _warn_network(args.host, server.port, query, token is not None)
    _say(
        f"serving on {_url(args.host, server.port)}{query}  (store {shown_store(args.store)}; Ctrl-C stops)", sys.stdout
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        questions.close()
        store.close()
    return 0
