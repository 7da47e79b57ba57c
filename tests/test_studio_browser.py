"""The studio end to end in headless Chromium (Debian's package, driven by Playwright for Python).

One session over generated photos: open the project, rename a cluster, move three images, undo
one move, mark a duplicate, export, check the manifest, kill -9 the server and restart it (state
intact), review the suggestions (accept a page, reject one image on the next, undo that page),
train for a short budget and open the evaluation, predict, and search by example. Screenshots go to docs/studio/.

Skipped where no Chromium is found, except under CI (env var CI set), where that is a failure.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "studio"
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser") if p and os.path.exists(p)), None)

if CHROMIUM is None:
    if os.environ.get("CI"):
        pytest.fail("CI must run the browser tests, but no Chromium was found (apt-get install chromium)", pytrace=False)
    pytest.skip("no Chromium found at /usr/bin/chromium (apt-get install chromium, or set CHROMIUM=PATH)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

COLOURS = [(210, 40, 40), (40, 190, 60), (40, 60, 210)]


def make_photos(folder: Path, per_colour: int = 8) -> tuple[dict[str, int], Path]:
    """Noisy squares of three colours, unlabelled, and one exact copy (a planted duplicate)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    for c, colour in enumerate(COLOURS):
        for i in range(per_colour):
            pixels = np.clip(rng.normal(colour, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            path = folder / f"p{c}{i:02d}.png"
            Image.fromarray(pixels).save(path)
            truth[str(path)] = c
    copy = folder / "p0_copy.png"
    shutil.copy(folder / "p000.png", copy)
    truth[str(copy)] = 0
    return truth, copy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path, project: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "imagerec", "studio", str(data), "--project", str(project), "--port", str(port),
           "--k", "3", "--backbone", "efficientnet_lite0", "--image-size", "64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = project.parent / f"server-{time.time_ns()}.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while "open http://127.0.0.1:" not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the studio did not start:\n{log.read_text()}")
        time.sleep(0.2)
    for _ in range(100):  # the line is printed just before uvicorn accepts
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the studio printed its URL but does not accept connections")


def db_groups(project: Path) -> dict[int, str]:
    """image id -> group name, read from the database itself."""
    con = sqlite3.connect(project / "studio.sqlite")
    rows = con.execute("SELECT i.id, g.name FROM images i JOIN groups g ON g.id = i.group_id WHERE i.excluded IS NULL").fetchall()
    con.close()
    return dict(rows)


def wait_message(page, start: str) -> None:
    """Wait until the page's message line starts with ``start`` (each action reloads the page)."""
    page.wait_for_function("s => document.querySelector('#message').textContent.startsWith(s)", arg=start)


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    Image.open(path).convert("RGB").quantize(128).save(path, optimize=True)  # small files for the repository


@pytest.mark.slow
def test_a_session_in_the_browser(tmp_path):
    truth, copy = make_photos(tmp_path / "photos")
    project = tmp_path / "photos.studio"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    servers = [start_server(tmp_path / "photos", project, port)]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.set_default_timeout(30_000)
        try:
            _session(page, url, project, tmp_path, copy, servers, port)
        finally:
            browser.close()
            for proc in servers:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()


def _session(page, url, project, tmp_path, copy, servers, port):
    # 1. open the project: three clusters of the unlabelled photos
    page.goto(url + "/")
    assert "3 groups" in page.inner_text(".how") or "clustered into 3" in page.inner_text(".how")
    shot(page, "overview")

    # 2. rename the cluster holding the first photo
    before = db_groups(project)
    page.goto(url + "/groups")
    first_cluster = sorted(set(before.values()))[0]
    section = page.locator("section.group", has=page.locator(f'h2 a:text-is("{first_cluster}")'))
    section.locator("input[name=name]").fill("Reds & <friends>")
    section.locator("form.rename button").click()
    page.wait_for_selector("#message.ok")
    assert "renamed to Reds & <friends>" in page.inner_text("#message")
    assert page.locator('h2 a:text-is("Reds & <friends>")').count() == 1
    shot(page, "groups")
    renamed = {i: ("Reds & <friends>" if g == first_cluster else g) for i, g in before.items()}
    assert db_groups(project) == renamed

    # 3. open it, select three images (click, then shift-click) and move them to another group
    page.locator('h2 a:text-is("Reds & <friends>")').click()
    figures = page.locator("#grid figure[data-id]")
    ids = [int(figures.nth(k).get_attribute("data-id")) for k in range(4)]
    figures.nth(0).click()
    figures.nth(2).click(modifiers=["Shift"])
    assert page.inner_text("#selected") == "3 selected"
    target_label = page.locator("#target option").first.inner_text()
    target = target_label.rsplit(" (", 1)[0]
    shot(page, "group-selection")
    page.click("#move")
    wait_message(page, "moved 3 image(s)")
    # 4. move one more with a drag and the M key, then undo that move with Ctrl+Z
    one = page.locator("#grid figure[data-id]").first
    assert int(one.get_attribute("data-id")) == ids[3]
    box = one.bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    page.mouse.move(box["x"] + 40, box["y"] + 40, steps=5)
    page.mouse.up()
    assert page.inner_text("#selected") == "1 selected"
    page.keyboard.press("m")
    wait_message(page, "moved 1 image(s)")
    assert db_groups(project)[ids[3]] == target
    page.keyboard.press("Control+z")
    wait_message(page, "undone: moved 1 image(s)")
    expected = dict(renamed)
    expected.update({i: target for i in ids[:3]})
    assert db_groups(project) == expected

    # 5. mark the planted duplicate (the audit's duplicate group where there is an audit, else by hand as junk)
    copy_id = _image_id(project, copy)
    page.goto(url + "/audit")
    if page.locator("#auditrun").count():
        page.click("#auditrun")
        page.wait_for_selector('#auditstate[data-state="done"], #auditstate[data-state="failed"]', timeout=90_000)
        assert page.get_attribute("#auditstate", "data-state") == "done", page.inner_text("#auditstate")
        button = page.locator('button.decide[data-decision="drop"]').first
        dropped = [int(x) for x in button.get_attribute("data-ids").split(",")]
        shot(page, "audit")
        button.click()
        page.wait_for_selector("#message.ok")
        assert page.locator("span.decided").count() >= 1
    else:
        page.goto(url + f"/groups/{_group_of(project, copy_id)}")
        page.locator(f'#grid figure[data-id="{copy_id}"]').click()
        page.keyboard.press("d")
        page.wait_for_selector("#message.ok")
        dropped = [copy_id]
    assert len(dropped) == 1 and dropped[0] in (copy_id, _image_id(project, copy.with_name("p000.png")))
    for i in dropped:
        expected.pop(i)
    assert db_groups(project) == expected

    # 6. export: the manifest holds exactly these labels
    page.goto(url + "/export")
    page.click('button.export[data-kind="manifest"]')
    page.wait_for_selector("#message.ok")
    with open(project / "export" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    path_of = _paths(project)
    assert {r["path"]: r["label"] for r in rows} == {path_of[i]: g for i, g in expected.items()}

    # 7. kill -9 the server mid-session, start it again: everything done is still there
    servers[0].send_signal(signal.SIGKILL)
    servers[0].wait()
    servers.append(start_server(tmp_path / "photos", project, port))
    page.goto(url + "/history")
    assert page.locator("td", has_text="undone").count() == 1
    assert db_groups(project) == expected
    page.goto(url + "/groups")
    assert page.locator('h2 a:text-is("Reds & <friends>")').count() == 1

    # 8. review: accept a page of suggestions, reject one image of the next page (it takes its next
    #    most likely class), then undo that page
    _review(page, url, project, expected)

    # 9. train for a short budget and read the evaluation; a confusion cell opens its images
    page.goto(url + "/train")
    page.fill("input[name=budget]", "0.4")
    page.select_option("select[name=backbone]", "seed_cnn")
    page.click("#trainform button")
    page.wait_for_url("**/train/*", timeout=120_000)
    page.wait_for_selector("table.confusion")
    assert page.inner_text("#runstatus") == "done"
    accuracy = page.locator("table.figures td").nth(1).inner_text()
    assert accuracy.endswith("%") and 0 <= float(accuracy[:-1]) <= 100
    shot(page, "evaluation")
    cell = page.locator("table.confusion a:not(.zero)").first
    count = int(cell.inner_text())
    cell.click()
    assert page.locator("#grid figure[data-id]").count() == count

    # 10. predict: upload a photo, see its classes
    page.goto(url + "/predict")
    page.set_input_files("input[type=file]", str(copy.with_name("p100.png")))
    page.click("form.upload button")
    page.wait_for_selector("table.predictions")
    assert "%" in page.locator("table.predictions td").nth(2).inner_text()

    # 11. search by example: a photo of the collection finds itself first (the first search builds the index)
    query = copy.with_name("p100.png")
    deadline = time.time() + 120
    while True:
        page.goto(url + "/search")
        page.set_input_files("input[type=file]", str(query))
        page.click("form.upload button")
        page.wait_for_selector("#results, #indexstate, p.error")
        assert page.locator("p.error").count() == 0, page.inner_text("p.error")
        if page.locator("#results").count() or time.time() > deadline:
            break
        time.sleep(1)
    first = page.locator("#results figure img").first
    assert first.get_attribute("src") == f"/thumb/{_image_id(project, query)}"
    assert float(page.locator("#results figcaption").first.inner_text()) > 0.99
    shot(page, "search")


READ_PAGE = """() => ({names: JSON.parse(document.querySelector('#reviewgrid').dataset.names),
  cards: Array.from(document.querySelectorAll('#reviewgrid figure[data-id]')).map(f => ({id: Number(f.dataset.id), group: f.dataset.group,
                                                                                         choices: f.dataset.choices}))})"""


def _review(page, url: str, project: Path, expected: dict[int, str]) -> None:
    # name the other clusters: a named class's images are the suggestions' first labels
    page.goto(url + "/groups")
    for n in range(1, 10):
        unnamed = page.locator("section.group", has=page.locator('h2 a:text-matches("^cluster ")'))
        if not unnamed.count():
            break
        old = unnamed.first.locator("h2 a").inner_text()
        unnamed.first.locator("input[name=name]").fill(f"colour {n}")
        unnamed.first.locator("form.rename button").click()
        wait_message(page, f"renamed to colour {n}")
        expected.update({i: f"colour {n}" for i, g in expected.items() if g == old})
    assert db_groups(project) == expected
    page.click('header nav a[href="/review"]')
    page.wait_for_selector("#reviewgrid", timeout=120_000)  # the page starts the features (the clustering's, cached), then reloads
    assert page.locator("section.group img").count() >= 1  # the overview is pictures of each suggested class
    shot(page, "review")
    seen = page.evaluate(READ_PAGE)
    names, cards = seen["names"], seen["cards"]
    assert len({c["group"] for c in cards}) == 1  # one suggested class a page
    decided_before = _reviewed(project)
    page.click("#accept")
    wait_message(page, f"reviewed {len(cards)} image(s), 0 corrected")
    for c in cards:
        expected[c["id"]] = names[c["group"]]
    assert db_groups(project) == expected and _reviewed(project) == decided_before | {c["id"] for c in cards}
    after_first = dict(expected)
    # the next page: the first image is wrong; one click gives it the next most likely class
    page.wait_for_selector("#reviewgrid")
    seen = page.evaluate(READ_PAGE)
    assert not {c["id"] for c in seen["cards"]} & {c["id"] for c in cards}  # decided images are not asked again
    wrong = next(c for c in seen["cards"] if c["choices"])
    other = seen["names"][wrong["choices"].split(",")[0]]
    fig = page.locator(f'#reviewgrid figure[data-id="{wrong["id"]}"]')
    fig.click()
    assert "wrong" in fig.get_attribute("class") and fig.locator("figcaption").inner_text() == "\u2192 " + other
    page.keyboard.press("Enter")
    wait_message(page, f"reviewed {len(seen['cards'])} image(s), 1 corrected")
    assert db_groups(project)[wrong["id"]] == other
    # undo takes back the whole page, and only it
    page.click("#undo")
    wait_message(page, f"undone: reviewed {len(seen['cards'])} image(s)")
    assert db_groups(project) == after_first and _reviewed(project) == decided_before | {c["id"] for c in cards}


def _reviewed(project: Path) -> set[int]:
    con = sqlite3.connect(project / "studio.sqlite")
    rows = con.execute("SELECT r.image_id FROM reviews r JOIN actions a ON a.id = r.action_id WHERE a.undone_at IS NULL").fetchall()
    con.close()
    return {r[0] for r in rows}


def _image_id(project: Path, path: Path) -> int:
    con = sqlite3.connect(project / "studio.sqlite")
    (i,) = con.execute("SELECT id FROM images WHERE path=?", (str(path),)).fetchone()
    con.close()
    return i


def _group_of(project: Path, image_id: int) -> int:
    con = sqlite3.connect(project / "studio.sqlite")
    (g,) = con.execute("SELECT group_id FROM images WHERE id=?", (image_id,)).fetchone()
    con.close()
    return g


def _paths(project: Path) -> dict[int, str]:
    con = sqlite3.connect(project / "studio.sqlite")
    rows = dict(con.execute("SELECT id, path FROM images").fetchall())
    con.close()
    return rows
