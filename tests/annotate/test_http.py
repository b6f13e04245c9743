"""palfast annotate at the HTTP level (Flask's test client): the answer flow, undo, and every
bad request docs/annotate.md guards against — forged or replayed answers, foreign sessions, CSRF, oversized
and malformed bodies, image ids out of range or path-like, a foreign Host — each a 4xx,
never a crash, never a lost answer. Data loaders and the embeddings reload are here too."""

import contextlib
import copy
import importlib.util
import io
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("flask", reason="palfast annotate needs Flask: pip install 'palfast[annotate]'")
pytest.importorskip("PIL", reason="palfast annotate needs Pillow: pip install 'palfast[annotate]'")

from palfast.active import RelationStore  # noqa: E402
from palfast.annotate import _warn_network  # noqa: E402
from palfast.annotate import questions as questions_mod  # noqa: E402
from palfast.annotate.app import MAX_REQUEST_BYTES, create_app  # noqa: E402
from palfast.annotate.data import Embeddings, ImageData, load_data  # noqa: E402
from palfast.annotate.questions import Questions  # noqa: E402
from palfast.cli import main  # noqa: E402
from palfast.knn import as_rows  # noqa: E402

from _store_helpers import count_knn_searches  # noqa: E402

N, CLASSES = 40, 4
#: The served store's busy timeout: a test holding the write lock from another connection
#: gets its 503 after this long instead of the default 30 s.
STORE_TIMEOUT_S = 0.2


def images(n=N, seed=0):
    """n 8x8 grey images in CLASSES classes: a bright square in one of four corners + noise."""
    g = np.random.default_rng(seed)
    x = g.integers(0, 60, size=(n, 8, 8)).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i % CLASSES, 2)
        x[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 180
    return x


#: The shared secret of the app under test when a test asks for one.
TOKEN = "team-secret-0123456789"


@pytest.fixture
def served(tmp_path, request):
    """(client factory, Questions, store) over a small in-memory data set, refills inline.
    Marked ``@pytest.mark.parametrize("served", [TOKEN], indirect=True)``: the app wants that
    token (the factory's clients open ``/?token=`` first)."""
    secret = getattr(request, "param", None)
    data = ImageData("test", array=images()[..., None])
    store = RelationStore(tmp_path / "answers.sqlite", timeout=STORE_TIMEOUT_S)
    q = Questions(store, Embeddings(N, fallback=data.simple_embeddings()), N, budget=30, captcha_k=4, background=False)
    app = create_app(data, q, default_name="tester", token=secret)
    app.config["TESTING"] = False  # exercise the real error handlers

    def client(name="ann", screen="pair", address="127.0.0.1"):
        c = app.test_client()
        c.environ_base["REMOTE_ADDR"] = address  # only ever a WSGI value: nothing is sent
        if name is not None:
            page = c.get("/" if secret is None else f"/?token={secret}").get_data(as_text=True)
            r = c.post("/start", data={"csrf": token(page), "name": name, "screen": screen})
            assert r.status_code == 303
        return c

    yield client, q, store
    q.close()
    store.close()


def token(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def question(page: str):
    m = re.search(r'name="qid" value="([^"]+)"', page)
    return m.group(1) if m else None


def screen(c, kind="pair"):
    r = c.get(f"/{kind}")
    assert r.status_code == 200
    page = r.get_data(as_text=True)
    return page, token(page), question(page)


def test_start_page_needs_csrf_and_a_sane_name(served):
    client, _, _ = served
    c = client(name=None)
    page = c.get("/").get_data(as_text=True)
    assert 'value="tester"' in page  # --name is proposed
    assert c.post("/start", data={"name": "x"}).status_code == 403
    assert c.post("/start", data={"csrf": "forged", "name": "x"}).status_code == 403
    for bad in ("", "   ", "a" * 41, "tab\tin\x00name"):
        assert c.post("/start", data={"csrf": token(page), "name": bad}).status_code == 400
    assert c.post("/start", data={"csrf": token(page), "name": "x", "screen": "../etc"}).status_code == 400
    assert c.get("/pair").status_code == 302  # no name yet: back to the start page
    r = c.post("/start", data={"csrf": token(page), "name": "  Ada   L. ", "screen": "captcha"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/captcha")
    assert "you: <b>Ada L.</b>" in c.get("/captcha").get_data(as_text=True)


def test_pair_answer_is_stored_once_under_the_name(served):
    client, q, store = served
    c = client("ann")
    page, csrf, qid = screen(c)
    assert c.get("/pair").get_data(as_text=True).count(qid) >= 1  # a reload shows the same question
    i, j = map(int, re.search(r'data-pair="(\d+),(\d+)"', page).groups())
    r = c.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "yes"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/pair")
    assert [(row[1], row[2], row[3], row[5]) for row in store.log()] == [(i, j, True, "ann")]
    assert c.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "no"}).status_code == 409
    assert c.post("/answer", data={"csrf": csrf, "qid": "made-up", "answer": "no"}).status_code == 409
    page, csrf, qid2 = screen(c)
    assert qid2 != qid and "Saved 1 answer (1 alike) as #1" in page
    assert 'data-answered="1"' in page and 'data-last-ids="1"' in page
    assert c.post("/answer", data={"csrf": csrf, "qid": qid2, "answer": "skip"}).status_code == 303
    assert store.n_queries == 1 and "Skipped" in screen(c)[0]
    # The header shows the person's agreement with the majority (RelationStore.annotators).
    assert q.agreement("ann") == {"answers": 1, "repeated": 0, "agreement": None, "contradictions": 0}
    assert 'data-agreement=""' in screen(c)[0]
    store.record([[j, i]], [False], source="bob")  # a tie: no majority, so no agreement yet
    assert q.agreement("ann") == {"answers": 1, "repeated": 0, "agreement": None, "contradictions": 0}
    assert 'data-agreement=""' in screen(c)[0] and "no pair of yours asked twice with a majority yet" in screen(c)[0]
    store.record([[i, j]], [False], source="cy")  # now "different" has the majority
    assert q.agreement("ann") == {"answers": 1, "repeated": 1, "agreement": 0.0, "contradictions": 0}
    assert 'data-agreement="0.0000"' in screen(c)[0] and "agreement <b>0%</b> of 1 repeated" in screen(c)[0]
    assert q.agreement("cy")["agreement"] == 1.0


def test_malformed_answers_are_4xx_and_the_question_stays_open(served):
    client, _, store = served
    c = client("ann")
    _, csrf, qid = screen(c)
    for form, code in [
        ({"qid": qid, "answer": "yes"}, 403),  # no token
        ({"csrf": csrf + "x", "qid": qid, "answer": "yes"}, 403),  # wrong token
        ({"csrf": csrf, "qid": qid}, 400),  # no answer
        ({"csrf": csrf, "qid": qid, "answer": "maybe"}, 400),
        ({"csrf": csrf, "answer": "yes"}, 409),
    ]:  # no question
        assert c.post("/answer", data=form).status_code == code, form
    assert c.post("/answer", data="not a form", content_type="application/json").status_code == 403
    big = {"csrf": csrf, "qid": qid, "answer": "yes", "pad": "x" * MAX_REQUEST_BYTES}
    assert c.post("/answer", data=big).status_code == 413
    many = {"csrf": csrf, "qid": qid, "answer": "yes", **{f"f{k}": "1" for k in range(200)}}
    assert c.post("/answer", data=many, content_type="multipart/form-data").status_code == 413
    assert c.post("/answer", data={**many, "answer": "maybe"}).status_code == 400  # extras ignored
    assert store.n_queries == 0
    assert c.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "no"}).status_code == 303
    assert store.n_queries == 1


@pytest.mark.slow
def test_answers_only_for_questions_issued_to_this_session(served):
    client, _, store = served
    ann, bob = client("ann"), client("bob")
    _, _, qid_ann = screen(ann)
    _, csrf_bob, qid_bob = screen(bob)
    assert qid_ann != qid_bob
    # bob cannot answer ann's question, even knowing its id
    assert bob.post("/answer", data={"csrf": csrf_bob, "qid": qid_ann, "answer": "yes"}).status_code == 409
    assert bob.post("/answer", data={"csrf": csrf_bob, "qid": qid_bob, "answer": "no"}).status_code == 303
    assert [r[5] for r in store.log()] == ["bob"]


def test_captcha_records_k_answers_in_one_interaction(served):
    client, _, store = served
    c = client("ann", screen="captcha")
    page, csrf, qid = screen(c, "captcha")
    anchor = int(re.search(r'data-anchor="(\d+)"', page).group(1))
    cands = [int(v) for v in re.search(r'data-candidates="([\d,]+)"', page).group(1).split(",")]
    assert len(cands) == 4 and anchor not in cands
    for bad in (["4"], ["-1"], ["x"], ["0", "0"]):
        assert c.post("/answer", data={"csrf": csrf, "qid": qid, "alike": bad}).status_code == 400
    assert c.post("/answer", data={"csrf": csrf, "qid": qid, "alike": ["0", "2"]}).status_code == 303
    rows = store.log()
    assert [(r[1], r[2], r[3]) for r in rows] == [(anchor, cands[k], k in (0, 2)) for k in range(4)]
    assert len({r[4] for r in rows}) == 1  # one transaction
    assert "Saved 4 answers (2 alike)" in screen(c, "captcha")[0]


def test_undo_supersedes_and_asks_again(served):
    client, _, store = served
    c = client("ann")
    page, csrf, qid = screen(c)
    pair = re.search(r'data-pair="([\d,]+)"', page).group(1)
    assert c.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "yes"}).status_code == 303
    assert c.post("/undo", data={"screen": "pair"}).status_code == 403  # CSRF applies to undo too
    r = c.post("/undo", data={"csrf": csrf, "screen": "pair"})
    assert r.status_code == 303
    page = screen(c)[0]
    assert "Undone: #1" in page and f'data-pair="{pair}"' in page
    assert store.n_queries == 0 and store.log()[0][6] == "ann"
    c.post("/undo", data={"csrf": csrf, "screen": "pair"})
    assert "Nothing to undo" in screen(c)[0]
    assert c.post("/undo", data={"csrf": csrf, "screen": "nope"}).status_code == 400


@pytest.mark.slow
def test_store_failure_is_503_and_the_answer_can_be_resent(served, tmp_path):
    """A real store failure: another SQLite connection holds the write lock on the store
    file past the store's busy timeout, so RelationStore.record / retract raise StoreError."""
    client, q, store = served
    c = client("ann")
    _, csrf, qid = screen(c)
    blocker = sqlite3.connect(tmp_path / "answers.sqlite", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process writing, for too long
        r = c.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "yes"})
        assert r.status_code == 503, r.get_data(as_text=True)
        page = r.get_data(as_text=True)
        assert "nothing was saved" in page and "locked" in page
        assert c.get("/pair").status_code == 200  # reads go on beside the writer (WAL)
    finally:
        blocker.execute("ROLLBACK")
    assert c.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "yes"}).status_code == 303
    assert store.n_queries == 1
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        r = c.post("/undo", data={"csrf": csrf, "screen": "pair"})
        assert r.status_code == 503 and "nothing was undone" in r.get_data(as_text=True)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.n_queries == 1
    assert c.post("/undo", data={"csrf": csrf, "screen": "pair"}).status_code == 303
    assert store.n_queries == 0


def test_an_unexpected_error_is_a_500_page_not_a_dead_server(served, monkeypatch):
    client, q, _ = served
    c = client("ann")
    monkeypatch.setattr(q, "stats", lambda owner: 1 / 0)
    r = c.get("/pair")
    assert r.status_code == 500 and "ZeroDivisionError" in r.get_data(as_text=True)
    monkeypatch.undo()
    assert c.get("/pair").status_code == 200


@pytest.mark.parametrize("served", [TOKEN], indirect=True)
def test_token_lets_a_browser_in_once_and_keeps_others_out(served):
    client, _, store = served
    stranger = client(name=None)
    for path in ("/", "/pair", "/image/0.png", f"/?token={TOKEN}x", "/?token=", "/?tok=" + TOKEN):
        r = stranger.get(path)
        assert r.status_code == 403, path
        assert "?token=" in r.get_data(as_text=True)
    assert stranger.post("/start", data={"name": "x"}).status_code == 403
    assert stranger.get("/static/annotate.css").status_code == 200  # the 403 page's style
    c = client(name=None)
    r = c.get(f"/?token={TOKEN}")
    assert r.status_code == 200 and "palfast_annotate=" in r.headers["Set-Cookie"]
    page = r.get_data(as_text=True)
    # Let in: no token needed any more; CSRF still applies to every POST.
    assert c.get("/image/0.png").status_code == 200
    assert c.post("/start", data={"name": "ann"}).status_code == 403
    assert c.post("/start", data={"csrf": token(page), "name": "ann"}).status_code == 303
    _, csrf, qid = screen(c)
    assert c.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "yes"}).status_code == 303
    assert store.n_queries == 1
    assert stranger.get("/pair").status_code == 403  # still out


def test_a_flood_of_sessions_from_one_client_keeps_anothers_question(served, monkeypatch):
    """One address opening sessions without end (a script) forgets its own oldest questions,
    never the open question of a person at another address."""
    client, q, store = served
    monkeypatch.setattr(questions_mod, "MAX_ISSUED", 8)
    monkeypatch.setattr(questions_mod, "MAX_ISSUED_PER_CLIENT", 3)
    ann = client("ann", address="192.0.2.10")
    _, csrf, qid = screen(ann)
    flood = [client(f"bot{k}", address="192.0.2.66") for k in range(12)]
    flood_qids = [screen(b)[2] for b in flood]
    assert ann.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "yes"}).status_code == 303
    assert [r[5] for r in store.log()] == ["ann"]
    assert all(flood_qids) and len(q._issued) == 3  # the flood holds MAX_ISSUED_PER_CLIENT
    first = flood[0]
    assert (
        first.post(
            "/answer",
            data={"csrf": token(first.get("/pair").get_data(as_text=True)), "qid": flood_qids[0], "answer": "no"},
        ).status_code
        == 409
    )
    # Many clients at once: past MAX_ISSUED, the client holding the most gives one up.
    others = [client(f"p{k}", address=f"192.0.2.{k + 100}") for k in range(4)]
    for c in others:
        screen(c)
    _, csrf, qid = screen(ann)
    assert len(q._issued) == 8
    assert ann.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "no"}).status_code == 303


def test_cli_token_checks(capsys, monkeypatch):
    monkeypatch.delenv("PALFAST_ANNOTATE_TOKEN", raising=False)
    assert main(["annotate", "--demo", "--token", "short"]) == 2
    assert "--token must be at least 12" in capsys.readouterr().err
    assert main(["annotate", "--demo", "--token", "two words here"]) == 2
    assert "without spaces" in capsys.readouterr().err
    assert main(["annotate", "--demo", "--token", TOKEN, "--no-token"]) == 2
    assert "not both" in capsys.readouterr().err
    monkeypatch.setenv("PALFAST_ANNOTATE_TOKEN", "tiny")
    assert main(["annotate", "--demo"]) == 2
    assert "$PALFAST_ANNOTATE_TOKEN must be at least 12" in capsys.readouterr().err
    _warn_network("0.0.0.0", 8000, "", has_token=False)  # what --no-token prints
    err = capsys.readouterr().err
    assert "WARNING" in err and "NO LOGIN" in err and ":8000/ " in err


def test_images_by_index_only(served):
    client, _, _ = served
    c = client(name=None)
    r = c.get("/image/0.png")
    assert r.status_code == 200 and r.data[:8] == b"\x89PNG\r\n\x1a\n" and r.mimetype == "image/png"
    for bad in (
        f"/image/{N}.png",
        "/image/-1.png",
        "/image/1e3.png",
        "/image/..%2f..%2fetc%2fpasswd",
        "/image/../../etc/passwd",
        "/image/0.png/../../x",
        "/static/../app.py",
        "/static/..%2fapp.py",
        f"/image/{10**30}.png",
    ):
        assert c.get(bad).status_code == 404, bad


def test_foreign_host_header_and_security_headers(served):
    client, _, _ = served
    c = client(name=None)
    r = c.get("/")
    assert "SameSite=Strict" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]
    assert c.get("/", headers={"Host": "evil.example:8000"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000"):
        assert c.get("/", headers={"Host": host}).status_code == 200
    r = c.get("/")
    assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert c.get("/static/annotate.js").status_code == 200  # shipped with the package


def test_budget_stops_the_questions(tmp_path):
    data = ImageData("test", array=images())
    with RelationStore(tmp_path / "s.sqlite") as store:
        q = Questions(store, Embeddings(N, fallback=data.simple_embeddings()), N, budget=2, background=False)
        for k in range(2):
            got = q.next("pair", "me")
            q.answer(got.qid, "me", "ann", [bool(k)])
        assert q.next("pair", "me") is None and q.stats("me")["answered"] == 2
        page = create_app(data, q).test_client()
        assert page.get("/").status_code == 200


def test_random_strategy_without_embeddings_and_captcha(tmp_path):
    with RelationStore() as store:
        q = Questions(store, Embeddings(N), N, strategy="random", captcha_k=5, background=False)
        got = q.next("captcha", "me")
        assert len(got.others) == 5 and got.anchor not in got.others
        q.answer(got.qid, "me", "ann", [True] * 5)
        assert store.n_queries == 5 and q.stats("me")["classes"] == 1
        with pytest.raises(ValueError, match="expected 5 answers"):
            q.answer(q.next("captcha", "me").qid, "me", "ann", [True])


def test_embeddings_file_is_reloaded_when_it_changes(tmp_path):
    path = tmp_path / "emb.npy"
    x = np.random.default_rng(0).standard_normal((N, 3)).astype(np.float32)
    np.save(path, x)
    emb = Embeddings(N, path)
    assert emb.get()[1] == 1 and not emb.poll()
    with RelationStore() as store:
        q = Questions(store, emb, N, background=False)
        assert q.next("pair", "me") is not None and q._pending
        np.save(tmp_path / "tmp.npy", -x)  # how a trainer should write it: then os.replace
        os.replace(tmp_path / "tmp.npy", path)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        with q._lock:
            q._sync()
        assert emb.get()[1] == 2 and np.array_equal(emb.get()[0], -x) and not q._pending
        np.save(path, np.zeros((N + 1, 3), np.float32))  # wrong shape: keep the previous ones
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
        assert not emb.poll() and "N = 40" in emb.error and emb.get()[1] == 2
    np.save(path, np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="one row per image"):
        Embeddings(N, path)


def test_data_loaders(tmp_path):
    from PIL import Image

    x = images(6)
    for k in range(6):  # ImageFolder-style: root/<class>/<image>
        (tmp_path / "tree" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[k]).save(tmp_path / "tree" / f"c{k % 2}" / f"{k}.png")
        (tmp_path / "flat").mkdir(exist_ok=True)
        Image.fromarray(x[k]).convert("RGB").save(tmp_path / "flat" / f"{k}.jpg")
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    tree, flat = load_data(tmp_path / "tree"), load_data(tmp_path / "flat")
    assert tree.n == 6 and flat.n == 6
    assert np.array_equal(np.asarray(tree.pixels(0).convert("L")), x[0])  # c0/0.png comes first
    assert tree.png(1)[:4] == b"\x89PNG" and flat.simple_embeddings().shape == (6, 256)
    np.save(tmp_path / "a.npy", x.astype(np.float32) / 255)
    assert np.array_equal(np.asarray(load_data(tmp_path / "a.npy").pixels(2)), x[2])
    np.savez(tmp_path / "b.npz", images=np.repeat(x[..., None], 3, -1), labels=np.arange(6))
    assert load_data(tmp_path / "b.npz").n == 6
    np.savez(tmp_path / "c.npz", a=x, b=x)
    with pytest.raises(ValueError, match="name the images 'images'"):
        load_data(tmp_path / "c.npz")
    np.save(tmp_path / "d.npy", x[:1])
    with pytest.raises(ValueError, match="at least 2"):
        load_data(tmp_path / "d.npy")
    np.save(tmp_path / "e.npy", np.zeros((4, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        load_data(tmp_path / "e.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(tmp_path / "missing")
    sizes = np.zeros((2, 1000, 700, 3), np.uint8), np.zeros((2, 8, 5), np.uint8)
    for big, side in zip(sizes, (512, 128)):  # shrunk to MAX_DISPLAY_SIDE, grown to MIN_DISPLAY_SIDE
        np.save(tmp_path / "s.npy", big)
        assert max(Image.open(io.BytesIO(load_data(tmp_path / "s.npy").png(0))).size) == side


def test_cli_help_and_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["annotate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "captcha" in out and "--demo" in out and "127.0.0.1" in out
    assert main(["annotate", "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "exactly one of --demo" in capsys.readouterr().err
    assert main(["annotate", "--demo", "--captcha-k", "40"]) == 2
    with RelationStore(tmp_path / "big.sqlite") as s:
        s.record([[0, 5000]], [True])
    np.save(tmp_path / "x.npy", images())
    assert (
        main(["annotate", "--data", str(tmp_path / "x.npy"), "--store", str(tmp_path / "big.sqlite"), "--port", "0"])
        == 2
    )
    assert "sample id 5000" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["-1", "99999", "65536", "eighty"])
def test_cli_port_must_be_a_tcp_port(port, capsys):
    with pytest.raises(SystemExit) as e:
        main(["annotate", "--demo", "--port", port])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --port" in err and "0..65535" in err and port in err


def test_cli_store_in_a_missing_directory_is_one_line(tmp_path, capsys):
    np.save(tmp_path / "x.npy", images())
    missing = tmp_path / "missing_dir"
    assert main(["annotate", "--data", str(tmp_path / "x.npy"), "--store", str(missing / "x.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--store" in err and "does not exist" in err and f"mkdir -p {missing}" in err
    assert not missing.exists()


def test_cli_store_url_and_the_environment_reach_the_store(tmp_path, postgres_url, monkeypatch, capsys):
    """--store postgresql://... opens that database; without --store, $PALFAST_STORE names
    the store (a URL or a file); --store wins over it."""
    from palfast import annotate
    from palfast.cli import build_parser

    with pytest.raises(SystemExit):
        main(["annotate", "--help"])
    assert "postgresql://user@host/db" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", images())
    data = ["annotate", "--data", str(tmp_path / "x.npy")]

    def answer_one(args):
        app, q, store = annotate.build(args)
        try:
            got = q.next("pair", "me")
            q.answer(got.qid, "me", "ann", [True])
            return store.path, store.n_queries
        finally:
            q.close()
            store.close()

    monkeypatch.delenv(annotate.STORE_ENV, raising=False)
    assert answer_one(build_parser().parse_args([*data, "--store", postgres_url])) == (postgres_url, 1)
    monkeypatch.setenv(annotate.STORE_ENV, postgres_url)
    assert answer_one(build_parser().parse_args(data)) == (postgres_url, 2)
    with RelationStore(postgres_url) as s:
        assert [r[5] for r in s.log()] == ["ann", "ann"]
    file = str(tmp_path / "flag.sqlite")
    assert answer_one(build_parser().parse_args([*data, "--store", file])) == (file, 1)
    monkeypatch.setenv(annotate.STORE_ENV, file)
    assert answer_one(build_parser().parse_args(data)) == (file, 2)


@pytest.mark.parametrize(
    "url, message",
    [
        (
            "postgresql://palfast:hunter2@/nodb?host=/nonexistent-socket-folder",
            "--store: cannot reach the PostgreSQL store 'postgresql://palfast:***@/nodb",
        ),
        (
            "mysql://palfast:hunter2@db/answers",
            "--store mysql://...: a store URL must start with postgresql:// or postgres://",
        ),
    ],
)
def test_cli_bad_store_url_is_one_line_naming_the_option(tmp_path, capsys, monkeypatch, url, message):
    pytest.importorskip("psycopg")
    from palfast import annotate

    np.save(tmp_path / "x.npy", images())
    for argv, env in ((["--store", url], None), ([], url)):
        if env is None:
            monkeypatch.delenv(annotate.STORE_ENV, raising=False)
        else:
            monkeypatch.setenv(annotate.STORE_ENV, env)
        assert main(["annotate", "--data", str(tmp_path / "x.npy"), "--port", "0", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert message in err and "hunter2" not in err


#: How long a test waits for `palfast annotate` to print its address (imports torch and Flask).
SERVER_START_S = 60.0


@pytest.mark.slow
def test_cli_port_in_use_is_one_line_and_exit_2(tmp_path):
    """A separate process: Werkzeug's own bind printed two lines and called sys.exit(1)
    after the data and the store were loaded (with --demo the refill thread, still inside
    torch at exit, then aborted the interpreter)."""
    np.save(tmp_path / "x.npy", images())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "palfast.cli",
                "annotate",
                "--data",
                str(tmp_path / "x.npy"),
                "--store",
                str(tmp_path / "s.sqlite"),
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=SERVER_START_S,
            cwd=tmp_path,
        )
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "pick another --port" in r.stderr and not (tmp_path / "s.sqlite").exists()


@contextlib.contextmanager
def serve(tmp_path, *args, env=None):
    """A real `palfast annotate` process on --port 0 over a small .npy data set; yields
    (URL it printed, its start-up output). Stopped with Ctrl-C (SIGINT), killed if stuck."""
    np.save(tmp_path / "serve.npy", images())
    cmd = [
        sys.executable,
        "-m",
        "palfast.cli",
        "annotate",
        "--data",
        str(tmp_path / "serve.npy"),
        "--store",
        str(tmp_path / "serve.sqlite"),
        "--port",
        "0",
        *args,
    ]
    # cwd: `python -m` puts the cwd first on sys.path, and a checkout's palfast/ (no
    # compiled _C) would shadow the installed package.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=tmp_path,
    )
    # A thread reads the output, so a server that prints nothing cannot block the test
    # past SERVER_START_S (a plain readline would wait for ever).
    out: queue.Queue = queue.Queue()

    def read():
        with contextlib.suppress(ValueError, OSError):  # the pipe closed under us at the end
            for line in proc.stdout:
                out.put(line)
        out.put("")

    threading.Thread(target=read, daemon=True).start()
    lines, deadline = [], time.monotonic() + SERVER_START_S
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = out.get(timeout=left)
            except queue.Empty:
                break
            if not line:
                break
            lines.append(line)
            if line.startswith("palfast annotate: serving on http://"):
                yield line.split()[4], "".join(lines)
                return
        raise AssertionError(f"palfast annotate did not start within {SERVER_START_S} s: {''.join(lines)}")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.slow
def test_served_on_another_loopback_address_accepts_its_own_url(tmp_path):
    with serve(tmp_path, "--host", "127.0.0.2") as (url, _):
        assert url.startswith("http://127.0.0.2:")
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and "palfast annotate" in r.read().decode()
        req = urllib.request.Request(url, headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400  # still no DNS rebinding


@pytest.mark.slow
def test_served_with_a_token_from_the_environment(tmp_path):
    with serve(tmp_path, "--host", "127.0.0.2", env={"PALFAST_ANNOTATE_TOKEN": TOKEN}) as (url, out):
        assert url.endswith(f"/?token={TOKEN}") and "WARNING" not in out  # loopback: no warning
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url.split("?")[0], timeout=10)
        assert e.value.code == 403


@pytest.mark.slow
def test_served_on_every_address_warns_and_makes_a_token(tmp_path):
    """--host 0.0.0.0 (listening on every interface for a few seconds; the requests go to
    127.0.0.1 only) without a token: a random one is made, and a loud warning printed."""
    with serve(tmp_path, "--host", "0.0.0.0", env={"PALFAST_ANNOTATE_TOKEN": ""}) as (url, out):
        made = re.search(r"\?token=([\w-]+)", url).group(1)
        assert len(made) >= 32 and "WARNING" in out and "plain HTTP" in out
        local = url.replace("0.0.0.0", "127.0.0.1")
        with urllib.request.urlopen(local, timeout=10) as r:
            assert r.status == 200
        for bad in (local.split("?")[0], local[:-1]):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(bad, timeout=10)
            assert e.value.code == 403


def test_max_issued_bounds_memory(served, monkeypatch):
    _, q, _ = served
    monkeypatch.setattr(questions_mod, "MAX_ISSUED", 3)
    qids = [q.next("pair", f"owner{k}").qid for k in range(5)]
    assert len(q._issued) == 3 and list(q._issued) == qids[2:]
    with pytest.raises(questions_mod.NotIssued):
        q.answer(qids[0], "owner0", "x", [True])
    assert torch.is_tensor(q.store.roots([0]))


def test_assets_are_installed_with_the_package():
    # CI installs the wheel (not the source tree): templates and static files must be in it.
    from importlib.resources import files

    root = files("palfast.annotate")
    for name in ("base.html", "pair.html", "captcha.html", "start.html", "error.html", "noquestion.html"):
        assert (root / "templates" / name).is_file(), name
    for name in ("annotate.js", "annotate.css"):
        assert (root / "static" / name).is_file(), name


def test_two_servers_share_one_store(tmp_path):
    """Two app processes (here: two Questions on one file) never ask what the other's
    people answered, and see each other's undo."""
    data = ImageData("test", array=images())
    emb = data.simple_embeddings()
    with RelationStore(tmp_path / "s.sqlite") as sa, RelationStore(tmp_path / "s.sqlite") as sb:
        qa = Questions(sa, Embeddings(N, fallback=emb), N, background=False)
        qb = Questions(sb, Embeddings(N, fallback=emb), N, background=False)
        got = qa.next("pair", "a")
        ids = qa.answer(got.qid, "a", "ann", [True])
        for _ in range(10):
            other = qb.next("pair", "b")
            assert {got.anchor, got.others[0]} != {other.anchor, other.others[0]}
            assert sb.same(other.anchor, other.others[0]) is None
            qb.answer(other.qid, "b", "bob", [False])
        assert qb.stats("b")["answered"] == 11
        qa.undo("a", "ann")
        assert qb.stats("b")["answered"] == 10 and sb.log()[ids[0] - 1][6] == "ann"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):  # a 303 comes back as an HTTPError
        return None


class _Browser:
    """One person's browser against a real server: a cookie jar, forms posted by hand,
    redirects not followed (so answering leaves no next question on the screen)."""

    def __init__(self, url: str, name: str):
        import http.cookiejar

        self.base = url.split("?")[0].rstrip("/")
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect
        )
        self.csrf = token(self.get("/"))
        assert self.post("/start", name=name, screen="pair") == 303

    def get(self, path: str) -> str:
        with self.opener.open(self.base + path, timeout=60) as r:
            return r.read().decode()

    def post(self, path: str, **form) -> int:
        body = urllib.parse.urlencode({"csrf": self.csrf, **form}).encode()
        try:
            with self.opener.open(self.base + path, data=body, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def question(self) -> tuple[str, tuple[int, int]]:
        page = self.get("/pair")
        pair = tuple(map(int, re.search(r'data-pair="(\d+),(\d+)"', page).groups()))
        return question(page), pair

    def answered(self) -> int:
        return int(re.search(r'data-answered="(\d+)"', self.get("/pair")).group(1))


#: Questions each person answers in the two-server test.
TWO_SERVER_ROUNDS = 4


@pytest.mark.slow
def test_two_servers_on_one_postgres_database(tmp_path, postgres_url):
    """Two `palfast annotate` processes, same data and seed, one PostgreSQL --store; a person
    on each answers in turn over real HTTP: every answer lands once, neither server asks a
    pair the other's person answered (their queues are alike: each refreshes first), each
    sees the other's answers, and an undo on B of an answer given on B retracts it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        serve(tmp_path / "a", "--store", postgres_url) as (url_a, out_a),
        serve(tmp_path / "b", "--store", postgres_url) as (url_b, _),
    ):
        assert postgres_url in out_a  # the start-up line names the store (no password here)
        ann, bob = _Browser(url_a, "ann"), _Browser(url_b, "bob")
        asked, given = set(), []
        for _ in range(TWO_SERVER_ROUNDS):
            for who, name in ((ann, "ann"), (bob, "bob")):
                qid, pair = who.question()
                assert pair not in asked, (name, pair, asked)  # answered on either server
                asked.add(pair)
                yes = len(given) % 2 == 0
                assert who.post("/answer", qid=qid, answer="yes" if yes else "no") == 303
                given.append((*pair, yes, name))
        n = 2 * TWO_SERVER_ROUNDS
        assert ann.answered() == bob.answered() == n
        assert bob.post("/undo", screen="pair") == 303  # bob's last answer, given on B
        assert f"Undone: #{n}" in bob.get("/pair")
        assert ann.answered() == bob.answered() == n - 1
    with RelationStore(postgres_url) as s:
        log = s.log()
    assert [(r[1], r[2], r[3], r[5]) for r in log] == given  # each once, in order
    assert [r[6] for r in log] == [None] * (n - 1) + ["bob"]


def _end_store_sessions(admin: str, url: str) -> None:
    """End every session on the database of ``url`` (as a PostgreSQL restart or a network
    failure would): the store's next call raises StoreError, the one after connects again."""
    from _store_helpers import execute_sql

    name = urllib.parse.urlsplit(url).path.lstrip("/")
    # The second argument: wait (ms) until the session has ended (PostgreSQL 14 and later).
    execute_sql(admin, f"SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = '{name}'")


#: Seconds a test waits for the background refill thread to finish a refill.
REFILL_WAIT_S = 30.0


def test_a_lost_store_connection_is_503_then_the_page_works_again(postgres_admin, postgres_url):
    """The store's connection is lost (the server ended the session): the page that reads
    the store answers 503 with the store's reason, not 500, and the next one works."""
    data = ImageData("test", array=images()[..., None])
    with RelationStore(postgres_url) as store:
        q = Questions(store, Embeddings(N, fallback=data.simple_embeddings()), N, background=False)
        app = create_app(data, q, default_name="tester")
        c = app.test_client()
        page = c.get("/").get_data(as_text=True)
        assert c.post("/start", data={"csrf": token(page), "name": "ann"}).status_code == 303
        assert c.get("/pair").status_code == 200
        _end_store_sessions(postgres_admin, postgres_url)
        r = c.get("/pair")
        assert r.status_code == 503, r.get_data(as_text=True)
        assert "cannot reach the PostgreSQL store" in r.get_data(as_text=True)
        page, csrf, qid = screen(c)  # connects again
        assert c.post("/answer", data={"csrf": csrf, "qid": qid, "answer": "yes"}).status_code == 303
        assert store.n_queries == 1
        q.close()


def test_the_refill_thread_survives_a_lost_store_connection(postgres_admin, postgres_url):
    """A refill whose store read fails (the connection was lost) reports the error and
    the background thread keeps refilling afterwards: it used to die, and the page then
    ran out of questions for good."""
    data = ImageData("test", array=images()[..., None])
    with RelationStore(postgres_url) as store:
        q = Questions(store, Embeddings(N, fallback=data.simple_embeddings()), N)
        try:
            assert q.next("pair", "me") is not None  # the first refill is done

            def refill_and_wait():
                with q._lock:
                    q._last_added = None
                    q._want_refill = True
                    q._changed.notify_all()
                    assert q._changed.wait_for(lambda: q._last_added is not None, timeout=REFILL_WAIT_S)

            _end_store_sessions(postgres_admin, postgres_url)
            refill_and_wait()
            assert "cannot reach the PostgreSQL store" in q.refill_error
            assert q._thread.is_alive()
            refill_and_wait()  # connects again
            assert q.refill_error is None and q._last_added > 0
        finally:
            q.close()


def test_embeddings_file_written_later_is_picked_up(tmp_path):
    path = tmp_path / "emb.npy"
    fallback = np.ones((N, 2), np.float32)
    emb = Embeddings(N, path, fallback=fallback)  # the trainer has not written it yet
    assert np.array_equal(emb.get()[0], fallback) and not emb.poll() and "waiting for" in emb.error
    np.save(path, np.zeros((N, 5), np.float32))
    assert emb.poll() and emb.get()[0].shape == (N, 5) and emb.error is None


def test_background_refill_serves_and_reports_a_failing_strategy(tmp_path, monkeypatch):
    data = ImageData("test", array=images())
    with RelationStore(tmp_path / "s.sqlite") as store:
        q = Questions(store, Embeddings(N, fallback=data.simple_embeddings()), N)  # refill thread
        try:
            got = q.next("pair", "me")
            assert got is not None and not store.is_known(got.anchor, got.others[0])

            def broken(*a, **k):
                raise RuntimeError("faiss exploded")

            monkeypatch.setattr(questions_mod, "select_queries", broken)
            with q._lock:
                q._pending.clear()
            assert q.next("pair", "other") is None  # no pair left, the refill failed: no hang
            assert "faiss exploded" in q.stats("other")["refill_error"]
        finally:
            q.close()


# ------------------------------------------------------------ large pools
def answer_screens(app, rounds=6):
    """(screen, anchor, others) of ``rounds`` pair and captcha screens answered in turn
    through the app (answers alternate so classes form)."""
    c = app.test_client()
    page = c.get("/").get_data(as_text=True)
    assert c.post("/start", data={"csrf": token(page), "name": "ann"}).status_code == 303
    seen = []
    for r in range(rounds):
        kind = "captcha" if r % 2 else "pair"
        page, csrf, qid = screen(c, kind)
        if kind == "pair":
            a, b = map(int, re.search(r'data-pair="(\d+),(\d+)"', page).groups())
            seen.append((kind, a, [b]))
            form = {"answer": "yes" if r % 4 == 0 else "no"}
        else:
            a = int(re.search(r'data-anchor="(\d+)"', page).group(1))
            cands = [int(v) for v in re.search(r'data-candidates="([\d,]+)"', page).group(1).split(",")]
            seen.append((kind, a, cands))
            form = {"alike": ["0"]}
        assert c.post("/answer", data={"csrf": csrf, "qid": qid, **form}).status_code == 303
    return seen


def test_memory_mapped_embeddings_serve_the_same_questions_as_in_ram(tmp_path):
    x = np.random.default_rng(3).standard_normal((N, 6)).astype(np.float32)
    x[N // 2 :] += 4 * np.eye(6, dtype=np.float32)[np.arange(N - N // 2) % 6]
    np.save(tmp_path / "emb.npy", x)
    mapped = Embeddings(N, tmp_path / "emb.npy")
    assert isinstance(mapped.get()[0], np.memmap)  # not read into memory
    data = ImageData("test", array=images())
    got = []
    for name, emb in (("ram", Embeddings(N, fallback=x)), ("map", mapped)):
        with RelationStore(tmp_path / f"{name}.sqlite") as store:
            q = Questions(store, emb, N, budget=40, captcha_k=4, background=False)
            got.append(answer_screens(create_app(data, q)))
            q.close()
    assert got[0] == got[1] and len(got[0]) == 6


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.arange(N * 3).reshape(N, 3), r"float16, float32, float64, got dtype '<i8'"),
        (np.zeros(N, np.float32), r"must be \[N, D\] with N = 40 \(one row per image\), got shape \(40,\)"),
        (np.zeros((N, 3), np.float32), r"must be finite, got 1 rows with NaN or Inf"),
        (np.zeros((N, 3), np.float16), r"must be finite, got 2 rows with NaN or Inf"),
    ],
)
def test_a_bad_embeddings_file_is_one_start_up_error_naming_the_option(tmp_path, capsys, bad, match):
    if bad.ndim == 2 and bad.dtype.kind == "f":  # a NaN row (float32), two Inf rows (float16)
        bad[7, 1] = np.nan if bad.dtype == np.float32 else np.inf
        bad[9, 0] = -np.inf if bad.dtype == np.float16 else 0
    np.save(tmp_path / "x.npy", images())
    np.save(tmp_path / "e.npy", bad)
    assert (
        main(
            [
                "annotate",
                "--data",
                str(tmp_path / "x.npy"),
                "--embeddings",
                str(tmp_path / "e.npy"),
                "--store",
                str(tmp_path / "s.sqlite"),
                "--port",
                "0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--embeddings {str(tmp_path / 'e.npy')!r}" in err and re.search(match, err), err
    assert "previous embeddings" not in err  # there are none at start


def test_a_bad_embeddings_file_is_not_scanned_for_every_question(tmp_path, monkeypatch):
    path = tmp_path / "e.npy"
    x = np.zeros((N, 3), np.float32)
    x[5, 0] = np.nan
    emb = Embeddings(N, path, fallback=np.ones((N, 3), np.float32))
    np.save(path, x)  # written by a trainer after the start
    assert not emb.poll() and "1 rows with NaN" in emb.error and "previous embeddings stay in use" in emb.error
    reads = []
    real = Embeddings._read
    monkeypatch.setattr(Embeddings, "_read", lambda self: reads.append(1) or real(self))
    assert not any(emb.poll() for _ in range(5)) and reads == []  # same file: not read again
    x[5, 0] = 1
    np.save(path, x)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert emb.poll() and reads == [1] and emb.error is None


def reference_order(x, anchor):
    """The captcha's candidate order as a stable sort of every similarity at once."""
    u = x[anchor].astype(np.float32)
    v = u / questions_mod._norms(u[None])[0]  # the anchor normalised as the app does
    return np.argsort(-questions_mod.cosine_to(x, v), kind="stable").tolist()


def test_captcha_candidates_in_chunks_are_the_full_sort(monkeypatch):
    """Chunks of 7 rows, a first pool of 3 widened 8-fold: every row in the order of a
    stable sort of all similarities, ties (duplicate and all-zero rows) by row."""
    g = np.random.default_rng(0)
    x = g.integers(-2, 3, size=(103, 4)).astype(np.float64)
    x[10:20] = x[3]  # ties
    x[50:55] = 0  # similarity 0 to everything
    monkeypatch.setattr(questions_mod, "chunk_rows", lambda d: 7)
    monkeypatch.setattr(questions_mod, "CANDIDATE_POOL", 3)
    for anchor in (0, 3, 12, 51, 102):
        assert list(questions_mod._most_similar(x, anchor)) == reference_order(x, anchor)


def test_captcha_questions_do_not_copy_a_memory_mapped_pool(tmp_path, monkeypatch):
    """Captcha screens over a memory-mapped pool allocate a few chunks, not a normalised
    copy of the pool, nor a sort of all its similarities (tracemalloc sees NumPy's and
    Python's allocations; the refill, torch's, is done before it starts)."""
    import tracemalloc

    n, d = 100_000, 16
    np.save(tmp_path / "e.npy", np.random.default_rng(0).standard_normal((n, d)).astype(np.float32))
    monkeypatch.setattr(questions_mod, "chunk_rows", lambda d: 2048, raising=False)
    with RelationStore() as store:
        q = Questions(store, Embeddings(n, tmp_path / "e.npy"), n, strategy="random", captcha_k=6, background=False)
        q.refill()
        tracemalloc.start()
        try:
            for _ in range(3):
                got = q.next("captcha", "me")
                assert len(got.others) == 6
                q.answer(got.qid, "me", "ann", [False] * 6)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        q.close()
    assert peak < n * d * 4 / 4, f"{peak / 2**20:.1f} MiB for a {n * d * 4 / 2**20:.1f} MiB pool"


def clustered_file(path, n, classes=10, d=8, seed=0):
    """``n`` rows of ``classes`` Gaussian classes (row r in class r % classes) saved to the
    ``.npy`` file ``path``; returns the labels."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = g.standard_normal((classes, d))[y] + 0.3 * g.standard_normal((n, d))
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, x.astype(np.float32))
    os.replace(tmp, path)  # as a trainer refreshes it
    return y


@pytest.fixture
def knn_searches(monkeypatch):
    """The k of every k-NN graph search select_queries runs (the real search, counted);
    "pal" on its graph path, what pools above PAL_EXACT_WORK take."""
    from palfast.active import strategies

    monkeypatch.setattr(strategies, "PAL_EXACT_WORK", 0)
    return count_knn_searches(monkeypatch)


@pytest.mark.parametrize("strategy", ["pal", "nearest", "uncertain"])
def test_refills_search_the_knn_graph_once_and_never_reask(tmp_path, knn_searches, strategy):
    """The embeddings do not change while the app runs: their k-NN graph is searched once,
    not once per refill (at 10^6 samples a refill took 12 minutes when it was), and the
    refills after new answers still ask only pairs the store does not know."""
    n = 600
    y = clustered_file(tmp_path / "e.npy", n)
    with RelationStore() as store:
        q = Questions(store, Embeddings(n, tmp_path / "e.npy"), n, strategy=strategy, background=False)
        asked = set()
        for _ in range(4):
            assert q.refill() > 0
            pairs = list(q._pending)
            q._pending.clear()
            assert not any(store.is_known(i, j) for i, j in pairs) and not asked & set(pairs)
            asked |= set(pairs)
            store.record(pairs, [bool(y[i] == y[j]) for i, j in pairs])
        assert len(knn_searches) == 1
        q.close()


def test_pal_exploration_state_carries_from_refill_to_refill(tmp_path, monkeypatch):
    """pal's exploration (its credit of seed queries, the seeds awaiting answers, when to
    stop exploring) is a state select_queries carries between calls; the server's refills
    are consecutive calls of one selection, so they pass it one dict, kept and updated."""
    n = 300
    y = clustered_file(tmp_path / "e.npy", n)
    states = []
    real = questions_mod.select_queries

    def spy(*args, **kwargs):
        states.append(kwargs.get("state"))
        return real(*args, **kwargs)

    monkeypatch.setattr(questions_mod, "select_queries", spy)
    with RelationStore() as store:
        q = Questions(store, Embeddings(n, tmp_path / "e.npy"), n, background=False)
        for _ in range(3):
            assert q.refill() > 0
            pairs = list(q._pending)
            q._pending.clear()
            store.record(pairs, [bool(y[i] == y[j]) for i, j in pairs])
        q.close()
    refills = states[1:]  # the first call is the constructor's check of the arguments
    assert len(refills) == 3 and all(s is refills[0] for s in refills)
    assert isinstance(refills[0], dict) and "explore_credit" in refills[0]


def test_pal_exploration_state_survives_a_restart_of_the_server(tmp_path):
    """Each refill saves pal's state in the store; a server started again on the store
    loads it, so the exploration continues (its seed count, credit and unjudged seeds)."""
    n = 300
    y = clustered_file(tmp_path / "e.npy", n)
    path = tmp_path / "answers.sqlite"
    with RelationStore(path) as store:
        q = Questions(store, Embeddings(n, tmp_path / "e.npy"), n, background=False)
        for _ in range(2):
            assert q.refill() > 0
            pairs = list(q._pending)[:10]  # some questions left unanswered at the stop
            q._pending.clear()
            store.record(pairs, [bool(y[i] == y[j]) for i, j in pairs])
        assert q.refill() > 0
        before = copy.deepcopy(q._select_state)
        q.close()
    assert before["n_seeds"] > 0 and "explore_credit" in before
    with RelationStore(path) as store:
        assert store.load_state("pal") == before
        q = Questions(store, Embeddings(n, tmp_path / "e.npy"), n, background=False)
        assert q._select_state == before
        assert q.refill() > 0 and q._select_state["n_seeds"] >= before["n_seeds"]
        assert store.load_state("pal") == q._select_state
        q.close()


def test_a_restarted_server_does_not_repeat_the_selection_seeds(tmp_path, monkeypatch):
    """Each refill's selection is seeded from the store's answer count: a server started
    again on the store after answers draws with new seeds (it once counted its refills from
    0 again and repeated the first run's seeds); refills with no answer between them
    continue one stream, so they still find new pairs."""
    seeds = []
    real = questions_mod.select_queries

    def spy(*args, **kwargs):
        gen = kwargs.get("generator")
        if gen is not None or kwargs.get("seed") is not None:  # a refill, not the constructor's check
            seeds.append(gen.initial_seed() if gen is not None else kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(questions_mod, "select_queries", spy)
    path, runs = tmp_path / "answers.sqlite", []
    for _ in range(2):
        with RelationStore(path) as store:
            q = Questions(store, Embeddings(N), N, strategy="random", background=False)
            assert q.refill() > 0 and q.refill() > 0  # the second: new pairs all the same
            pairs = list(q._pending)[:5]
            store.record(pairs, [False] * 5)  # answers before the restart
            q.close()
        runs.append(seeds[:])
        seeds.clear()
    first, second = runs
    assert len(first) == len(second) == 2 and not set(first) & set(second)


def test_a_new_embeddings_file_gets_a_new_graph_searched_with_progress(tmp_path, knn_searches):
    n = 300
    clustered_file(tmp_path / "e.npy", n)
    said = []
    with RelationStore() as store:
        q = Questions(store, Embeddings(n, tmp_path / "e.npy"), n, background=False, progress=said.append)
        q.refill()
        q.refill()
        assert len(knn_searches) == 1 and len(said) == 2
        assert said[0].startswith("searching the k-NN graph of 300 samples (--index auto)")
        assert re.fullmatch(r"k-NN graph searched in \d+\.\d s", said[1])
        clustered_file(tmp_path / "e.npy", n, seed=1)
        os.utime(tmp_path / "e.npy", ns=(time.time_ns(), time.time_ns() + 10**9))
        assert q.refill() > 0  # on the new file, its graph searched first
        assert len(knn_searches) == 2 and len(said) == 4
        assert q._graph[1].built_on(as_rows("test", "x", q.embeddings.get()[0]))
        assert q.stats("me")["preparing"] is None
        q.close()


@pytest.mark.parametrize(
    "args,err",
    [
        (["--index", "flat"], "argument --index: invalid choice: 'flat'"),
        (["--index", "ivf", "--nlist", "0"], "argument --nlist: must be an integer >= 1, got '0'"),
        (["--index", "ivf", "--nprobe", "two"], "argument --nprobe: must be an integer >= 1, got 'two'"),
        (["--index", "hnsw", "--ef-search", "9"], "argument --ef-search: must be an integer >= 10, got '9'"),
    ],
)
def test_cli_index_options_reject_bad_values(capsys, args, err):
    with pytest.raises(SystemExit) as e:
        main(["annotate", "--demo", *args])
    assert e.value.code == 2 and err in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,err",
    [
        (["--nlist", "4"], "--nlist applies to --index ivf or ivf-join only, got --index auto"),
        (["--index", "exact", "--nprobe", "4"], "--nprobe applies to --index ivf or ivf-join only, got --index exact"),
        (["--index", "hnsw", "--nlist", "1"], "--nlist applies to --index ivf or ivf-join only, got --index hnsw"),
        (["--index", "ivf-join", "--ef-search", "32"], "--ef-search applies to --index hnsw only, got --index ivf-"),
        (["--index", "ivf-join", "--nprobe", "2"], "--nprobe must be at most the 1 lists (the default --nlist), got 2"),
        (["--index", "ivf", "--ef-search", "32"], "--ef-search applies to --index hnsw only, got --index ivf"),
        (["--index", "ivf", "--nlist", "4", "--nprobe", "5"], "--nprobe must be at most the 4 lists, got 5"),
        (["--index", "ivf", "--nlist", "41"], "--nlist must be at most the 40 samples"),
        (["--index", "ivf", "--nprobe", "2"], "--nprobe must be at most the 1 lists (the default --nlist), got 2"),
    ],
)
def test_cli_index_options_that_do_not_fit_are_one_line(tmp_path, capsys, args, err):
    np.save(tmp_path / "x.npy", images())
    assert (
        main(
            ["annotate", "--data", str(tmp_path / "x.npy"), "--store", str(tmp_path / "s.sqlite"), "--port", "0", *args]
        )
        == 2
    )
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and err in out, out


def test_cli_index_options_reach_select_queries(tmp_path, capsys, monkeypatch):
    from palfast import annotate
    from palfast.cli import build_parser

    with pytest.raises(SystemExit):
        main(["annotate", "--help"])
    out = capsys.readouterr().out
    for text in (
        "--index {auto,exact,ivf,ivf-join,hnsw}",
        "auto (default): exact up to 20,000",
        "--nlist",
        "4*sqrt(N)",
        "--nprobe",
        "(default 16",
        "--ef-search",
        "(default 64)",
    ):
        assert text in out
    calls = []
    real = questions_mod.select_queries
    monkeypatch.setattr(questions_mod, "select_queries", lambda *a, **k: calls.append(k) or real(*a, **k))
    np.save(tmp_path / "x.npy", images())
    has_faiss = importlib.util.find_spec("faiss") is not None
    for opts, want in (
        # ivf-join is torch only; 40 samples allow one list (at least 39 rows per list)
        (
            ["--index", "ivf-join", "--nlist", "1", "--nprobe", "1"],
            {"index": "ivf-join", "nlist": 1, "nprobe": 1, "ef_search": None},
        ),
        (
            ["--index", "ivf", "--nlist", "2", "--nprobe", "2"],
            {"index": "ivf", "nlist": 2, "nprobe": 2, "ef_search": None},
        ),
        (["--index", "hnsw", "--ef-search", "12"], {"index": "hnsw", "nlist": None, "nprobe": None, "ef_search": 12}),
    ):
        if opts[1] != "ivf-join" and not has_faiss:
            continue  # FAISS's indexes: pip install faiss-cpu
        args = build_parser().parse_args(
            ["annotate", "--data", str(tmp_path / "x.npy"), "--store", str(tmp_path / f"{opts[1]}.sqlite"), *opts]
        )
        app, q, store = annotate.build(args)
        try:
            got = q.next("pair", "me")
            assert got is not None and not store.is_known(got.anchor, got.others[0])
        finally:
            q.close()
            store.close()
        # the start-up check gets the options; every refill the graph built with them
        assert calls and {key: calls[0][key] for key in want} == want
        graphs = [k["graph"] for k in calls[1:]]
        assert graphs and all(g is q._graph[1] for g in graphs)
        assert {key: getattr(q._graph[1], key) for key in want} == want
        calls.clear()


def test_questions_reask_a_one_vote_join_first_under_majority(tmp_path):
    """--policy majority --reask: a known pair whose "alike" joined two classes on one
    vote is handed out again (the exception to "never a known pair"), before new ones."""
    data = ImageData("test", array=images()[..., None])
    store = RelationStore(tmp_path / "answers.sqlite", policy="majority", timeout=STORE_TIMEOUT_S)
    store.record([[0, 1], [2, 3], [1, 2]], [True, True, True])
    q = Questions(store, Embeddings(N, fallback=data.simple_embeddings()), N, reask=0.5, background=False)
    first = q.next("pair", "ann")
    assert (first.anchor, first.others) == (1, [2])
    q.close()


def test_cli_policy_and_reask_errors(capsys):
    assert main(["annotate", "--demo", "--reask", "0.2"]) == 2
    assert "--policy confirm or --policy majority" in capsys.readouterr().err
    assert main(["annotate", "--demo", "--policy", "confirm", "--reask", "1.5"]) == 2
    assert "--reask must be a share in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["annotate", "--demo", "--policy", "best"])
    assert "invalid choice: 'best'" in capsys.readouterr().err


def test_each_line_is_one_write(capsys):
    """The refill thread's lines and the main thread's share a terminal or a log: each
    line goes out in one write, its newline included, so no other line can cut it."""
    from palfast.annotate import _say

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, text):
            self.calls.append(text)
            return super().write(text)

    stream = Writes()
    _say("k-NN graph searched in 0.0 s", stream)
    _say("serving on http://127.0.0.1:1/", stream)
    assert stream.calls == [
        "palfast annotate: k-NN graph searched in 0.0 s\n",
        "palfast annotate: serving on http://127.0.0.1:1/\n",
    ]
    _say("to stderr")
    assert capsys.readouterr().err == "palfast annotate: to stderr\n"
