"""The results page in headless Chromium, driven over the Chrome DevTools Protocol.

Chromium is Debian's `chromium` package (`.ci/run` installs it); nothing is
downloaded. The page is served by the real server on a loopback port, a real
file is put into its <input type=file>, and the test waits for the grid of
thumbnails the browser fetched and decoded.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pathlib
import shutil
import subprocess
import tempfile
import time

import httpx
import pytest
from index_fixtures import serve_in_thread, shared_photo_index
from websockets.sync.client import connect

from pipeline.index.search import Searcher
from pipeline.serve.app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)"
    ),
]


class DevTools:
    """A minimal CDP client: one page target, commands answered in order, events kept."""

    def __init__(self, ws_url: str) -> None:
        self._ws = connect(ws_url, max_size=None, open_timeout=30)
        self._ids = itertools.count(1)
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """Poll until `expression` is truthy; return its value.

        While a navigation swaps documents, evaluating can fail (no body yet,
        context destroyed): that counts as "not yet", up to the deadline.
        """
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as exc:
                value, last_error = None, exc
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(
            f"timed out waiting for {expression}; last error {last_error}; page status: {self.evaluate(STATUS)!r}"
        )

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) in the middle of the element, scrolled into view."""
        box = self.evaluate(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " el.scrollIntoView({block: 'center'}); const r = el.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=5)
        self._ws.close()


STATUS = "document.querySelector('#status').textContent"
GRID = """(() => {
  const cards = Array.from(document.querySelectorAll('#results .hit'));
  return cards.map((c) => {
    const img = c.querySelector('img');
    return {id: c.dataset.id, rank: +c.dataset.rank, score: +c.dataset.score,
            text: c.querySelector('.score').textContent,
            loaded: !!img && img.complete && img.naturalWidth > 0};
  });
})()"""


def loaded_grid(condition: str = "true") -> str:
    """JS: the grid once every thumbnail has loaded and `condition` (on g) holds, else false."""
    return f"(() => {{ const g = {GRID}; return g.length > 0 && g.every((h) => h.loaded) && ({condition}) && g; }})()"


@contextlib.contextmanager
def chromium() -> DevTools:
    profile = tempfile.mkdtemp(prefix="embedpipe-chromium-")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",  # Chromium writes the port it got into DevToolsActivePort
        "about:blank",
    ]
    proc = subprocess.Popen([CHROMIUM, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tools = None
    try:
        port_file = pathlib.Path(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {proc.stderr.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Page", "Network", "DOM"):
            tools.send(f"{domain}.enable")
        yield tools
    finally:
        if tools is not None:
            tools.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    index_dir, files = shared_photo_index(32)
    with Searcher.open(index_dir, batch_size=4) as searcher, serve_in_thread(create_app(searcher)) as url:
        yield url, files


def _set_file(tools: DevTools, path: str) -> None:
    tools.send("DOM.getDocument")
    node = tools.send("Runtime.evaluate", expression="document.querySelector('#file')")["result"]
    tools.send("DOM.setFileInputFiles", files=[path], objectId=node["objectId"])


def test_upload_shows_a_grid_of_thumbnails_with_scores(server, tmp_path):
    url, files = server
    with chromium() as tools:
        tools.send("Page.navigate", url=f"{url}/")
        stats_line = tools.wait_for(
            "document.body?.dataset.ready === '1' && document.querySelector('#stats').textContent"
        )
        assert "12 images" in stats_line and "Flat" in stats_line

        # Choosing a file is what a person does; the page uploads it with fetch + FormData.
        _set_file(tools, files["chelsea.jpg"])
        grid = tools.wait_for(loaded_grid())
        assert len(grid) == 12  # the page asks for 12; the index holds 12
        assert [h["rank"] for h in grid] == list(range(1, 13))
        assert grid[0]["id"] == "chelsea.jpg" and grid[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert grid[0]["text"] == "#1  cos 1.0000"
        assert all(h["text"].startswith(f"#{h['rank']}  cos ") for h in grid)
        scores = [h["score"] for h in grid]
        assert scores == sorted(scores, reverse=True)
        upload = {"image": ("c.jpg", pathlib.Path(files["chelsea.jpg"]).read_bytes())}
        want = httpx.post(f"{url}/search", files=upload, data={"k": 12}, timeout=60)
        assert [h["id"] for h in grid] == [h["id"] for h in want.json()["results"]]
        assert tools.evaluate("document.querySelector('#query-image').naturalWidth") > 0
        assert "12 neighbours" in tools.evaluate(STATUS)

        # Clicking a result shows its neighbours, itself first.
        clicked = grid[3]["id"]
        tools.click("#results .hit:nth-child(4)")
        regrid = tools.wait_for(loaded_grid(f"g[0].id === {json.dumps(clicked)}"))
        by_id = httpx.get(f"{url}/search", params={"id": clicked, "k": 12}).json()["results"]
        assert [h["id"] for h in regrid] == [h["id"] for h in by_id]
        assert tools.evaluate("decodeURIComponent(location.hash)") == f"#id={clicked}"

        # A file that is not an image: the server's message, shown as an error, and an empty grid.
        bad = tmp_path / "notes.jpg"
        bad.write_text("not an image\n")
        _set_file(tools, str(bad))
        status = tools.wait_for(f"document.querySelector('#status').className === 'error' && {STATUS}")
        assert status.startswith("error 415:") and "not a recognised image format" in status
        assert tools.evaluate("document.querySelectorAll('#results .hit').length") == 0

        # Nothing went wrong in the page, and it contacted no other host.
        thrown = [e for e in tools.events if e.get("method") == "Runtime.exceptionThrown"]
        assert not thrown, thrown
        requested = [
            e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"
        ]
        assert requested and all(u.startswith((url, "blob:", "data:")) for u in requested), requested
