"""Drive the demo in a real browser (Debian chromium via playwright): move the slider, generate, take a screenshot.

python browser_check.py http://127.0.0.1:7860/ screenshot.png
"""

from __future__ import annotations

import sys
import time


# the first candidate row lists `remove` blocks (the table is virtualised: read its text, not its rows)
FIRST_ROW_REMOVES = """(remove) => {
  const lines = document.querySelector('#candidates').innerText.split('\\n').map(s => s.trim()).filter(Boolean);
  const i = lines.indexOf('% parameters');
  return i >= 0 && lines.length > i + 2 && lines[i + 2].split(',').length === remove;
}"""


def run(url: str, screenshot: str, remove: int = 3, timeout_ms: int = 180_000) -> dict:
    from playwright.sync_api import sync_playwright

    timings = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        start = time.perf_counter()
        page.goto(url, wait_until="networkidle", timeout=timeout_ms)
        page.get_by_text("Which transformer blocks can go?").wait_for(timeout=timeout_ms)
        page.wait_for_function("() => document.querySelector('#candidates').innerText.includes('% parameters')")
        timings["page_and_spectrum_s"] = time.perf_counter() - start
        slider = page.locator("#num-remove input[type=range]")
        start = time.perf_counter()
        slider.fill(str(remove))
        slider.dispatch_event("pointerup")  # what a mouse release does: the Space re-solves on release
        page.wait_for_function(FIRST_ROW_REMOVES, arg=remove, timeout=timeout_ms)
        timings["slider_to_spectrum_s"] = time.perf_counter() - start
        start = time.perf_counter()
        page.locator("#generate").click()
        page.wait_for_function(
            "() => document.querySelector('#pruned-output textarea').value.length > 0", timeout=timeout_ms
        )
        timings["generate_s"] = time.perf_counter() - start
        timings["pruned_text"] = page.locator("#pruned-output textarea").input_value()
        page.screenshot(path=screenshot, full_page=True)
        browser.close()
    return timings


if __name__ == "__main__":
    print(run(sys.argv[1], sys.argv[2]))
