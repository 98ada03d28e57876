"""`uwe export --to labelstudio` imported into a real Label Studio server (SQLite, 127.0.0.1).

The server validates predictions against the labeling config on import (an unknown control, label
or type, or a coordinate above 100 is refused with HTTP 400), and serves the images from local
storage through the references `--url-prefix` built. Tasks and predictions are read back through
the API and compared with the pool. Needs `.venv-ls` (`make ls-venv`); `make test` builds it.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import missing_integration
from handoff_pools import CLASS_NAMES, DET_NAMES, classification_pool, detection_pool, region_pool
from integrations import ls_server
from typer.testing import CliRunner

from uwe_cli.batch import read_batch
from uwe_cli.cli import app

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

CONFIGS = {
    "classification": '<View><Image name="image" value="$image"/><Choices name="choice" toName="image">'
    + "".join(f'<Choice value="{n}"/>' for n in CLASS_NAMES)
    + "</Choices></View>",
    "regions": '<View><Image name="image" value="$image"/><Rectangle name="region" toName="image"/></View>',
    "detection": '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    + "".join(f'<Label value="{n}"/>' for n in DET_NAMES)
    + "</RectangleLabels></View>",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    venv = Path(os.environ.get("UWE_LS_VENV", ROOT / ".venv-ls"))
    template = Path(os.environ.get("UWE_LS_TEMPLATE", ROOT / ".ls-template"))
    if not (venv / "bin" / "label-studio").exists():
        missing_integration(f"no Label Studio at {venv} (build it with `make ls-venv`)")
    files = tmp_path_factory.mktemp("ls-files")
    started = time.monotonic()
    with ls_server.label_studio(venv, template, tmp_path_factory.mktemp("ls") / "data", files) as url:
        print(f"Label Studio ready at {url} in {time.monotonic() - started:.1f} s")
        yield url, files


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], env={"UWE_NO_PROGRESS": "1"})


def call(url: str, method: str, path: str, body=None):
    return ls_server.api(url, method, path, body)


@pytest.mark.parametrize(
    "kind,make,budget",
    [
        ("classification", classification_pool, 12),
        ("regions", region_pool, 10),
        ("detection", detection_pool, 12),
    ],
)
def test_import_into_label_studio(server, kind, make, budget):
    url, files = server
    folder = files / kind
    folder.mkdir()
    fx = make(folder)
    batch = folder / "batch.csv"
    assert invoke("select", fx.pool, "--budget", budget, "--out", batch, "-q").exit_code == 0
    tasks_file = folder / "tasks.json"
    prefix = f"/data/local-files/?d={kind}/images/"
    result = invoke(
        "export", batch, "--pool", fx.pool, "--to", "labelstudio", "--out", tasks_file, "--url-prefix", prefix
    )
    assert result.exit_code == 0, result.output
    exported = json.loads(tasks_file.read_text())

    status, project = call(
        url, "POST", "/api/projects", {"title": f"uwe {kind}", "label_config": CONFIGS[kind]}
    )
    assert status == 201, project
    pid = project["id"]
    storage = {"project": pid, "path": str(fx.images), "title": "uwe images", "use_blob_urls": True}
    status, body = call(url, "POST", "/api/storages/localfiles", storage)
    assert status == 201, body
    status, imported = call(url, "POST", f"/api/projects/{pid}/import?return_task_ids=true", exported)
    assert status == 201, imported
    with_predictions = sum(1 for t in exported if t.get("predictions"))
    assert (imported["task_count"], imported["prediction_count"]) == (len(exported), with_predictions)

    got = sorted(ls_server.project_tasks(url, pid), key=lambda t: t["data"]["rank"])
    b = read_batch(batch)
    assert [t["data"]["uwe_id"] for t in got] == b.ids  # every pick, in batch order
    image_ids = [t.get("data", {}).get("image_id", t["data"]["uwe_id"]) for t in exported]
    assert [t["data"]["image"] for t in got] == [prefix + urllib.parse.quote(i, safe="/") for i in image_ids]
    for sent, back in zip(exported, got, strict=True):
        assert back["data"]["uncertainty"] == sent["data"]["uncertainty"]
        assert back["data"]["distance"] == sent["data"]["distance"]
        assert len(back["predictions"]) == len(sent.get("predictions", []))
        for p_sent, p_back in zip(sent.get("predictions", []), back["predictions"], strict=True):
            assert p_back["model_version"] == "uwe"
            if "score" in p_sent:
                assert p_back["score"] == pytest.approx(p_sent["score"])
            assert len(p_back["result"]) == len(p_sent["result"])
            for r_sent, r_back in zip(p_sent["result"], p_back["result"], strict=True):
                assert r_back["type"] == r_sent["type"] and r_back["from_name"] == r_sent["from_name"]
                for key, value in r_sent["value"].items():
                    if isinstance(value, float):
                        assert r_back["value"][key] == pytest.approx(value, abs=1e-6)  # within rounding
                    else:
                        assert r_back["value"][key] == value
    if kind == "detection":
        assert any(t["predictions"] and t["predictions"][0]["result"] == [] for t in got)  # no detection

    # the server reaches the images through the exported references (odd names included)
    for task in got[:3] + [t for t in got if "quoted" in t["data"]["uwe_id"]]:
        request = urllib.request.Request(url + task["data"]["image"])
        request.add_header("Authorization", f"Token {ls_server.TOKEN}")
        with urllib.request.urlopen(request, timeout=30) as response:
            name = task["data"].get("image_id", task["data"]["uwe_id"])
            assert response.read() == (fx.images / name).read_bytes()


def test_validation_is_on(server):
    """The server refuses a prediction whose label is not in the config (so the test above means something)."""
    url, _ = server
    status, project = call(
        url, "POST", "/api/projects", {"title": "uwe refuse", "label_config": CONFIGS["detection"]}
    )
    assert status == 201
    value = {"x": 1.0, "y": 1.0, "width": 5.0, "height": 5.0, "rotation": 0, "rectanglelabels": ["truck"]}
    result = {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "value": value}
    task = {"data": {"image": "/x.png"}, "predictions": [{"model_version": "uwe", "result": [result]}]}
    status, _ = call(url, "POST", f"/api/projects/{project['id']}/import", [task])
    assert status == 400
