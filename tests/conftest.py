import os

import pytest

# Must precede any TensorFlow import: oneDNN's gradient of a strided 1x1 conv can crash on CPU.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def browser():
    """Headless chromium (``tests/browser.py``), one per test module, closed after its last test.

    Per module, not per session: chromium and Playwright's driver process then live only while a
    module with browser tests runs, not through the rest of the suite. Skips (with what to
    install) when chromium or playwright is missing.
    """
    import browser as chromium  # here, not at the top: only modules with browser tests load Playwright

    reason = chromium.missing()
    if reason:
        pytest.skip(reason)
    b = chromium.launch()
    yield b
    b.close()
