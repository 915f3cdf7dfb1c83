"""A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe`.

Chromium started with `--remote-debugging-pipe` reads CDP commands from its file
descriptor 3 and writes replies and events to descriptor 4, each message one JSON
object ended by a NUL byte (no port, no websocket). That is all a test needs to
load a page, wait for what its scripts draw, type, and take a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import time


class CDPError(RuntimeError):
    """Chromium answered a command with an error, exited, or did not answer in time."""


class Browser:
    """One headless Chromium and one page target attached in flat mode."""

    def __init__(self, exe: str, flags: list[str], log, timeout: float = 60.0):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire():                      # in the child: the pipes at fds 3 and 4 (dup2 makes them inheritable)
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)   # above 3 and 4 before either is replaced
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([exe, *flags, "--remote-debugging-pipe", "about:blank"],
                                     preexec_fn=wire, close_fds=False,   # fds 3 and 4 only: Python's own are not inheritable
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=log.open("wb"))   # a file: a pipe left unread could fill and block
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.log = log
        self.timeout = timeout
        self._next = 0
        self._buf = b""
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise CDPError(f"Chromium exited: {self.log.read_text(errors='replace')[-2000:]}")
                self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command (to the page's session when given) and wait for its reply."""
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def page(self, method: str, **params) -> dict:
        return self.call(method, session=self.session, **params)

    def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        """Poll `expression` until it is truthy; its value, or CDPError naming `what`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise CDPError(f"timed out after {timeout:.0f} s waiting for {what}")

    def type_text(self, text: str) -> None:
        """Type into the focused element as key presses do (Input.insertText fires `input`)."""
        self.page("Input.insertText", text=text)

    def click(self, x: float, y: float, alt: bool = False) -> None:
        """A left click at viewport (x, y), Alt held when asked."""
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1,
                      modifiers=1 if alt else 0)

    def screenshot(self, clip: dict | None = None) -> str:
        """The page as drawn, a base64 PNG; `clip` (x, y, width, height, scale) takes a region."""
        return self.page("Page.captureScreenshot", format="png", **({"clip": clip} if clip else {}))["data"]

    def save_screenshot(self, path) -> bytes:
        png = base64.b64decode(self.screenshot())
        path.write_bytes(png)
        return png

    def close(self) -> None:
        try:
            os.write(self._to_chrome, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)
