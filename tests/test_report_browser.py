"""The report in a real browser: headless Chromium renders a non-blank page and loads every image.

The product page runs no script; the image check copies it to a test-only sibling file with an
inline script appended that records, after the load event, how many ``document.images`` are
``complete`` with ``naturalWidth > 0``, and reads that back from the DOM Chromium dumps.

Without Chromium the tests skip — unless ``CURVOPS_REQUIRE_BROWSER=1`` (``.ci/run`` sets it when
Chromium is on PATH after its install step): then a missing Chromium is an error, so CI can never
pass with these tests silently skipped.
"""

import os
import re
import shutil
import subprocess

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from curvops.demo import demo_problem  # noqa: E402
from curvops.report.build import build_report  # noqa: E402

CHROMIUM = shutil.which("chromium")
REQUIRED = os.environ.get("CURVOPS_REQUIRE_BROWSER", "").strip() not in ("", "0")
TIMEOUT = 120


@pytest.fixture(scope="module", autouse=True)
def _chromium_present():
    """Skip without Chromium, or fail where it is required (before the report is built)."""
    if CHROMIUM is not None:
        return
    if REQUIRED:
        pytest.fail("CURVOPS_REQUIRE_BROWSER=1 (set by .ci/run when it installed Chromium) but `chromium` is not on "
                    "PATH, so the browser tests cannot run. Put Chromium on PATH, or unset the variable to let "
                    "them skip.", pytrace=False)
    pytest.skip("needs headless Chromium (`chromium` on PATH, e.g. the Debian package); set "
                "CURVOPS_REQUIRE_BROWSER=1 to make its absence an error")

PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  var probe = document.createElement("div");
  probe.id = "curvops-probe";
  probe.setAttribute("data-total", String(images.length));
  probe.setAttribute("data-loaded", String(loaded));
  document.body.appendChild(probe);
});
</script>
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "report"
    model, X, y = demo_problem(num_samples=128, steps=100)
    summary = build_report(model, "cross_entropy", (X, y), out, quick=True, progress=False, strict=True)
    return out, summary


def _chromium(*args, profile):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)


def test_screenshot_is_a_non_blank_page(report, tmp_path):
    out, _ = report
    shot = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1280,4000", (out / "index.html").as_uri(),
                     profile=tmp_path / "profile")
    assert shot.is_file(), proc.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]  # float RGB in [0, 1]
    assert img.shape[:2] == (4000, 1280)
    corner = img[2:16, 2:30].reshape(-1, 3)
    np.testing.assert_allclose(np.median(corner, axis=0), [0x14 / 255, 0x24 / 255, 0x3D / 255], atol=0.03)
    # ↑ the header's colour (#14243d): the inline CSS applied
    non_white = (img.min(axis=2) < 0.9).mean()
    assert 0.05 < non_white < 0.9  # text, tables and figures, but not one flat colour
    assert len(np.unique((img[::8, ::8] * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50


def _loaded(page, tmp_path):
    proc = _chromium("--dump-dom", "--virtual-time-budget=10000", "--allow-file-access-from-files", page.as_uri(),
                     profile=tmp_path / "profile")
    m = re.search(r'id="curvops-probe" data-total="(\d+)" data-loaded="(\d+)"', proc.stdout)
    assert m, (proc.stdout[-2000:], proc.stderr[-2000:])
    return int(m.group(1)), int(m.group(2))


def test_every_image_loads(report, tmp_path):
    out, summary = report
    figures = [f["file"] for f in summary["figures"].values() if f["file"]]
    assert len(figures) >= 6
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "<script" not in text
    probe = out / "_test_probe.html"  # a sibling, so relative image paths resolve the same way
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    assert _loaded(probe, tmp_path) == (len(figures), len(figures))
    # the probe can fail: point one image at a missing file
    broken = out / "_test_broken.html"
    broken.write_text(probe.read_text().replace(f'src="{figures[0]}"', 'src="missing.png"'), encoding="utf-8")
    assert _loaded(broken, tmp_path) == (len(figures), len(figures) - 1)
