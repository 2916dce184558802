"""The Gradio Space: every endpoint through gradio_client, and a real browser (Debian chromium + playwright)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_blockcbo.commands.cli import main

from .conftest import free_port


SPACE = Path(__file__).resolve().parents[1] / "spaces" / "blockcbo-demo"


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    art = tmp_path_factory.mktemp("space") / "h.safetensors"
    args = ["--num-samples", "8", "--seq-len", "24", "--no-progress"]
    assert main(["calibrate", "--model", str(tiny_model_dir), *args, "--output", str(art)]) == 0
    port = free_port()
    env = {
        **os.environ,
        "BLOCKCBO_DEMO_MODEL": str(tiny_model_dir),
        "BLOCKCBO_DEMO_HESSIAN": str(art),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(SPACE / "app.py")],
        env=env,
        cwd=SPACE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    import urllib.request

    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read()[-3000:]) from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError("the Space did not start in 120 s")
    print(f"cold start {time.perf_counter() - start:.1f} s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_every_endpoint_through_gradio_client(app_url, tmp_path):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    info = client.view_api(return_format="dict", print_info=False)
    names = set(info["named_endpoints"])
    assert {"/hessian", "/spectrum", "/generate", "/download", "/push"} <= names
    model = client_model(app_url)
    start = time.perf_counter()
    result = client.predict(model, 2, 5, api_name="/spectrum")
    print(f"spectrum latency {time.perf_counter() - start:.2f} s")
    candidates = result[3]
    rows = candidates["data"] if isinstance(candidates, dict) else candidates
    assert len(rows) == 5 and [r[0] for r in rows] == list(range(5))
    baselines = result[4]
    baseline_rows = baselines["data"] if isinstance(baselines, dict) else baselines
    assert [r[0] for r in baseline_rows] == ["bi", "angular"]
    status = client.predict(model, "embedded sample", "", None, 8, api_name="/hessian")
    assert "Hessian from 8 samples" in status
    out = client.predict(model, 2, 5, 1, "Hello there", True, api_name="/generate")
    assert len(out) == 5 and "Removed blocks" in out[4] and out[1].endswith("tok/s")
    assert "repaired without training" in out[4] and "measured on the physically pruned copy" in out[4]
    assert out[3].endswith("×)")
    archive = client.predict(model, 2, 5, 1, False, api_name="/download")
    assert Path(archive).suffix == ".zip" and Path(archive).stat().st_size > 1000
    import json
    import zipfile

    with zipfile.ZipFile(archive) as folder:
        provenance = json.loads(folder.read("block_removal.json"))
    # the Space solves as `prune` does: the rounds' trigger checked the ground state (M = 2: exact, no round ran)
    (check,) = provenance["solver"]["rounds"]
    assert check["round"] == 0 and check["rounds_run"] is False and check["miss"] < 1e-4


def client_model(url):
    """The model id the app was started with (the fixture's tiny model)."""
    from gradio_client import Client

    config = Client(url, verbose=False).config
    for component in config["components"]:
        props = component.get("props", {})
        if props.get("label", "").startswith("model ("):
            return props["value"]
    raise AssertionError("model textbox not found")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is installed by .ci/run")
def test_browser_moves_the_slider_and_generates(app_url, tmp_path):
    sys.path.insert(0, str(SPACE))
    from browser_check import run

    shot = tmp_path / "screenshot.png"
    timings = run(app_url, str(shot), remove=3)
    print(timings)
    assert timings["pruned_text"]
    assert shot.stat().st_size > 10_000
