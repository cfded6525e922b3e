"""Commercial-style services as the tracker (DESIGN §6): the foundation protocol, run through their APIs.

The tracker indexes its enrollment photos in a Rekognition-like collection (or adds them to an Azure-like
person group and trains it), then searches (identifies) each clean query photo. One search answers both
protocols: the top match's identity is the poisoning outcome, and the position of the first face of the
true identity among the returned matches is the evasion rank (rank-1/5/50, LowKey's protocol; a true
identity missing from the ``max_faces`` matches has rank ``max_faces + 1``). For each protected identity
in turn its clean faces are replaced by its cloaked ones and put back afterwards, so the gallery never
holds both.

Identity names travel as opaque aliases (``id0000``, ...): real services restrict external ids to a small
alphabet, and names are data. Calls go through :class:`~cloakbench.attacks.services.CollectionAPI` /
``PersonGroupAPI`` only, so the in-process service and the HTTP client are interchangeable.

Over HTTP the server is started here and its client built here, in this process, with the server's random
secret: nothing else can change the gallery or the counts. Requests the server refused (no secret or a bad
signature, a foreign Host, a wrong content type: another local process or a web page found the port) changed
nothing, but a run must say that someone tried: their count is stored with the query counts (operation
``refused_requests``), noted on the task's cells and logged as a warning.

``transport: aws`` goes through boto3 (:class:`~cloakbench.attacks.services.aws.AwsCollection`): to the real
Amazon Rekognition (credentials from the AWS chain; its own model, so ``backend`` plays no part and every
cell is oblivious), or with ``endpoint: local`` to cloakbench's wire-compatible server backed by ``backend``,
with that server's per-run secret as credentials, which runs the very code path the real service gets. The
collection is named ``<collection_prefix><12 random hex digits>`` and deleted when the task ends, however it
ends; one that could not be deleted is logged and noted on the cells (it holds the tracker's photos). An image
in which Amazon Rekognition finds no face is not enrolled (or, as a probe, identifies no one), and counted
(``NoFaceIndexed``, ``NoFaceInProbe``).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.attacks.services import (
    CollectionAPI,
    CollectionClient,
    FaceCollection,
    PersonGroupAPI,
    PersonGroupClient,
    PersonGroupService,
    RateLimit,
    ServiceServer,
)
from cloakbench.attacks.services.aws import AwsCollection, AwsCredentials
from cloakbench.attacks.services.base import IDENTIFY_MAX_IMAGES, NoFaceError
from cloakbench.attacks.services.http import DEFAULT_REGION
from cloakbench.attacks.transforms import TRANSFORMS
from cloakbench.bench.metrics import topk_correct
from cloakbench.bench.store import REFUSED_REQUESTS
from cloakbench.bench.suite import (
    DEFAULT_COLLECTION_PREFIX,
    ApplyTo,
    CountermeasureSpec,
    Protocol,
    ServiceKind,
    ServiceSpec,
    Suite,
    Transport,
)
from cloakbench.images import from_uint8

if TYPE_CHECKING:
    from cloakbench.bench.runner import PreparedData, _Cloaks

COLLECTION = "cloakbench"
SERVICE_TRACKERS = {Protocol.POISONING: "service", Protocol.EVASION: "service-search"}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenService:
    """A service opened for one task: the API the tracker calls (HTTP client, boto3 adapter or the service
    itself), where its query counts come from, its HTTP server (``None`` in-process and on AWS), the collection
    (or person group) id to use, and the collections that could not be deleted when it closed."""

    api: Any
    counts: Callable[[], dict[str, int]]
    server: ServiceServer | None = None
    collection_id: str = COLLECTION
    leftovers: list[str] = field(default_factory=list)

    def refusals(self) -> dict[str, int]:
        """Requests the server refused so far, by reason (empty in-process: there is no server)."""
        return {} if self.server is None else self.server.refusals

    def refused_requests(self) -> int:
        return sum(self.refusals().values())


@contextlib.contextmanager
def open_service(spec: ServiceSpec, backend: Recognizer) -> Iterator[OpenService]:
    """The service of ``spec``; over HTTP (and ``transport: aws`` with ``endpoint: local``), served on
    127.0.0.1 with a fresh secret while the block runs; on AWS, its collections deleted when the block ends."""
    limit = RateLimit(per_s=spec.rate_limit_per_s, burst=1, on_exceed="block") if spec.rate_limit_per_s else None
    if spec.real_aws:
        aws = AwsCollection(region=spec.region, rate_limit=limit)
        opened = OpenService(aws, aws.query_counts, collection_id=_collection_id(spec))
        try:
            yield opened
        finally:
            opened.leftovers.extend(aws.close())
        return
    service: FaceCollection | PersonGroupService = (
        FaceCollection(backend, rate_limit=limit)
        if spec.kind is ServiceKind.REKOGNITION
        else PersonGroupService(backend, rate_limit=limit)
    )
    if spec.transport is Transport.IN_PROCESS:
        yield OpenService(service, service.query_counts)
        return
    server = ServiceServer(service, region=spec.region or DEFAULT_REGION)
    server.start()
    try:
        endpoint = server.endpoint  # the secret goes from server to client here, in this process only
        if spec.transport is Transport.AWS:  # endpoint local: boto3 against our server, its secret as the keys
            local = AwsCollection(
                region=endpoint.region,
                endpoint_url=endpoint.url,
                credentials=AwsCredentials(endpoint.access_key_id, endpoint.secret),
            )
            opened = OpenService(local, local.query_counts, server, _collection_id(spec))
            try:
                yield opened
            finally:
                opened.leftovers.extend(local.close())
            return
        client = CollectionClient(endpoint) if spec.kind is ServiceKind.REKOGNITION else PersonGroupClient(endpoint)
        yield OpenService(client, service.query_counts, server)
    finally:
        server.stop()


def _collection_id(spec: ServiceSpec) -> str:
    """A fresh collection id for an AWS task (random: not a result, and two runs must not share one)."""
    return f"{spec.collection_prefix or DEFAULT_COLLECTION_PREFIX}{uuid.uuid4().hex[:12]}"


def refusal_note(refusals: dict[str, int]) -> str:
    """One line for the cells of a task whose server refused requests (empty when it refused none)."""
    total = sum(refusals.values())
    if not total:
        return ""
    words = {"secret": "without the run's secret", "host": "with a foreign Host", "content-type": "not JSON"}
    reasons = ", ".join(f"{n} {words.get(reason, reason)}" for reason, n in sorted(refusals.items()))
    return (
        f"the service's HTTP server refused {total} request(s) from outside the run ({reasons}): another local "
        "process or a web page found its port; they changed nothing"
    )


class _Gallery:
    """The tracker's enrolled faces in a service, by identity, with swap-in/swap-out of one identity."""

    def __init__(self, spec: ServiceSpec, api: Any, aliases: dict[str, str], collection: str) -> None:
        self.spec = spec
        self.api = api
        self.aliases = aliases
        self.collection = collection
        self.names = {a: ident for ident, a in aliases.items()}
        self.faces: dict[str, list[str]] = {}  # rekognition face ids, or [person id] for azure
        self.no_face: Counter[str] = Counter()  # images a real service found no face in (NoFaceIndexed, ...)
        if spec.kind is ServiceKind.REKOGNITION:
            api.create_collection(collection)
        else:
            api.create_person_group(collection)

    def enrol(self, ident: str, images: torch.Tensor) -> None:
        if self.spec.kind is ServiceKind.REKOGNITION:
            api: CollectionAPI = self.api
            ids = []
            for i in range(images.shape[0]):
                try:
                    ids.append(api.index_faces(self.collection, images[i : i + 1], self.aliases[ident]))
                except NoFaceError:  # only a real service raises it: the photo is simply not in the gallery
                    self.no_face["NoFaceIndexed"] += 1
            self.faces[ident] = ids
            return
        group: PersonGroupAPI = self.api
        person = group.create_person(self.collection, self.aliases[ident])
        for i in range(images.shape[0]):
            group.add_face(self.collection, person, images[i : i + 1])
        self.faces[ident] = [person]

    def remove(self, ident: str) -> None:
        if self.spec.kind is ServiceKind.REKOGNITION:
            ids = self.faces.pop(ident)
            if ids:
                self.api.delete_faces(self.collection, ids)
        else:
            self.api.delete_person(self.collection, self.faces.pop(ident)[0])

    def ready(self) -> None:
        if self.spec.kind is ServiceKind.AZURE:
            self.api.train(self.collection)

    def _matches(self, image: torch.Tensor) -> list[Any]:
        try:
            matches: list[Any] = self.api.search_faces_by_image(
                self.collection, image, max_faces=self.spec.max_faces, face_match_threshold=self.spec.match_threshold
            )
        except NoFaceError:  # only a real service raises it: the tracker identifies no one
            self.no_face["NoFaceInProbe"] += 1
            return []
        return matches

    def search(self, images: torch.Tensor, truth: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """Per probe: identity-level rank, face-level (evasion) rank, predicted identity, true similarity."""
        n = images.shape[0]
        id_ranks = np.empty(n, dtype=np.int64)
        face_ranks = np.empty(n, dtype=np.int64)
        preds: list[str] = []
        sims = np.full(n, np.nan)
        miss = self.spec.max_faces + 1
        if self.spec.kind is ServiceKind.REKOGNITION:
            for i in range(n):
                matches = self._matches(images[i : i + 1])
                order = [self.names[m.external_image_id] for m in matches]
                distinct = list(dict.fromkeys(order))
                preds.append(order[0] if order else "")
                true_ident = truth[i]
                id_ranks[i] = distinct.index(true_ident) + 1 if true_ident in distinct else len(distinct) + 1
                face_ranks[i] = order.index(true_ident) + 1 if true_ident in order else miss
                hits = [m.similarity for m in matches if self.names[m.external_image_id] == true_ident]
                sims[i] = max(hits) / 100.0 if hits else np.nan
            return id_ranks, face_ranks, preds, sims
        persons = {pid[0]: ident for ident, pid in self.faces.items()}
        for start in range(0, n, IDENTIFY_MAX_IMAGES):
            batch = [images[i : i + 1] for i in range(start, min(n, start + IDENTIFY_MAX_IMAGES))]
            answers = self.api.identify(
                self.collection,
                batch,
                max_candidates=self.spec.max_faces,
                confidence_threshold=self.spec.match_threshold / 100,
            )
            for j, candidates in enumerate(answers):
                i = start + j
                order = [persons[c.person_id] for c in candidates]
                preds.append(order[0] if order else "")
                id_ranks[i] = order.index(truth[i]) + 1 if truth[i] in order else len(order) + 1
                face_ranks[i] = id_ranks[i]
                hits = [c.confidence for c in candidates if persons[c.person_id] == truth[i]]
                sims[i] = max(hits) if hits else np.nan
        return id_ranks, face_ranks, preds, sims


def evaluate_service(
    suite: Suite, data: PreparedData, seed: int, spec: ServiceSpec, backend: Recognizer, cm: CountermeasureSpec,
    cloaks: dict[str, _Cloaks],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:  # fmt: skip
    """Summary rows, per-query rows and the service's query counts for one (service, countermeasure)."""
    from cloakbench.bench.runner import _cell_rows, _Outcome, derive_seed

    transform = TRANSFORMS.create(cm.name, **dict(cm.params))
    t_seed = derive_seed(seed, cm.label)
    on_enroll = cm.apply_to in (ApplyTo.ENROLLMENT, ApplyTo.BOTH)
    on_query = cm.apply_to in (ApplyTo.QUERIES, ApplyTo.BOTH)

    def prepare(images: torch.Tensor, apply: bool) -> torch.Tensor:
        return transform.apply(images, generator=torch.Generator().manual_seed(t_seed)) if apply else images

    identities = sorted(data.train)
    aliases = {ident: f"id{i:04d}" for i, ident in enumerate(identities)}
    enrol_images = {ident: prepare(data.images[data.train[ident]], on_enroll) for ident in identities}
    query_images = {
        ident: prepare(data.images[data.query[ident]], on_query) for ident in identities if len(data.query[ident])
    }

    summary: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    with open_service(spec, backend) as opened:
        gallery = _Gallery(spec, opened.api, aliases, opened.collection_id)
        for ident in identities:
            gallery.enrol(ident, enrol_images[ident])
        gallery.ready()
        clean: dict[str, tuple[np.ndarray, np.ndarray, list[str], np.ndarray]] = {
            ident: gallery.search(query_images[ident], [ident] * query_images[ident].shape[0]) for ident in query_images
        }
        clean_all_id = float(topk_correct(np.concatenate([c[0] for c in clean.values()]), 1).mean())
        clean_all_face = float(topk_correct(np.concatenate([c[1] for c in clean.values()]), 1).mean())
        protocols = list(suite.service_protocols(spec))
        for d in suite.defenses:
            cl = cloaks[d.label]
            cells = {
                p: {"seed": seed, "protocol": p.value, "defense": d.label, "recognizer": spec.label,
                    "countermeasure": cm.label, "classifier": SERVICE_TRACKERS[p],
                    "oblivious": cl.surrogate_weights is not None
                    and (spec.real_aws or backend.weights_id not in cl.surrogate_weights)}
                for p in protocols
            }  # fmt: skip
            if cl.error is not None:
                summary += [{**c, "status": "failed", "note": cl.error} for c in cells.values()]
                continue
            outcomes: dict[Protocol, list[Any]] = {p: [] for p in protocols}
            for ident in data.protected:
                gallery.remove(ident)
                n_cloaked = d.cloaked_count(len(data.train[ident]))  # the rest stay clean (cloak_fraction)
                enrolled = torch.cat(
                    [from_uint8(cl.images[ident][:n_cloaked]), data.images[data.train[ident][n_cloaked:]]]
                )
                gallery.enrol(ident, prepare(enrolled, on_enroll))
                gallery.ready()
                id_r, face_r, preds, sims = gallery.search(query_images[ident], [ident] * query_images[ident].shape[0])
                c_id, c_face, _, c_sims = clean[ident]
                gallery.remove(ident)
                gallery.enrol(ident, enrol_images[ident])
                gallery.ready()
                for p in protocols:
                    poisoning = p is Protocol.POISONING
                    outcomes[p].append(
                        _Outcome(
                            ident=ident, query_idx=data.query[ident], ranks=id_r if poisoning else face_r,
                            preds=preds, ranks_clean=c_id if poisoning else c_face, sims=sims, sims_clean=c_sims,
                        )
                    )  # fmt: skip
            for p in protocols:
                clean_all = clean_all_id if p is Protocol.POISONING else clean_all_face
                row, q_rows = _cell_rows(suite, data, cells[p], outcomes[p], clean_all, cl.seconds_per_image)
                summary.append(row)
                rows.extend(q_rows)
    counts = dict(opened.counts())  # read once the service closed: the AWS adapter's collection deletion counts too
    counts.update(gallery.no_face)
    if opened.leftovers:  # the photos are still in the account: say so on every cell, loudly
        where = f"region {opened.api.region}" if spec.real_aws else "the local server"
        note = (
            f"Amazon Rekognition collection(s) {', '.join(opened.leftovers)} in {where} could not be deleted and "
            "still hold the tracker's photos: delete them with aws rekognition delete-collection"
        )
        log.error("service %s, countermeasure %s, seed %d: %s", spec.label, cm.label, seed, note)
        summary = [{**r, "note": f"{r['note']}\n{note}" if r.get("note") else note} for r in summary]
    if opened.server is not None:  # read once the server has stopped: every refusal it answered is counted
        refusals = opened.refusals()
        counts[REFUSED_REQUESTS] = sum(refusals.values())
        note = refusal_note(refusals)
        if note:
            log.warning("service %s, countermeasure %s, seed %d: %s", spec.label, cm.label, seed, note)
            summary = [{**r, "note": f"{r['note']}\n{note}" if r.get("note") else note} for r in summary]
    return summary, rows, counts
