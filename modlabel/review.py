"""The review loop's queue and imports: which images a person should look at next, and
many reviews at once from a CSV file.

``review_queue`` lists the next ``n`` images of a model to look at, leaving out the ones
that have a review already (``store.reviews``), by one of six strategies:

* ``uncertainty``: the smallest top-2 margin first, p(label) - p(runner-up) of the
  calibrated probabilities (margin sampling; Scheffer et al. 2001, Settles 2009 §3.1):
  where the model hesitated between two classes.
* ``out-of-set``: the images the model flagged out of set first, highest out-of-set score
  first (``modlabel.ood``), then the unflagged ones nearest to being flagged.
* ``disagreement``: DICOM images whose header's Modality contradicts the label, by the
  mapping of the named query ``modality-agreement`` (``sql/modality-agreement.sql``, its
  one home: edit its VALUES list and the queue follows), least confident first.
* ``diverse``: a spread-out sample of the stored GAP embeddings by k-center greedy
  (Gonzalez 1985; Sener & Savarese 2018, the core-set approach): each pick is the image
  farthest (cosine distance) from every image picked or reviewed before. Bounded: it
  works on a seeded uniform sample of at most ``DIVERSE_POOL`` unreviewed images
  (reservoir sampling while streaming), at most ``DIVERSE_POOL`` reviewed ones as the
  starting centres; memory ``2 * DIVERSE_POOL * K`` float32.
* ``typical``: the most typical image of each cluster that holds no reviewed image,
  largest cluster first: TypiClust (Hacohen, Dekel & Weinshall 2022, "Active Learning on a
  Budget: Opposite Strategies Suit High and Low Budgets"). With few reviews, typical
  images teach a model more than uncertain or outlying ones. The embeddings of the same
  bounded samples as ``diverse`` (with ``label``, the reviewed ones of that label too) go
  into reviewed + ``n`` clusters by seeded k-means (at most the candidates, at most
  ``TYPICAL_MAX_CLUSTERS``); an image's typicality is 1 / its mean Euclidean distance to
  its ``TYPICAL_NEIGHBOURS`` nearest neighbours in its cluster. When fewer clusters are
  free than ``n``, the clusters give their next most typical images in turn, those with
  the fewest reviewed images and the largest first. Memory about ``4 * DIVERSE_POOL * K``
  float32 (the two samples, their stacked copy, its copy sorted by cluster in each
  iteration) and blocks of ``BLOCK_VALUES`` distances (never a pool x pool matrix); time
  O(20 M k K) for k-means and O(S^2 K) for each cluster of S images reached.
* ``random``: a seeded uniform sample, for an unbiased estimate of the archive's accuracy
  (``modlabel.accuracy``): each image's place is a hash of the seed and its path, so the
  same seed gives the same order, and asking again after reviewing gives the next images
  of it. The others choose the images where the model is likeliest wrong, which makes any
  accuracy measured on them biased.

``label`` restricts any strategy to the images the model gave that label.

``import_reviews_csv`` records the reviews of a CSV file of ``path,label[,note,reviewer]``:
each bad line is one error naming the line and why, and the good lines are recorded.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import spreadsheet, store
from .codec import MapCodecError, decode_embeddings
from .errors import InputError, ModlabelError, UsageError
from .queries import load_query
from .similar import stored_key
from .store.reviews import (
    CSV,
    DISAGREEMENT,
    DIVERSE,
    NONE_WORD,
    OUT_OF_SET,
    QUEUE_STRATEGIES,
    RANDOM,
    TYPICAL,
    UNCERTAINTY,
    ImageKey,
    check_label,
    check_reviewer,
    current_review_join,
    find_image,
    unreviewed,
)

# The diverse and typical queues' bound: images sampled, and reviewed images sampled.
DIVERSE_POOL = 10_000
# The typical queue: TypiClust's constants (Hacohen et al. 2022, their code): clusters at
# most, the neighbours of a typicality, and a cluster this small or smaller comes last
# (an outlier's own). Lloyd iterations at most, and the distances a block holds (16 MiB).
TYPICAL_MAX_CLUSTERS = 500
TYPICAL_NEIGHBOURS = 20
TYPICAL_MIN_CLUSTER = 5
KMEANS_ITERATIONS = 20
BLOCK_VALUES = 1 << 22
# Rows read from the database at a time by the streamed strategies.
CHUNK_ROWS = 5000
# The named query whose VALUES list maps DICOM Modality codes to classes.
MODALITY_QUERY = "modality-agreement"


@dataclass(frozen=True)
class QueueItem:
    """An image to look at: the model's row and why the queue chose it.

    ``score``: the strategy's own number (uncertainty: the top-2 margin; out-of-set: the
    out-of-set score; disagreement: the confidence; diverse: the cosine distance to the
    nearest image already picked or reviewed, None for the first pick without one;
    typical: the typicality, 1 / the mean distance to its nearest neighbours in its cluster;
    random: the image's place in [0, 1) of the seeded order)."""

    row_id: int
    path: str  # stored text (paths.display_path shows it)
    sha256: str
    label: str | None
    confidence: float | None
    runner_up: str | None
    runner_up_probability: float | None
    out_of_set: bool | None
    ood_score: float | None
    dicom_modality: str | None
    strategy: str
    score: float | None
    why: str

    @property
    def key(self) -> ImageKey:
        return ImageKey(self.path, self.sha256)


def _candidates(model_id: int, label: str | None) -> list:
    """The rows a queue may list: the model's present, labeled images (no error, a content
    hash) that have no review yet, of ``label`` when given."""
    c = store.images.c
    where = [
        c.model_id == model_id,
        c.missing_since.is_(None),
        c.error.is_(None),
        c.sha256.is_not(None),
        unreviewed(store.images),
    ]
    if label is not None:
        where.append(c.label == label)
    return where


_ITEM_COLUMNS = (
    "id",
    "path",
    "sha256",
    "label",
    "confidence",
    "runner_up",
    "runner_up_probability",
    "out_of_set",
    "ood_score",
    "dicom_modality",
)


def _item_columns() -> list:
    return [store.images.c[name] for name in _ITEM_COLUMNS]


def _item(row: Any, strategy: str, score: float | None, why: str) -> QueueItem:
    m = row._mapping
    return QueueItem(
        row_id=int(m["id"]),
        path=m["path"],
        sha256=m["sha256"],
        label=m["label"],
        confidence=m["confidence"],
        runner_up=m["runner_up"],
        runner_up_probability=m["runner_up_probability"],
        out_of_set=m["out_of_set"],
        ood_score=m["ood_score"],
        dicom_modality=m["dicom_modality"],
        strategy=strategy,
        score=score,
        why=why,
    )


def review_queue(
    engine: Engine,
    model_id: int,
    strategy: str,
    *,
    label: str | None = None,
    n: int = 20,
    seed: int = 0,
) -> list[QueueItem]:
    """The next ``n`` unreviewed images of the model to look at, by ``strategy`` (one of
    ``QUEUE_STRATEGIES``; see the module's docstring), of ``label`` when given. ``seed``:
    the random, diverse and typical queues' seed (the same seed, the same queue)."""
    if strategy not in QUEUE_STRATEGIES:
        raise UsageError(
            f"unknown queue strategy {strategy!r}; choose from {', '.join(QUEUE_STRATEGIES)}"
        )
    if n < 1:
        raise UsageError(f"a queue lists at least one image, not {n}")
    if label is not None:
        model = store.model_row(engine, model_id)
        check_label(label, model.class_names)
    queue = {
        UNCERTAINTY: _uncertainty,
        OUT_OF_SET: _out_of_set,
        DISAGREEMENT: _disagreement,
        DIVERSE: _diverse,
        TYPICAL: _typical,
        RANDOM: _random,
    }[strategy]
    return queue(engine, model_id, label, n, seed)


def _uncertainty(
    engine: Engine, model_id: int, label: str | None, n: int, seed: int
) -> list[QueueItem]:
    c = store.images.c
    margin = (c.confidence - sa.func.coalesce(c.runner_up_probability, 0.0)).label("margin")
    query = (
        sa.select(*_item_columns(), margin)
        .where(*_candidates(model_id, label), c.confidence.is_not(None))
        .order_by(margin, c.path)
        .limit(n)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        _item(
            r,
            UNCERTAINTY,
            float(r.margin),
            f"top-2 margin {r.margin:.3f} ({r.label} vs {r.runner_up or '-'})",
        )
        for r in rows
    ]


def _out_of_set(
    engine: Engine, model_id: int, label: str | None, n: int, seed: int
) -> list[QueueItem]:
    c = store.images.c
    flagged_first = sa.case((c.out_of_set.is_(True), 0), else_=1)
    query = (
        sa.select(*_item_columns())
        .where(*_candidates(model_id, label))
        .order_by(flagged_first, c.ood_score.desc().nulls_last(), c.path)
        .limit(n)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    items = []
    for r in rows:
        score = float(r.ood_score) if r.ood_score is not None else None
        shown = f"{score:.3g}" if score is not None else "none (the model has no threshold)"
        why = ("flagged out of set" if r.out_of_set else "not flagged") + f", score {shown}"
        items.append(_item(r, OUT_OF_SET, score, why))
    return items


_MODALITY_PAIR = re.compile(r"\(\s*'([^']+)'\s*,\s*'([^']+)'\s*\)")


def modality_mapping() -> dict[str, str]:
    """{DICOM Modality code (upper case): class} as the named query ``modality-agreement``
    maps them (the pairs of its ``expected`` VALUES list)."""
    body = load_query(MODALITY_QUERY).body
    values = body.split("VALUES", 1)[1].split("SELECT", 1)[0] if "VALUES" in body else ""
    mapping = {code.upper(): label for code, label in _MODALITY_PAIR.findall(values)}
    if not mapping:
        raise ModlabelError(f"sql/{MODALITY_QUERY}.sql maps no Modality code to a class")
    return mapping


def _disagreement(
    engine: Engine, model_id: int, label: str | None, n: int, seed: int
) -> list[QueueItem]:
    c = store.images.c
    mapping = modality_mapping()
    expected = sa.case(mapping, value=sa.func.upper(c.dicom_modality), else_=None).label("expected")
    query = (
        sa.select(*_item_columns(), expected)
        .where(
            *_candidates(model_id, label),
            sa.func.upper(c.dicom_modality).in_(sorted(mapping)),
            c.label.is_not(None),
            c.label != expected,
        )
        .order_by(c.confidence.asc().nulls_last(), c.path)
        .limit(n)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        _item(
            r,
            DISAGREEMENT,
            r.confidence,
            f"DICOM Modality {r.dicom_modality} says {r.expected}, the model {r.label}",
        )
        for r in rows
    ]


def _place(seed: int, path: str) -> int:
    """The image's place in the seeded random order: 64 bits of BLAKE2b(seed, path)."""
    digest = hashlib.blake2b(f"{seed}\0{path}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def _random(engine: Engine, model_id: int, label: str | None, n: int, seed: int) -> list[QueueItem]:
    c = store.images.c
    query = (
        sa.select(c.id, c.path)
        .where(*_candidates(model_id, label))
        .execution_options(yield_per=CHUNK_ROWS)
    )
    with engine.connect() as conn:
        rows = conn.execute(query)
        first = heapq.nsmallest(n, ((_place(seed, p), i) for i, p in rows))
    places = {row_id: place / 2.0**64 for place, row_id in first}
    found = _rows_by_id(engine, list(places))
    return [
        _item(found[row_id], RANDOM, place, f"seeded random sample (seed {seed})")
        for row_id, place in places.items()
    ]


def _rows_by_id(engine: Engine, ids: Sequence[int]) -> dict[int, Any]:
    if not ids:
        return {}
    query = sa.select(*_item_columns()).where(store.images.c.id.in_(list(ids)))
    with engine.connect() as conn:
        return {int(r.id): r for r in conn.execute(query)}


@dataclass
class _Reservoir:
    """A seeded uniform sample of at most ``size`` items of a stream (Algorithm R,
    Vitter 1985): ``ids`` and their ``blobs``."""

    size: int
    rng: np.random.Generator
    seen: int = 0
    ids: list[int] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)

    def offer(self, item_id: int, blob: bytes) -> None:
        self.seen += 1
        if len(self.ids) < self.size:
            self.ids.append(item_id)
            self.blobs.append(blob)
            return
        at = int(self.rng.integers(0, self.seen))
        if at < self.size:
            self.ids[at], self.blobs[at] = item_id, blob


def _embedding_sample(
    engine: Engine, where: list, size: int, rng: np.random.Generator, *, reviewed: bool
) -> _Reservoir:
    """A reservoir sample of the rows matching ``where`` that have an embedding (joined to
    their current review when ``reviewed``), in path order before sampling."""
    c = store.images.c
    source: Any = store.images
    if reviewed:
        review, on = current_review_join(store.images)
        source = store.images.join(review, on)
    query = (
        sa.select(c.id, c.embedding)
        .select_from(source)
        .where(*where, c.embedding.is_not(None))
        .order_by(c.path)
        .execution_options(yield_per=CHUNK_ROWS)
    )
    sample = _Reservoir(size, rng)
    with engine.connect() as conn:
        for row_id, blob in conn.execute(query):
            sample.offer(int(row_id), bytes(blob))
    return sample


def _vectors(blobs: list[bytes]) -> np.ndarray:
    try:
        return decode_embeddings(blobs)
    except MapCodecError as exc:
        raise ModlabelError(f"a stored embedding cannot be read: {exc}") from None


def k_center_greedy(
    candidates: np.ndarray, centers: np.ndarray, n: int, *, first: int = 0
) -> list[tuple[int, float | None]]:
    """k-center greedy (Gonzalez 1985; Sener & Savarese 2018): ``n`` rows of
    ``candidates`` (M, K) unit vectors, each the farthest by cosine distance (1 - u.v)
    from ``centers`` (C, K) and the rows picked before it. With no centres the first pick
    is row ``first``. Returns (row, its distance to the nearest centre before it; None for
    a first pick without centres). Time O(n M K + C M K), memory O(M)."""
    m = candidates.shape[0]
    nearest = np.full(m, np.inf, dtype=np.float64)
    for start in range(0, centers.shape[0], 1024):
        block = 1.0 - candidates @ centers[start : start + 1024].T  # (M, <=1024)
        np.minimum(nearest, block.min(axis=1), out=nearest)
    picked: list[tuple[int, float | None]] = []
    for _ in range(min(n, m)):
        if np.isinf(nearest).all():
            row, distance = first, None
        else:
            row = int(np.argmax(nearest))
            distance = float(nearest[row])
            if distance <= -np.inf:  # every candidate picked already
                break
        picked.append((row, distance))
        np.minimum(nearest, 1.0 - candidates @ candidates[row], out=nearest)
        nearest[row] = -np.inf  # never picked twice
    return picked


def _samples(
    engine: Engine,
    model_id: int,
    label: str | None,
    rng: np.random.Generator,
    *,
    reviewed_of_label: bool,
) -> tuple[_Reservoir, np.ndarray, np.ndarray] | None:
    """The diverse and typical queues' bounded samples: (the unreviewed candidates'
    reservoir, their (M, K) unit vectors, the reviewed images' (R, K)), at most
    DIVERSE_POOL each; None where no candidate has an embedding. ``reviewed_of_label``:
    with a label, only the reviewed images of that label."""
    c = store.images.c
    pool = _embedding_sample(
        engine, _candidates(model_id, label), DIVERSE_POOL, rng, reviewed=False
    )
    if not pool.ids:
        return None
    present = [c.model_id == model_id, c.missing_since.is_(None), c.error.is_(None)]
    if reviewed_of_label and label is not None:
        present.append(c.label == label)
    done = _embedding_sample(engine, present, DIVERSE_POOL, rng, reviewed=True)
    candidates = _vectors(pool.blobs)
    k = candidates.shape[1]
    reviewed = _vectors(done.blobs) if done.ids else np.zeros((0, k), np.float32)
    if reviewed.shape[1] != k:
        raise ModlabelError("the stored embeddings of the model differ in length")
    return pool, candidates, reviewed


def _diverse(
    engine: Engine, model_id: int, label: str | None, n: int, seed: int
) -> list[QueueItem]:
    rng = np.random.default_rng(seed)
    sampled = _samples(engine, model_id, label, rng, reviewed_of_label=False)
    if sampled is None:
        return []
    pool, candidates, centers = sampled
    first = int(rng.integers(0, len(pool.ids)))
    picked = k_center_greedy(candidates, centers, n, first=first)
    found = _rows_by_id(engine, [pool.ids[i] for i, _ in picked])
    items = []
    for i, distance in picked:
        why = (
            "a seeded first pick"
            if distance is None
            else f"cosine distance {distance:.3f} to the nearest image picked or reviewed"
        )
        items.append(_item(found[pool.ids[i]], DIVERSE, distance, why))
    return items


def _squared_distances(points: np.ndarray, sq: np.ndarray, to: np.ndarray) -> np.ndarray:
    """(B, C) squared Euclidean distances of ``points`` (B, K), their squared norms ``sq``
    (B,), to the rows of ``to`` (C, K); float rounding's negatives clipped to 0."""
    d2 = sq[:, None] + np.einsum("ij,ij->i", to, to)[None, :] - 2.0 * (points @ to.T)
    return np.maximum(d2, 0.0, out=d2)


def _blocks(rows: int, columns: int) -> Iterator[slice]:
    """Slices of ``rows`` whose blocks of distances to ``columns`` hold ``BLOCK_VALUES``."""
    step = max(1, BLOCK_VALUES // max(columns, 1))
    return (slice(start, start + step) for start in range(0, rows, step))


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded k-means: Lloyd's iterations (Lloyd 1982; at most ``KMEANS_ITERATIONS``, until nothing
    moves) from greedy k-means++ seeds (Arthur & Vassilvitskii 2007: each seed the best
    of 2 + ln k draws by squared distance, as scikit-learn seeds). Returns the cluster of
    each row of ``points`` (M, K) float32, in 0..k-1 (fewer clusters when fewer distinct
    rows). Distances in blocks (``BLOCK_VALUES``): memory O(M K), time
    O(KMEANS_ITERATIONS M k K)."""
    m = points.shape[0]
    sq = np.einsum("ij,ij->i", points, points)
    seeds = [int(rng.integers(0, m))]
    nearest = _squared_distances(points, sq, points[seeds])[:, 0].astype(np.float64)
    trials = 2 + int(np.log(max(k, 1)))
    while len(seeds) < min(k, m) and nearest.sum() > 0:
        draws = np.searchsorted(np.cumsum(nearest), rng.random(trials) * nearest.sum())
        draws = np.minimum(draws, m - 1)
        tried = np.minimum(nearest[:, None], _squared_distances(points, sq, points[draws]))
        best = int(np.argmin(tried.sum(axis=0)))
        seeds.append(int(draws[best]))
        nearest = tried[:, best]
    centers = points[seeds].copy()
    assign = np.full(m, -1, dtype=np.intp)
    for _ in range(KMEANS_ITERATIONS):
        before = assign.copy()
        for block in _blocks(m, len(centers)):
            assign[block] = _squared_distances(points[block], sq[block], centers).argmin(axis=1)
        if np.array_equal(assign, before):
            break
        grouped = points[np.argsort(assign, kind="stable")]
        counts = np.bincount(assign, minlength=len(centers))
        ends = np.cumsum(counts)
        for at in np.flatnonzero(counts):  # an emptied cluster keeps its centre
            centers[at] = grouped[ends[at] - counts[at] : ends[at]].mean(axis=0)
    return assign


def typicality(points: np.ndarray) -> np.ndarray:
    """TypiClust's typicality (Hacohen et al. 2022) of each row of one cluster's
    ``points`` (S, K): 1 / (the mean Euclidean distance to its k nearest other rows + 1e-5,
    their code's guard against a zero), k = min(TYPICAL_NEIGHBOURS, S - 1); 0 for a lone
    row. Distances in blocks (``BLOCK_VALUES``), time O(S^2 K)."""
    s = points.shape[0]
    k = min(TYPICAL_NEIGHBOURS, s - 1)
    out = np.zeros(s, dtype=np.float64)
    if k < 1:
        return out
    sq = np.einsum("ij,ij->i", points, points)
    for block in _blocks(s, s):
        d2 = _squared_distances(points[block], sq[block], points)
        rows = np.arange(d2.shape[0])
        d2[rows, rows + block.start] = np.inf  # not its own neighbour
        near = np.sqrt(np.partition(d2, k - 1, axis=1)[:, :k], dtype=np.float64)
        out[block] = 1.0 / (near.mean(axis=1) + 1e-5)
    return out


@dataclass(frozen=True)
class TypicalPick:
    """A pick of ``typiclust``: its ``row``, ``typicality``, ``rank`` by typicality among
    its cluster's unreviewed rows (1: the most typical), the cluster's ``size`` (rows) and
    how many of them are ``reviewed``."""

    row: int
    typicality: float
    rank: int
    size: int
    reviewed: int


def typiclust(
    vectors: np.ndarray, reviewed: np.ndarray, n: int, rng: np.random.Generator
) -> list[TypicalPick]:
    """TypiClust (Hacohen, Dekel & Weinshall 2022): ``n`` rows of ``vectors`` (M, K)
    not ``reviewed`` (M,) bool. k-means into reviewed + ``n`` clusters (at most the
    unreviewed rows and ``TYPICAL_MAX_CLUSTERS``); the clusters in the order of their code
    (fewest reviewed rows first, then largest; one of ``TYPICAL_MIN_CLUSTER`` rows or
    fewer, which their code drops, last), each giving its most typical unreviewed row,
    then, while ``n`` asks for more, its next most typical in turn. Typicalities are
    computed only for the clusters reached."""
    free = int((~reviewed).sum())
    if free == 0:
        return []
    assign = kmeans(vectors, min(int(reviewed.sum()) + n, free, TYPICAL_MAX_CLUSTERS), rng)
    order = np.argsort(assign, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(assign[order])) + 1)
    groups = [g for g in groups if not reviewed[g].all()]
    groups.sort(key=lambda g: (len(g) <= TYPICAL_MIN_CLUSTER, int(reviewed[g].sum()), -len(g)))
    ranked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    picks: list[TypicalPick] = []
    depth = 0
    while len(picks) < min(n, free):
        for at, members in enumerate(groups):
            if at not in ranked:
                score = typicality(vectors[members])
                waiting = np.flatnonzero(~reviewed[members])
                best = waiting[np.argsort(-score[waiting], kind="stable")]
                ranked[at] = (members[best], score[best])
            rows, scores = ranked[at]
            if depth < len(rows):
                done = int(reviewed[members].sum())
                picks.append(
                    TypicalPick(
                        int(rows[depth]), float(scores[depth]), depth + 1, len(members), done
                    )
                )
                if len(picks) == n:
                    break
        depth += 1
    return picks


def _typical(
    engine: Engine, model_id: int, label: str | None, n: int, seed: int
) -> list[QueueItem]:
    rng = np.random.default_rng(seed)
    # With a label, its reviewed images only: the others would take clusters of their own.
    sampled = _samples(engine, model_id, label, rng, reviewed_of_label=True)
    if sampled is None:
        return []
    pool, candidates, centres = sampled
    candidates = np.concatenate([candidates, centres])
    reviewed = np.arange(candidates.shape[0]) >= len(pool.ids)
    picked = typiclust(candidates, reviewed, n, rng)
    found = _rows_by_id(engine, [pool.ids[p.row] for p in picked])
    items = []
    for p in picked:
        place = "the most typical" if p.rank == 1 else f"number {p.rank} by typicality"
        whose = "unreviewed images" if p.reviewed == 0 else f"images, {p.reviewed} reviewed"
        why = (
            f"{place} of a cluster of {p.size} {whose}"
            if p.size > 1
            else "a cluster of its own: no neighbour to measure its typicality by"
        )
        items.append(_item(found[pool.ids[p.row]], TYPICAL, p.typicality, why))
    return items


# -- reviews from a CSV file -------------------------------------------------------------

CSV_COLUMNS = ("path", "label", "note", "reviewer")


@dataclass(frozen=True)
class CsvLineError:
    """A line of a reviews CSV that was not recorded, and why."""

    line: int  # 1-based, as an editor numbers the file's lines
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class CsvImport:
    """What ``import_reviews_csv`` did: reviews recorded, lines refused (each with why),
    and lines left without a label (not reviewed yet: a queue's CSV half filled in)."""

    recorded: int
    errors: list[CsvLineError]
    unlabeled: int = 0


def parse_label(text: str) -> str | None:
    """A label as a person writes it: ``none`` (any case) is none of the classes."""
    text = text.strip()
    return None if text.lower() == NONE_WORD else text


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str] | dict[str, str]]]:
    """(line number, cells) of each non-empty row: a list of cells, or, in a file whose
    first row is a header naming ``path`` and ``label``, a dict of the CSV_COLUMNS there
    (other columns ignored: a queue's ``--format csv``)."""
    header: dict[str, int] | None = None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                names = [cell.strip().lower() for cell in cells]
                if reader.line_num == 1 and "path" in names and "label" in names:
                    header = {n: names.index(n) for n in CSV_COLUMNS if n in names}
                    continue
                cells = [spreadsheet.restore(cell) for cell in cells]
                if header is None:
                    yield reader.line_num, cells
                else:
                    yield (
                        reader.line_num,
                        {n: cells[i] if i < len(cells) else "" for n, i in header.items()},
                    )
    except OSError as exc:
        raise InputError(f"{path}: cannot read the reviews: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a CSV file of reviews: {exc}") from None


def import_reviews_csv(
    engine: Engine,
    path: str | Path,
    *,
    model_id: int,
    reviewer: str,
    strategy: str = CSV,
) -> CsvImport:
    """Record the reviews of a CSV file: columns path,label[,note,reviewer], one review a
    line; a header row naming them is optional, and with one the columns are read by name
    (others are ignored). ``path``: a stored image (its path, a file's path as a scan
    stores it, or #ID); ``label``: a class of the model, or ``none``; ``reviewer``: the
    line's, else ``reviewer``. Lines that name the same image record in order, the last
    one the image's review; a line whose label is empty is not reviewed yet, and skipped.

    Every line is checked first; the good ones are then recorded together, and each bad
    one is a ``CsvLineError`` naming its line and why (nothing is recorded for it)."""
    path = Path(path)
    model = store.model_row(engine, model_id)
    entries: list[dict[str, Any]] = []
    errors: list[CsvLineError] = []
    unlabeled = 0
    for line, cells in _csv_rows(path):
        if isinstance(cells, list):
            if len(cells) < 2 or len(cells) > len(CSV_COLUMNS):
                errors.append(
                    CsvLineError(
                        line,
                        f"{len(cells)} columns; expected {','.join(CSV_COLUMNS[:2])}"
                        f"[,{','.join(CSV_COLUMNS[2:])}]",
                    )
                )
                continue
            cells = dict(zip(CSV_COLUMNS, cells, strict=False))
        image = cells.get("path", "").strip()
        note, who = cells.get("note", "").strip(), cells.get("reviewer", "").strip()
        if not image:
            errors.append(CsvLineError(line, "no path"))
            continue
        label = parse_label(cells.get("label", ""))
        if label == "":
            unlabeled += 1
            continue
        row_id = stored_key(engine, model.id, image)
        if row_id is None:
            errors.append(CsvLineError(line, f"{image}: no such image of the model"))
            continue
        try:
            check_label(label, find_image(engine, row_id).class_names)
            check_reviewer(who or reviewer)
        except ModlabelError as exc:
            errors.append(CsvLineError(line, str(exc)))
            continue
        entries.append(
            {"image": row_id, "label": label, "note": note or None, "reviewer": who or reviewer}
        )
    recorded = store.record_reviews(engine, entries, strategy=strategy)
    return CsvImport(recorded, errors, unlabeled)
