"""A person's loop in the studio, scripted in headless Chromium, counted in clicks and minutes.

From ``imagerec studio FOLDER`` on unlabelled photos (by default 600: 100 of each of the 6 classes
of ``../shared/datasets/intel-scenes-small``; ``--data SET`` takes every image of a folder of the
photo suite, train and test) copied flat under anonymous names, to an exported manifest. The
script plays a careful person who knows the true classes: it opens the Groups page and names
each cluster after the class most of its images show (merging a cluster whose class is already
named), then goes one of two ways:

``--flow review`` (the default): the Review page. On each page of suggestions it looks at every
image; a wrong one gets a click (the page gives it the next most likely class, shown under it);
if that is still wrong, a click on the right class's button (or, for a class no group has yet,
its name typed and "new class"); then one click (Accept) takes the page, which is right as
shown. Most certain pages first (``--order``). It stops when every image is decided.

``--flow groups`` (the loop before the review existed): it moves every image that sits in the
wrong group (one click each, then the target and Move), runs the audit and takes its right
suggestions.

Then it exports the manifest (and trains with ``--budget`` minutes, if above 0). Every click
counts, a key press too, navigation through the studio's own links included; a name typed is
counted apart. The script knows the true classes, so its choices are the ones a careful person
would make; a person also spends time looking, which no script measures: the minutes below are
the machine's (the studio's own work plus the page loads).

    flock /tmp/imagerec-cpu.lock python benchmarks/studio_loop.py [--data intel|SET_FOLDER] [--per-class 100]
        [--flow review|groups] [--budget 0] [--out benchmarks/results/studio_loop_NAME.json]
    python benchmarks/studio_loop.py --table benchmarks/results/studio_loop_*.json   # the tables of docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
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


def make_folder(folder: Path, data: Path, per_class: int | None, splits: tuple[str, ...]) -> dict[str, str]:
    """Copy ``per_class`` photos of each class (all when None) of ``splits`` under names that do not say the class."""
    folder.mkdir(parents=True)
    truth = {}
    for split in splits:
        for class_dir in sorted(d for d in (data / split).iterdir() if d.is_dir()):
            files = sorted(f for f in class_dir.iterdir() if f.is_file() and not f.name.startswith("."))
            for src in files[:per_class]:
                name = hashlib.sha1(str(src).encode()).hexdigest()[:12] + src.suffix.lower()
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


def start(folder: Path, project: Path, port: int, log: Path, k: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "imagerec", "studio", str(folder), "--project", str(project), "--port", str(port), "--k", str(k)]
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
    person.click('header nav a[href="/groups"]')  # from the overview
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


def labels_right(project: Path, truth: dict[str, str]) -> tuple[int, int]:
    """(images in use whose group is their true class, images in use): the manifest's accuracy as it stands."""
    rows = db(project, "SELECT i.path, g.name FROM images i JOIN groups g ON g.id = i.group_id WHERE i.excluded IS NULL")
    return sum(truth[p] == name for p, name in rows), len(rows)


def suggestions_now(page, url: str, project: Path, truth: dict[str, str]) -> dict:
    """The studio's suggestions as they stand (its JSON), scored against the truth and beside the groups."""
    got = page.evaluate("u => fetch(u).then(r => r.json())", url + "/api/review/suggestions")
    paths = dict(db(project, "SELECT id, path FROM images"))
    group = dict(db(project, "SELECT i.id, g.name FROM images i JOIN groups g ON g.id = i.group_id"))
    rows = [r for r in got["images"]]
    return {"images": len(rows), "suggestions_right": sum(truth[paths[r["id"]]] == r["suggested"] for r in rows),
            "groups_right": sum(truth[paths[r["id"]]] == group[r["id"]] for r in rows)}


EXPORT_CLICKS = 2  # the Export link, then "Write manifest"
READ_PAGE = """() => ({names: JSON.parse(document.querySelector('#reviewgrid').dataset.names),
  cards: Array.from(document.querySelectorAll('#reviewgrid figure[data-id]')).map(f => ({id: Number(f.dataset.id), group: f.dataset.group}))})"""


def review(person: Person, url: str, project: Path, truth: dict[str, str], order: str, trace: list) -> dict:
    """Page after page of the Review: fix the wrong images with the clicks the page needs, then Accept."""
    page = person.page
    paths = dict(db(project, "SELECT id, path FROM images"))
    person.click('header nav a[href="/review"]')
    page.wait_for_selector("#reviewsummary, p.error", timeout=1_800_000)  # the page computes the features once, then reloads
    if page.locator("p.error").count():
        raise RuntimeError(page.inner_text("p.error"))
    first = suggestions_now(page, url, project, truth)
    if order != "most":
        person.click(f'a[href="/review?order={order}"]')
    stats = {"pages": 0, "shown": 0, "wrong shown": 0, "fixed with one click": 0, "fixed with a class button": 0, "new classes": 0}
    while page.locator("#reviewgrid").count():
        seen = page.evaluate(READ_PAGE)
        names = seen["names"]
        ids_of = {name: gid for gid, name in names.items()}
        new_class = None
        for card in seen["cards"]:
            want = truth[paths[card["id"]]]
            if names[card["group"]] == want:
                continue
            stats["wrong shown"] += 1
            fig = page.locator(f'#reviewgrid figure[data-id="{card["id"]}"]')
            person.click(fig)  # wrong: it takes the next most likely class, written under it
            if fig.locator("figcaption").inner_text() == "\u2192 " + want:
                stats["fixed with one click"] += 1
            elif want in ids_of:
                person.click(f'#reviewbar button.pick[data-group="{ids_of[want]}"]')
                stats["fixed with a class button"] += 1
            else:  # no group has this class yet
                if new_class not in (None, want):
                    raise RuntimeError(f"two new classes on one page ({new_class}, {want}): the page takes one")
                person.type(page.locator("#newclass"), want)
                person.click("#picknew")
                new_class = want
                stats["new classes"] += 1
        with page.expect_navigation():  # the page reloads with the next page of suggestions
            person.click("#accept")
        person.wait_ok()
        stats["pages"] += 1
        stats["shown"] += len(seen["cards"])
        right, total = labels_right(project, truth)
        trace.append({"clicks": person.clicks, "typed": person.typed, "right": right, "in_use": total})
    return {"after naming": first, **stats}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def table(files: list[str]) -> None:
    """The markdown tables of docs/BENCHMARKS.md from the JSONs of earlier runs."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    print("| set | photos | classes | purity | clicks | typed | clicks an image | manifest right | pages | wrong shown "
          "(one click / class button / new class) | clicks when first >= 99% (+ export) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in runs:
        v = r["review"] or {}
        print(f"| {Path(r['data']).name} | {r['photos']} | {r['classes']} | {r['cluster_purity']:.3f} | {r['clicks']} | {r['typed']} | "
              f"{r['clicks_per_image']:.3f} | {r['manifest_right']}/{r['manifest_rows']} ({r['manifest_accuracy']:.1%}) | {v.get('pages', '')} | "
              f"{v.get('wrong shown', '')} ({v.get('fixed with one click', '')} / {v.get('fixed with a class button', '')} / {v.get('new classes', '')}) | "
              f"{r['clicks_to_99_with_export']} |")
    print()
    print("| set | images | right after naming: the groups (cluster labels) | the suggestions |")
    print("| --- | ---: | ---: | ---: |")
    for r in runs:
        a = (r["review"] or {}).get("after naming")
        if a:
            print(f"| {Path(r['data']).name} | {a['images']} | {a['groups_right'] / a['images']:.3f} | {a['suggestions_right'] / a['images']:.3f} |")


def main() -> None:
    if sys.argv[1:2] == ["--table"]:
        table(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="intel", help="'intel' (intel-scenes-small's train split) or a set folder with train/ and test/")
    ap.add_argument("--per-class", type=int, default=None, help="photos a class (default: 100 for intel, all for a set folder)")
    ap.add_argument("--flow", choices=("review", "groups"), default="review")
    ap.add_argument("--order", choices=("most", "least"), default="most", help="review pages most or least certain first")
    ap.add_argument("--budget", type=float, default=0.0, help="training budget in minutes (0: no training)")
    ap.add_argument("--out", default=None, help="JSON of the results (default: print only)")
    args = ap.parse_args()
    intel = args.data == "intel"
    data = INTEL if intel else Path(args.data).resolve()
    per_class = args.per_class if args.per_class is not None else (100 if intel else None)
    tmp = Path(tempfile.mkdtemp(prefix="studio-loop-"))
    os.environ.setdefault("IMAGEREC_HOME", str(tmp / "home"))
    truth = make_folder(tmp / "photos", data, per_class, ("train",) if intel else ("train", "test"))
    k = len(set(truth.values()))
    project, port = tmp / "photos.studio", free_port()
    url, steps, trace, found, review_stats = f"http://127.0.0.1:{port}", [], [], None, None
    t0 = time.perf_counter()
    server = start(tmp / "photos", project, port, tmp / "server.log", k)
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
            step(f"name the {len(clusters)} clusters", lambda: name_clusters(person, url, project, truth))
            named_right = labels_right(project, truth)[0]
            trace.append({"clicks": person.clicks, "typed": person.typed, "right": named_right, "in_use": len(truth)})
            if args.flow == "review":
                review_stats = step(f"review, {args.order} certain first", lambda: review(person, url, project, truth, args.order, trace))
            else:
                moved = step("move the misplaced images", lambda: fix_groups(person, url, project, truth))
                found = step("audit, take its right suggestions", lambda: audit(person, url, project, truth))
                found["moved"] = moved

            def export():
                person.click('header nav a[href="/export"]')
                person.click('button.export[data-kind="manifest"]')
                person.wait_ok()

            step("export the manifest", export)
            accuracy = None
            if args.budget > 0:
                def train():
                    person.click('header nav a[href="/train"]')
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
    clicks = sum(st[2] for st in steps)
    at_99 = next((t for t in trace if t["right"] >= 0.99 * t["in_use"]), None)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "cores": os.cpu_count(), "data": str(data), "photos": len(truth), "classes": k, "flow": args.flow,
        "order": args.order, "cluster_purity": round(purity, 4), "groups_right_after_naming": named_right,
        "manifest_rows": len(rows), "manifest_right": right, "manifest_accuracy": round(right / len(rows), 4),
        "clicks": clicks, "typed": sum(st[3] for st in steps), "clicks_per_image": round(clicks / len(truth), 4),
        "clicks_to_99_with_export": None if at_99 is None else at_99["clicks"] + EXPORT_CLICKS,
        "steps": [{"step": n, "minutes": round(sec / 60, 3), "clicks": c, "typed": t} for n, sec, c, t in steps],
        "review": review_stats, "audit": found, "trace": trace, "evaluation_accuracy": accuracy,
    }
    print(f"photos: {len(truth)}, {k} classes; cluster purity at start {purity:.3f}; right after naming {named_right}")
    if review_stats:
        a = review_stats["after naming"]
        print(f"after naming: groups right {a['groups_right']}/{a['images']}, suggestions right {a['suggestions_right']}/{a['images']}")
        print(f"review: {review_stats}")
    if found:
        print(f"groups flow: {found}")
    print(f"manifest: {len(rows)} rows, {right} with the true label ({right / len(rows):.3f}); studio evaluation accuracy {accuracy}")
    print(f"{'step':<40} {'minutes':>8} {'clicks':>7} {'typed':>6}")
    for name, seconds, c, typed in steps:
        print(f"{name:<40} {seconds / 60:>8.2f} {c:>7} {typed:>6}")
    total = sum(st[1] for st in steps)
    print(f"{'total':<40} {total / 60:>8.2f} {clicks:>7} {sum(st[3] for st in steps):>6}  ({clicks / len(truth):.3f} clicks an image)")
    if at_99 is not None:
        print(f"the manifest was first >= 99% right after {at_99['clicks']} clicks (+{EXPORT_CLICKS} to export it then)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
