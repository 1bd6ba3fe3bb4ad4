import os

import pytest

# Must precede any TensorFlow import: oneDNN's gradient of a strided 1x1 conv can crash on CPU.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def browser():
    """Headless chromium (``tests/browser.py``), one per test module, closed after its last test.

    Per module, not per session: while Playwright runs, its event loop counts as running in this
    thread between its calls (``asyncio.run`` refuses to start), and chromium and its driver
    process hold memory; neither should reach the other modules' tests. Skips (with what to
    install) when chromium or playwright is missing.
    """
    import browser as chromium  # here, not at the top: only modules with browser tests load Playwright

    reason = chromium.missing()
    if reason:
        pytest.skip(reason)
    b = chromium.launch()
    yield b
    b.close()


@pytest.fixture(scope="session")
def tf():
    """TensorFlow as the package imports it (quietly, oneDNN off)."""
    from pipeline.backend.tf import tensorflow

    return tensorflow()


@pytest.fixture(scope="session")
def keras(tf):
    import keras

    return keras
