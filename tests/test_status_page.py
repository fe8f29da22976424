"""
The status page (dtable/web/status.html) in a real browser: Debian's
headless Chromium driven by Selenium, against a three-node chain with the
control API, all nodes in this process on loopback.

Selenium blocks, so every browser step runs in a thread (deferToThread)
while the reactor serves the nodes; the table is changed only from the test
coroutine, in the reactor's thread. Every wait is bounded.

Without /usr/bin/chromium or /usr/bin/chromedriver these tests are skipped,
unless DTABLE_REQUIRE_BROWSER=1 (as in CI), when they fail.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import asynccontextmanager
from importlib import resources
from typing import AsyncIterator, Callable

import pytest
import pytest_twisted
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait
from twisted.internet.defer import TimeoutError
from twisted.internet.threads import deferToThread

from dtable.service import DistributedTable
from dtable.testing import LocalNetwork

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "page-token-" + "y" * 32
#: Seconds the page may take to show what a step waits for.
TIMEOUT = 30.0
#: Seconds the browser may take to quit before chromedriver is killed.
QUIT_TIMEOUT = 15.0
#: Chromium's switches: headless, and quiet on a machine without a network
#: (without the background ones it keeps trying to reach Google's servers).
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1100,1000",
]

#: What the page shows, read in one script so that a redraw between two
#: reads cannot make an element stale.
SNAPSHOT = """
const text = (id) => document.getElementById(id).textContent;
const error = document.getElementById("error");
const form = document.getElementById("token-form");
return {
  nodes: [...document.querySelectorAll("#overlay .node")].map((g) => ({
    id: g.dataset.nodeId, master: g.classList.contains("master"),
    self: g.classList.contains("self")})),
  links: document.querySelectorAll("#overlay .link").length,
  fields: Object.fromEntries(["node-id", "role", "revision", "objects", "links"]
                             .map((id) => [id, text(id)])),
  error: error.checkVisibility() ? error.textContent : null,
  asks_for_token: form.checkVisibility(),
  live: text("live"),
  marked: window.markedByTest === true,
};
"""


def _reactor():
    from twisted.internet import reactor
    return reactor


def require_browser() -> None:
    """
    Skip (or, with DTABLE_REQUIRE_BROWSER=1, fail) without Debian's
    Chromium and its driver.
    """
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if not missing:
        return
    reason = (f"the status page tests need Debian's chromium and chromium-driver; "
              f"missing {' and '.join(missing)}")
    if os.environ.get("DTABLE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (and DTABLE_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def open_browser(profile: str) -> WebDriver:
    """
    Headless Chromium with the fresh profile directory C{profile}. Blocks.
    """
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    return driver


@asynccontextmanager
async def chromium() -> AsyncIterator[WebDriver]:
    """
    A browser for one test, in a fresh profile directory removed afterwards.
    """
    require_browser()
    with tempfile.TemporaryDirectory(prefix="dtable-chromium-",
                                     ignore_cleanup_errors=True) as profile:
        driver = await deferToThread(open_browser, profile)
        try:
            yield driver
        finally:
            await quit_browser(driver)


async def quit_browser(driver: WebDriver) -> None:
    """
    Quit the browser, waiting at most L{QUIT_TIMEOUT} seconds; past that,
    kill chromedriver.
    """
    try:
        await deferToThread(driver.quit).addTimeout(QUIT_TIMEOUT, _reactor())
    except TimeoutError:
        driver.service.process.kill()


def page_url(node: DistributedTable, token: str) -> str:
    return f"http://127.0.0.1:{node.api_port}/#token={token}"


def wait_for_page(driver: WebDriver, predicate: Callable[[dict], bool],
                  what: str) -> dict:
    """
    The page's L{SNAPSHOT} once C{predicate} holds for it. Blocks, at most
    L{TIMEOUT} seconds.
    """
    last: list[dict] = []

    def check(driver: WebDriver) -> dict | bool:
        snapshot = driver.execute_script(SNAPSHOT)
        last[:] = [snapshot]
        return snapshot if predicate(snapshot) else False

    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1).until(check)
    except TimeoutException as e:
        raise AssertionError(f"the page never showed {what}; last it showed {last}") from e


def open_page(driver: WebDriver, url: str) -> None:
    """
    Load the page afresh and mark the window, so that a later check can
    tell the page was not reloaded. Blocks.
    """
    driver.get("about:blank")
    driver.get(url)
    driver.execute_script("window.markedByTest = true;")


def enter_token(driver: WebDriver, token: str) -> None:
    """
    Type C{token} into the page's token form and submit it. Blocks.
    """
    field = WebDriverWait(driver, TIMEOUT).until(
        expected_conditions.visibility_of_element_located((By.ID, "token-input")))
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()


@pytest_twisted.ensureDeferred
async def test_status_page_draws_the_overlay_and_follows_the_table():
    require_browser()
    network = LocalNetwork(_reactor(), size=3, api="tcp:0:interface=127.0.0.1",
                           api_token=TOKEN)
    master, middle, _ = network.nodes
    await network.start()
    try:
        async with chromium() as driver:
            await _check_page(driver, network, master, middle)
    finally:
        await network.stop()


async def _check_page(driver: WebDriver, network: LocalNetwork, master: DistributedTable,
                      middle: DistributedTable) -> None:
    # The page of the chain's middle node draws the whole chain.
    await deferToThread(open_page, driver, page_url(middle, TOKEN))
    shown = await deferToThread(
        wait_for_page, driver,
        lambda page: len(page["nodes"]) == 3 and page["links"] == 2,
        "three nodes and two links")
    assert {node["id"] for node in shown["nodes"]} == {n.node_id for n in network.nodes}
    assert [node["id"] for node in shown["nodes"] if node["master"]] == [master.node_id]
    assert [node["id"] for node in shown["nodes"] if node["self"]] == [middle.node_id]
    assert shown["fields"]["node-id"] == middle.node_id
    assert shown["fields"]["role"] == "replica"
    assert shown["error"] is None and not shown["asks_for_token"]
    before = int(shown["fields"]["revision"])

    # Changes on the master reach the page without a reload. Two, one after
    # the other: the refresh the page makes when its event stream opens may
    # show the first, but only the stream or the poll can show the second.
    for count in (1, 2):
        master.add_object({"name": f"www{count}", "ip": "192.0.2.1"})
        head = await master.flush()
        assert head.rev > before
        shown = await deferToThread(
            wait_for_page, driver,
            lambda page, rev=str(head.rev): page["fields"]["revision"] == rev,
            f"revision {head.rev}")
        assert shown["fields"]["objects"] == str(count)
    assert shown["marked"], "the page was reloaded"
    assert "last event object_added" in shown["live"]

    # A wrong token shows the error line; the right one, typed in, clears it.
    await deferToThread(open_page, driver, page_url(middle, "wrong"))
    shown = await deferToThread(wait_for_page, driver, lambda page: page["error"],
                                "an error line")
    assert "the token is wrong" in shown["error"]
    assert shown["fields"]["node-id"] == "-" and shown["asks_for_token"]
    await deferToThread(enter_token, driver, TOKEN)
    shown = await deferToThread(
        wait_for_page, driver,
        lambda page: page["error"] is None and page["fields"]["node-id"] == middle.node_id,
        "the node once the right token was typed in")
    assert shown["fields"]["objects"] == "2" and not shown["asks_for_token"]


#: Feeds the page's event-stream parser a stream in pieces of C{arguments[1]}
#: bytes and answers with the events it dispatched.
PARSE_EVENTS = """
const [text, size, done] = arguments;
const bytes = new TextEncoder().encode(text);
const body = new ReadableStream({start(controller) {
  for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
  controller.close();
}});
const seen = [];
readEvents(body, (name, data) => seen.push([name, data]))
  .then(() => done(seen), (error) => done(String(error)));
"""


@pytest_twisted.ensureDeferred
async def test_event_stream_parser_takes_any_split():
    # In pieces of one byte every split happens: mid-line, between \r and
    # \n, inside a UTF-8 character.
    stream = (": dtable events\n\n"
              "event: object_added\r\ndata: {\"object\":\"\u00fc\u20ac\"}\r\n\r\n"
              ": keep-alive\n\n"
              "event: message_received\rdata: 1\rdata: 2\r\r"
              "data: unnamed\n\n"
              "event: half")
    page = resources.files("dtable").joinpath("web/status.html")
    expected = [["object_added", '{"object":"\u00fc\u20ac"}'],
                ["message_received", "1\n2"],
                ["message", "unnamed"]]
    async with chromium() as driver:
        await deferToThread(driver.get, f"file://{page}")
        for size in (1, 5, len(stream.encode())):
            seen = await deferToThread(driver.execute_async_script, PARSE_EVENTS, stream, size)
            assert seen == expected, f"in pieces of {size} bytes"
