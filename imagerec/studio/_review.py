"""The Review page: a suggested class for every image, learnt from every decision, a page at a time.

The studio's side of :mod:`imagerec.suggest`. The features of every image are computed once, in
the background (``features/`` in the project, the same cache the first clustering filled, so a
clustered project reuses its embeddings); after that, each page view refits the suggestions on
the labels as they are now (:meth:`~imagerec.suggest.Suggestions.update`: the neighbour graph is
kept, a refit of a few hundred or thousand images takes well under a second).

What the model learns from (:func:`model_labels`, the one place that decides it):

* an image the person decided (a review, a move, an accepted audit label; see ``reviews``) has
  the label of the group it is in now;
* an undecided image of a named class counts with its class's name while the person has decided
  fewer than :data:`PROVISIONAL_UNTIL` images of that class: right after the clusters are named,
  the clusters are all there is; once the person's own labels of a class are enough, the
  cluster's guesses of that class (which hold k-means' mistakes) no longer teach the model;
* every other image (undecided in an unnamed cluster, junk, duplicate) is unlabelled.

A review page shows the undecided images the model suggests for one class, most (or least)
certain first; the page accepted is one action (:meth:`~imagerec.studio.Project.confirm`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..errors import ImagerecError
from ._audit import _Job
from ._db import Project, dumps
from ._pages import esc, thumb

PROVISIONAL_UNTIL = 20  # decided images of a class from which its undecided images stop counting as labelled
PAGE_SIZE = 60  # images on a review page: one screen of thumbnails at 1280 x 900
NEXT_SIZE = 24  # images in the "label next" queue
ORDERS = ("most", "least")
# the linear probe alone: in benchmarks/review_simulate.py (this loop, most certain pages first, on cached
# Lite0 features) it needed fewer review clicks than the probe and propagation averaged on each set tried
# (intel 600: 102 vs 116; weather: 143 vs 156; corn: 164 vs 190), mostly because its second choice is more
# often the right class (a one-click fix)
METHOD = "probe"


@dataclass
class Entry:
    """One image on a review page: its id, the class shown for it and the other classes, most likely first."""

    image_id: int
    group_id: int
    confidence: float
    choices: list[int]


class Reviewer:
    """The suggestions of one project, kept in memory and refitted on each view.

    Args:
        project: the project.
        backbone: the backbone that embeds the images (the studio's ``--backbone``).
        image_size: its input side (the studio's ``--image-size``).
    """

    def __init__(self, project: Project, backbone: str = "auto", image_size: int | None = None):
        self.project = project
        self.backbone, self.image_size = backbone, image_size
        self.job = _Job()
        self._lock = threading.Lock()
        self._suggestions = None
        self._ids: np.ndarray | None = None  # image id of each feature row
        self._features_of: str | None = None  # the backbone spec they came from

    # -- the features, once, in the background -----------------------------------------------------

    def start(self) -> None:
        """Compute (or read back from the cache) every image's features, in a background thread;
        again after a training run finishes, with its network (the suggestions learn from it)."""
        from ._setup import features_backbone  # noqa: PLC0415

        backbone, size = features_backbone(self.project, self.backbone, self.image_size)
        if (self._ids is not None and backbone == self._features_of) or self.job.state == "running":
            return
        self.job.run("suggestion job", lambda: self._prepare(backbone, size))

    def _prepare(self, backbone: str, size: int | None) -> None:
        from ..data import ImageSource  # noqa: PLC0415
        from ._setup import collection_features  # noqa: PLC0415 - torch only when suggesting

        with self.project.connection() as con:
            paths = [r[0] for r in con.execute("SELECT path FROM images ORDER BY id")]
        source = ImageSource(paths, None, None, str(self.project.folder))
        emb = collection_features(self.project.folder, source, backbone, size, progress=False)
        ids = self.project.ids_of_paths(list(emb.paths))
        rows = [n for n, p in enumerate(emb.paths) if p in ids]
        if len(rows) < 2:
            raise ImagerecError(f"{len(rows)} readable image(s): suggestions need at least 2")
        with self._lock:
            self._features = np.asarray(emb.features)[rows]
            self._ids = np.asarray([ids[emb.paths[n]] for n in rows], np.int64)
            self._features_of, self._suggestions = backbone, None

    @property
    def ready(self) -> bool:
        return self._ids is not None

    # -- suggestions as of now ---------------------------------------------------------------------

    def current(self):
        """(suggestions, state): the suggestions refitted on the labels as they are now, and the
        database state they were fitted on (:func:`project_state`). None before the features are ready.

        Raises:
            ImagerecError: no image has a label yet (no class named, nothing decided).
        """
        if self._ids is None:
            return None
        from ..suggest import suggest  # noqa: PLC0415

        with self._lock:
            state = project_state(self.project, self._ids)
            labels = model_labels(state)
            if self._suggestions is None:
                self._suggestions = suggest(self._features, labels, method=METHOD)
            else:
                changed = {n: v for n, (v, old) in enumerate(zip(labels, self._suggestions.labels)) if v != old}
                if changed:
                    self._suggestions = self._suggestions.update(changed)
            return self._suggestions, state


@dataclass
class State:
    """What the database says about each feature row's image, as parallel arrays."""

    ids: np.ndarray  # image id
    group: np.ndarray  # group id
    name: list[str]  # group name
    named: np.ndarray  # bool: the group is a class (named), not an unnamed cluster
    in_use: np.ndarray  # bool: not junk, not a duplicate
    decided: np.ndarray  # bool: the person decided its group
    groups: dict[str, int]  # visible group name -> id


def project_state(project: Project, ids: np.ndarray) -> State:
    with project.connection() as con:
        rows = {r[0]: r[1:] for r in con.execute(
            "SELECT i.id, i.group_id, g.name, g.kind, i.excluded FROM images i JOIN groups g ON g.id = i.group_id")}
        groups = dict(con.execute("SELECT name, id FROM groups WHERE hidden=0").fetchall())
    decided = project.reviewed()
    got = [rows[int(i)] for i in ids]
    return State(ids, np.asarray([g[0] for g in got], np.int64), [g[1] for g in got], np.asarray([g[2] == "class" for g in got]),
                 np.asarray([g[3] is None for g in got]), np.asarray([int(i) in decided for i in ids]), groups)


def model_labels(state: State) -> list[str | None]:
    """The label of each row the model learns from (see the module's docstring)."""
    decided = state.decided & state.in_use
    counts: dict[str, int] = {}
    for n in np.flatnonzero(decided):
        counts[state.name[n]] = counts.get(state.name[n], 0) + 1
    labels: list[str | None] = []
    for n, name in enumerate(state.name):
        provisional = state.in_use[n] and state.named[n] and counts.get(name, 0) < PROVISIONAL_UNTIL
        labels.append(name if decided[n] or provisional else None)
    return labels


def suggested_names(s) -> np.ndarray:
    return np.asarray(s.classes, object)[s.suggester.suggested_]


def page(s, state: State, order: str = "most", group_id: int | None = None, size: int = PAGE_SIZE) -> tuple[int | None, list[Entry]]:
    """The next review page: undecided images the model suggests for one class.

    Without ``group_id`` the class is the one whose page is the most certain (``order="most"``)
    or the least certain (``"least"``) on average. Returns (group id, entries), (None, []) when
    every image in use is decided.
    """
    todo = np.flatnonzero(state.in_use & ~state.decided)
    names = suggested_names(s)
    conf = s.suggester.confidence_
    best = None
    for name in sorted(set(names[todo])):
        gid = state.groups.get(name)
        if gid is None or (group_id is not None and gid != group_id):
            continue
        rows = todo[names[todo] == name]
        rows = rows[np.argsort(-conf[rows] if order == "most" else conf[rows], kind="stable")][:size]
        score = float(conf[rows].mean()) * (1 if order == "most" else -1)
        if best is None or score > best[0]:
            best = (score, gid, rows)
    if best is None:
        return None, []
    _, gid, rows = best
    return gid, [_entry(s, state, n, gid) for n in rows]


def label_next(s, state: State, size: int = NEXT_SIZE) -> list[Entry]:
    """The undecided images whose labels would teach the model most (:func:`~imagerec.suggest.select_next`),
    each shown with its suggested class."""
    from ..suggest import select_next  # noqa: PLC0415

    if not (state.in_use & ~state.decided).any():
        return []
    decided = [name if d else None for name, d in zip(state.name, state.decided)]
    unused = ~state.in_use
    asked = select_next(s.features, decided, size + int((unused & ~state.decided).sum()), proba=s.proba)
    rows = [n for n in asked if not unused[n]][:size]
    names = suggested_names(s)
    return [_entry(s, state, n, state.groups[names[n]]) for n in rows if names[n] in state.groups]


def _entry(s, state: State, n: int, gid: int) -> Entry:
    order = np.argsort(-s.proba[n], kind="stable")
    choices = [state.groups[s.classes[c]] for c in order if s.classes[c] in state.groups and state.groups[s.classes[c]] != gid]
    return Entry(int(state.ids[n]), gid, float(s.proba[n].max()), choices)


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ImagerecError(f"order={order!r} must be 'most' (most certain first) or 'least' (least certain first)")
    return order


# -- the pages --------------------------------------------------------------------------------------


def body(reviewer: Reviewer, order: str, group_id: int | None, queue: bool = False) -> str:
    """The Review page (``queue``: the "label next" queue instead of a class's page)."""
    order = check_order(order)
    if not reviewer.ready:
        job = reviewer.job
        words = {"idle": "starting", "running": "computing the features of every image (once; a clustered project reuses them)",
                 "done": "ready", "failed": "failed"}[job.state]
        retry = '<p><button id="reviewstart">Try again</button></p>' if job.state == "failed" else ""
        return (f'<p id="reviewstate" data-state="{esc(job.state)}">Suggestions: {esc(words)}{": " + esc(job.message) if job.message else ""}</p>'
                + retry + "<p>The review shows the images the model suggests for each class, a page at a time; every decision refits it.</p>")
    try:
        s, state = reviewer.current()
    except ImagerecError as e:
        return f'<p class="error">{esc(e)}</p><p>Name a cluster on the <a href="/groups">Groups</a> page: its images are the first labels.</p>'
    names = {gid: name for name, gid in state.groups.items()}
    if queue:
        gid, entries = None, label_next(s, state)
        title = f"Label next: the {len(entries)} image(s) whose labels teach the model most, each with its suggested class"
    else:
        gid, entries = page(s, state, order, group_id)
        title = (f"Suggested <b>{esc(names[gid])}</b>, {'most' if order == 'most' else 'least'} certain first" if gid is not None
                 else "Every image in use is decided." if group_id is None else "No undecided image is suggested for this class.")
    return (_summary(s, state) + _classes(s, state, order) + _links(order, group_id, queue) + f"<h2>{title}</h2>"
            + (_toolbar(names, entries, gid) + _grid(entries, names, gid) if entries else ""))


def _summary(s, state: State) -> str:
    labels = model_labels(state)
    in_use = int(state.in_use.sum())
    decided = int((state.decided & state.in_use).sum())
    provisional = sum(1 for n, v in enumerate(labels) if v is not None and not state.decided[n])
    return (f'<p id="reviewsummary" data-decided="{decided}" data-in-use="{in_use}">{decided:,} of {in_use:,} images in use decided by you. '
            f"The suggestions learn from {decided + provisional:,} labels: {decided:,} yours, {provisional:,} from named classes "
            f"(a class's own images count until you have decided {PROVISIONAL_UNTIL} of them).</p>")


def _classes(s, state: State, order: str) -> str:
    """Each suggested class with its undecided images, most certain first: the overview in pictures."""
    todo = np.flatnonzero(state.in_use & ~state.decided)
    names, conf = suggested_names(s), s.suggester.confidence_
    cards = []
    for name, gid in sorted(state.groups.items(), key=lambda kv: -int((names[todo] == kv[0]).sum())):
        rows = todo[names[todo] == name]
        if not len(rows):
            continue
        top = rows[np.argsort(-conf[rows], kind="stable")][:8]
        pics = "".join(thumb(int(state.ids[n]), f"{conf[n]:.0%}", selectable=False) for n in top)
        cards.append(f'<section class="group"><h2><a href="/review?group={gid}&amp;order={order}">{esc(name)}</a> '
                     f"<small>{len(rows):,} to review</small></h2><div class=\"strip\">{pics}</div></section>")
    return "".join(cards)


def _links(order: str, group_id: int | None, queue: bool) -> str:
    pin = f"group={group_id}&amp;" if group_id is not None else ""
    links = [(f"/review?{pin}order=most", "most certain first", not queue and order == "most"),
             (f"/review?{pin}order=least", "least certain first", not queue and order == "least"),
             ("/review", "every class", False), ("/review/next", "label next", queue)]
    return '<p class="pager">' + " | ".join(f"<b>{esc(t)}</b>" if on else f'<a href="{h}">{esc(t)}</a>' for h, t, on in links) + "</p>"


def _toolbar(names: dict[int, str], entries: list[Entry], gid: int | None) -> str:
    what = f"{len(entries)} as {esc(names[gid])!s}" if gid is not None else f"these {len(entries)} as shown"
    picks = "".join(f'<button class="pick" data-group="{g}">{esc(n)}</button>' for g, n in sorted(names.items(), key=lambda kv: kv[1]))
    return f"""<div class="toolbar" id="reviewbar">
<button id="accept" title="Accept the page as shown (Enter)">Accept {what}</button>
<span class="help">an image is wrong? click it: it takes the next most likely class (click again for the one after), or pick its class:</span>
{picks}<input id="newclass" placeholder="or a new class" maxlength="80"><button id="picknew">new class</button>
</div>"""


def _grid(entries: list[Entry], names: dict[int, str], gid: int | None) -> str:
    figures = []
    for e in entries:
        caption = f"{e.confidence:.0%}" if gid is not None else f"{names[e.group_id]} {e.confidence:.0%}"
        figures.append(f'<figure class="thumb review" data-id="{e.image_id}" data-group="{e.group_id}" data-choices="{",".join(map(str, e.choices))}">'
                       f'<img loading="lazy" src="/thumb/{e.image_id}" alt="image {e.image_id}" width="96" height="96">'
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
    names_json = esc(dumps({str(g): n for g, n in names.items()}))
    return f'<div class="grid" id="reviewgrid" data-names="{names_json}">{"".join(figures)}</div>'
