"""palfast annotate in a real browser: headless Chromium (Debian's package, driven by
Selenium through Debian's chromedriver) answers 10 pair questions with the keyboard and 2
captcha screens with clicks on `palfast annotate --demo`, undoes the last one; then the
server is killed with SIGKILL and the store reopened: every answer the page acknowledged is
there, under the person's name, and the undone ones are superseded.

Screenshots of both screens go to the test's tmp folder; set PALFAST_SCREENSHOTS=docs/ to
also copy them there (that is how docs/annotate-*.png were made).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="palfast annotate needs Flask: pip install 'palfast[annotate]'")
pytest.importorskip("sklearn", reason="palfast annotate --demo needs scikit-learn")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs Selenium: pip install selenium")

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import palfast  # noqa: E402
from palfast.active import RelationStore  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Chromium and its driver (Debian: apt-get install chromium chromium-driver; .ci/run installs them)",
)

#: Seconds to wait for the server to print its address (imports torch, renders nothing yet).
SERVER_START_S = 60
#: Seconds to wait for one page to come back after an answer.
PAGE_S = 15
N_PAIRS, N_CAPTCHAS, CAPTCHA_K = 10, 2, 6
NAME = "alice"


@pytest.fixture
def server(tmp_path):
    store = tmp_path / "answers.sqlite"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "palfast.cli",
            "annotate",
            "--demo",
            "--port",
            "0",
            "--store",
            str(store),
            "--captcha-k",
            str(CAPTCHA_K),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        # The server imports the palfast this test imported: the installed one (CI) or a
        # checkout's (`python -m pytest` there puts it first on sys.path, not the child's).
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(palfast.__file__).parent.parent), os.environ.get("PYTHONPATH")])
            ),
        },
    )
    deadline = time.monotonic() + SERVER_START_S
    url, seen = None, []
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        seen.append(line)
        if "serving on " in line:
            url = line.split("serving on ", 1)[1].split()[0]
            break
    if url is None:
        proc.kill()
        pytest.fail("palfast annotate --demo did not start:\n" + "".join(seen) + proc.stdout.read())
    yield proc, url, store
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download a browser
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1000,760",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def stats(driver):
    el = driver.find_element(By.ID, "stats")
    ids = el.get_attribute("data-last-ids")
    return int(el.get_attribute("data-mine")), [int(v) for v in ids.split(",")] if ids else []


def wait_saved(driver, before: int, n_new: int):
    """Wait for the page after a submit; it says saved only after the store committed."""
    WebDriverWait(driver, PAGE_S, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: stats(d)[0] == before + n_new
    )
    return stats(driver)[1]


@pytest.mark.slow
def test_browser_pairs_captchas_undo_then_sigkill(server, browser, tmp_path):
    from sklearn.datasets import load_digits

    labels = load_digits().target.tolist()  # a perfect annotator, so the screenshots look right
    proc, url, store_path = server
    t0 = time.monotonic()
    browser.get(url)
    name = browser.find_element(By.ID, "name")
    name.clear()
    name.send_keys(NAME)
    browser.find_element(By.ID, "start").click()

    acked = {}  # store log id -> (i, j, answer) the page acknowledged
    for k in range(N_PAIRS):
        form = WebDriverWait(browser, PAGE_S).until(lambda d: d.find_element(By.ID, "answer-form"))
        i, j = map(int, form.get_attribute("data-pair").split(","))
        if k == 3:
            browser.save_screenshot(str(tmp_path / "annotate-pair.png"))
        alike = labels[i] == labels[j]
        mine = stats(browser)[0]
        ActionChains(browser).send_keys("y" if alike else "n").perform()
        (log_id,) = wait_saved(browser, mine, 1)
        acked[log_id] = (i, j, alike)

    browser.find_element(By.ID, "to-captcha").click()
    for k in range(N_CAPTCHAS):
        form = WebDriverWait(browser, PAGE_S).until(lambda d: d.find_element(By.ID, "answer-form"))
        anchor = int(form.get_attribute("data-anchor"))
        cands = [int(v) for v in form.get_attribute("data-candidates").split(",")]
        assert len(cands) == CAPTCHA_K
        for pos, c in enumerate(cands):
            if labels[c] == labels[anchor]:
                browser.find_element(By.CSS_SELECTOR, f'label[data-position="{pos}"] img').click()
        if k == 0:
            browser.save_screenshot(str(tmp_path / "annotate-captcha.png"))
        mine = stats(browser)[0]
        browser.find_element(By.ID, "submit").click()
        ids = wait_saved(browser, mine, CAPTCHA_K)
        acked.update({log_id: (anchor, c, labels[c] == labels[anchor]) for log_id, c in zip(ids, cands)})
    undone = ids  # the last interaction: the second captcha screen

    mine = stats(browser)[0]
    ActionChains(browser).send_keys("u").perform()
    wait_saved(browser, mine, -CAPTCHA_K)
    assert "Undone" in browser.find_element(By.ID, "message").text
    # The undone screen is asked again, same anchor and candidates.
    form = browser.find_element(By.ID, "answer-form")
    assert sorted(int(v) for v in form.get_attribute("data-candidates").split(",")) == sorted(
        acked[u][1] for u in undone
    )

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RelationStore(store_path) as store:
        log = {row[0]: row for row in store.log()}
        for log_id, (i, j, alike) in acked.items():
            _, li, lj, la, _, source, retracted_by = log[log_id]
            assert (li, lj, la, source) == (i, j, alike, NAME)
            assert retracted_by == (NAME if log_id in undone else None)
        assert len(log) == len(acked) == N_PAIRS + N_CAPTCHAS * CAPTCHA_K
        assert store.n_queries == len(acked) - CAPTCHA_K
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"the browser test took {elapsed:.0f} s (keep it under a minute)"

    if os.environ.get("PALFAST_SCREENSHOTS"):
        out = Path(os.environ["PALFAST_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        for shot in ("annotate-pair.png", "annotate-captcha.png"):
            shutil.copy(tmp_path / shot, out / shot)
