"""A person's loop in the studio, scripted in headless Chromium, counted in clicks and minutes.

From ``imagerec studio FOLDER`` on 600 unlabelled photos (100 of each of the 6 classes of
``../shared/datasets/intel-scenes-small``, copied flat under anonymous names) to an exported,
cleaned manifest and a trained model. The script plays the person: it looks at each cluster and
names it after the class most of its images show, moves every image that sits in the wrong group
(one click each, then the target and Move), runs the audit and takes its duplicate and label
suggestions where they are right, exports the manifest and trains with a 2-minute budget.

The script knows the true classes, so its choices are the ones a careful person would make; a
person also spends time looking, which no script measures: the minutes below are the machine's
(the studio's own work plus the page loads), and the clicks are what a person would have to do.

    flock /tmp/imagerec-bench.lock python benchmarks/studio_loop.py [--per-class 100] [--budget 2]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
INTEL = ROOT.parent / "shared" / "datasets" / "intel-scenes-small"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


class Person:
    """Counts what a person would do: clicks (a key press counts as one) and names typed."""

    def __init__(self, page):
        self.page, self.clicks, self.typed = page, 0, 0

    def click(self, target, **kw):
        self.clicks += 1
        (self.page.locator(target) if isinstance(target, str) else target).click(**kw)

    def type(self, locator, text):
        self.typed += 1
        locator.fill(text)

    def choose(self, selector, value):
        self.clicks += 1
        self.page.select_option(selector, value)

    def wait_ok(self):
        self.page.wait_for_selector("#message.ok, #message.error")
        message = self.page.inner_text("#message")
        if self.page.locator("#message.error").count():
            raise RuntimeError(message)
        return message


def make_folder(folder: Path, per_class: int) -> dict[str, str]:
    """Copy ``per_class`` training photos of each class under names that do not say the class."""
    folder.mkdir(parents=True)
    truth = {}
    for class_dir in sorted((INTEL / "train").iterdir()):
        for src in sorted(class_dir.glob("*.jpg"))[:per_class]:
            name = hashlib.sha1(str(src).encode()).hexdigest()[:12] + ".jpg"
            shutil.copy(src, folder / name)
            truth[str(folder / name)] = class_dir.name
    return truth


def db(project: Path, sql: str, *args):
    con = sqlite3.connect(f"file:{project / 'studio.sqlite'}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def members(project: Path) -> dict[int, list[tuple[int, str]]]:
    """group id -> [(image id, path)] of the images in use."""
    out: dict[int, list[tuple[int, str]]] = {}
    for image_id, path, group_id in db(project, "SELECT id, path, group_id FROM images WHERE excluded IS NULL"):
        out.setdefault(group_id, []).append((image_id, path))
    return out


def group_names(project: Path) -> dict[int, str]:
    return dict(db(project, "SELECT id, name FROM groups"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder: Path, project: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "imagerec", "studio", str(folder), "--project", str(project), "--port", str(port), "--k", "6"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    while "open http://127.0.0.1:" not in log.read_text():
        if proc.poll() is not None:
            raise RuntimeError(f"the studio did not start:\n{log.read_text()}")
        time.sleep(0.5)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the studio does not accept connections")


def name_clusters(person: Person, url: str, project: Path, truth: dict[str, str]) -> None:
    """Rename each cluster after its majority class; merge a cluster whose class is already named."""
    page = person.page
    taken: dict[str, int] = {}
    merges: dict[str, list[int]] = {}
    for gid, imgs in sorted(members(project).items(), key=lambda kv: -len(kv[1])):
        majority = Counter(truth[p] for _, p in imgs).most_common(1)[0][0]
        if majority in taken:
            merges.setdefault(majority, []).append(gid)
            continue
        taken[majority] = gid
        page.goto(url + "/groups")
        form = page.locator(f'form.rename[data-group="{gid}"]')
        person.type(form.locator("input[name=name]"), majority)
        person.click(form.locator("button"))
        person.wait_ok()
    for majority, sources in merges.items():
        page.goto(url + "/groups")
        for gid in sources:
            person.click(f'input.merge[value="{gid}"]')
        person.choose("#mergetarget", str(taken[majority]))
        person.click("#mergebtn")
        person.wait_ok()


def fix_groups(person: Person, url: str, project: Path, truth: dict[str, str]) -> int:
    """Move every image in the wrong group to its class (a new class where none is named yet)."""
    page, moved = person.page, 0
    for gid in list(members(project)):
        while True:
            names = group_names(project)
            by_name = {v: k for k, v in names.items()}
            wrong = [(i, truth[p]) for i, p in members(project).get(gid, []) if truth[p] != names[gid]]
            if not wrong:
                break
            target = Counter(t for _, t in wrong).most_common(1)[0][0]
            ids = [i for i, t in wrong if t == target]
            moving = []
            for n in range(1, 10_000):  # the group's pages, 200 thumbnails each
                page.goto(url + f"/groups/{gid}?page={n}")
                on_page = [i for i in ids if page.locator(f'#grid figure[data-id="{i}"]').count()]
                if on_page:
                    moving = on_page
                    break
                if not page.locator("#next").count():
                    break
            for i in moving:
                person.click(f'#grid figure[data-id="{i}"] img')
            if target in by_name:
                person.choose("#target", str(by_name[target]))
                person.click("#move")
            else:
                person.type(page.locator("#newname"), target)
                person.click("#movenew")
            person.wait_ok()
            moved += len(moving)
    return moved


def audit(person: Person, url: str, project: Path, truth: dict[str, str]) -> dict:
    page = person.page
    page.goto(url + "/audit")
    person.click("#auditrun")
    page.wait_for_selector('#auditstate[data-state="done"], #auditstate[data-state="failed"]', timeout=900_000)
    if page.get_attribute("#auditstate", "data-state") != "done":
        raise RuntimeError(page.inner_text("#auditstate"))
    findings = json.loads((project / "audit" / "findings.json").read_text())
    paths = dict(db(project, "SELECT id, path FROM images"))
    taken = {"duplicates dropped": 0, "labels accepted": 0}
    for f in findings["duplicates"]:
        button = page.locator(f'button.decide[data-finding="{f["key"]}"][data-decision="drop"]')
        if button.count():
            person.click(button)
            person.wait_ok()
            taken["duplicates dropped"] += 1
    for f in findings["labels"]:
        if truth[paths[f["id"]]] == f["suggested"]:
            person.click(page.locator(f'button.decide[data-finding="{f["key"]}"][data-decision="accept"]'))
            person.wait_ok()
            taken["labels accepted"] += 1
    shown = {k: len(v) for k, v in findings.items() if isinstance(v, list)}
    return {"shown": shown, **taken}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--budget", type=float, default=2.0, help="training budget in minutes")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="studio-loop-"))
    os.environ.setdefault("IMAGEREC_HOME", str(tmp / "home"))
    truth = make_folder(tmp / "photos", args.per_class)
    project, port = tmp / "photos.studio", free_port()
    url, steps = f"http://127.0.0.1:{port}", []
    t0 = time.perf_counter()
    server = start(tmp / "photos", project, port, tmp / "server.log")
    steps.append(("start: embed and cluster", time.perf_counter() - t0, 0, 0))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            person = Person(page)

            def step(name, fn):
                c, t, start_ = person.clicks, person.typed, time.perf_counter()
                out = fn()
                steps.append((name, time.perf_counter() - start_, person.clicks - c, person.typed - t))
                return out

            page.goto(url + "/")
            clusters = {g: Counter(truth[p] for _, p in imgs) for g, imgs in members(project).items()}
            purity = sum(c.most_common(1)[0][1] for c in clusters.values()) / len(truth)
            step("name the clusters", lambda: name_clusters(person, url, project, truth))
            moved = step("move the misplaced images", lambda: fix_groups(person, url, project, truth))
            found = step("audit, take its right suggestions", lambda: audit(person, url, project, truth))

            def export():
                page.goto(url + "/export")
                person.click('button.export[data-kind="manifest"]')
                person.wait_ok()

            step("export the manifest", export)

            def train():
                page.goto(url + "/train")
                person.type(page.locator("input[name=budget]"), str(args.budget))
                person.click("#trainform button")
                page.wait_for_selector("table.confusion", timeout=1_800_000)
                return page.locator("table.figures td").nth(1).inner_text()

            accuracy = step(f"train ({args.budget:g} min budget) and evaluate", train)
            browser.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    with open(project / "export" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    right = sum(truth[r["path"]] == r["label"] for r in rows)
    print(f"photos: {len(truth)}, 6 classes; cluster purity at start {purity:.3f}; images moved {moved}")
    print(f"audit findings shown {found['shown']}; duplicates dropped {found['duplicates dropped']}, "
          f"labels accepted {found['labels accepted']}")
    print(f"manifest: {len(rows)} rows, {right} with the true label ({right / len(rows):.3f}); studio evaluation accuracy {accuracy}")
    print(f"{'step':<40} {'minutes':>8} {'clicks':>7} {'typed':>6}")
    for name, seconds, clicks, typed in steps:
        print(f"{name:<40} {seconds / 60:>8.2f} {clicks:>7} {typed:>6}")
    total = sum(s[1] for s in steps)
    print(f"{'total':<40} {total / 60:>8.2f} {sum(s[2] for s in steps):>7} {sum(s[3] for s in steps):>6}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
