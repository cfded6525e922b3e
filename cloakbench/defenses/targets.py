"""Public identities a targeted cloak imitates, and Fawkes' choice of target among them.

Fawkes (paper version) moves the user's photos towards a *public* identity T far from the user in the
surrogates' feature space. The 0.3 release (``fawkes/utils.py:select_target_label``) does it this way:
each public identity has one precomputed embedding; for each one it takes the *smallest* L2 distance to
any of the user's photos (the features of several extractors concatenated), ranks the identities by that
distance, farthest first, and draws one at random among the 20 farthest; then 10 photos of T are drawn at
random, one per user photo (the list repeated while shorter than the user's). :func:`choose_target` and
:func:`target_photos` do the same with cloakbench's surrogates, each identity's embedding being its
normalised feature centroid under each surrogate (the original's precomputed embeddings are not
documented).

The original pool is the authors' own set of public identities (embeddings and 10 photos each, served from
their mirror, not in the repository). Here a pool is any aligned ``root/<identity>/<image>`` folder;
``"dataset"`` is the benchmark's own non-protected identities (supplied by the bench: 23 on celeb24 with
one user protected), ``"demo"`` the celeb5 demo set (5 public figures, none of them in celeb24), and
``"auto"`` (the default) the larger one available: the dataset's when the bench supplies it, otherwise
the demo set. The protected identities are always left out of the pool, by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.config import stable_hash
from cloakbench.errors import ConfigError

MAX_IMAGES_PER_TARGET = 32
"""Target photos kept per public identity (the first ones by image id): enough to cycle over a batch."""


@dataclass(frozen=True, kw_only=True)
class PublicFaces:
    """Aligned canonical photos of public identities, and a digest of their content for cache keys."""

    source: str
    images: Mapping[str, torch.Tensor]  # identity -> float32 [n, 3, H, W]
    digest: str

    def without(self, identities: Sequence[str]) -> PublicFaces:
        drop = set(identities)
        kept = {k: v for k, v in self.images.items() if k not in drop}
        return PublicFaces(source=self.source, images=kept, digest=stable_hash((self.digest, sorted(drop))))


def public_faces_from_folder(root: Path | str, *, source: str | None = None) -> PublicFaces:
    """Read an aligned folder dataset as a target pool (files that cannot be read are left out, as in scans)."""
    from cloakbench.datasets import load_images, scan_folder

    manifest = scan_folder(root)
    by_ident: dict[str, list[object]] = {}
    for rec in sorted(manifest.records, key=lambda r: r.image_id):
        by_ident.setdefault(rec.identity, []).append(rec)
    images = {}
    shas = []
    for ident, recs in sorted(by_ident.items()):
        chosen = recs[:MAX_IMAGES_PER_TARGET]
        images[ident] = load_images(chosen)  # type: ignore[arg-type]
        shas.append((ident, [r.sha256 for r in chosen]))  # type: ignore[attr-defined]
    return PublicFaces(source=source or str(root), images=images, digest=stable_hash(shas))


TARGET_POOLS = ("auto", "dataset", "demo")
"""The named pools; anything else is a folder path."""


def load_target_pool(spec: str, *, dataset_pool: PublicFaces | None) -> PublicFaces:
    """``"auto"`` (the bench's pool when there is one, else the demo set), ``"demo"``, ``"dataset"`` (needs
    the bench's pool) or a folder path."""
    if spec == "auto":
        spec = "dataset" if dataset_pool is not None else "demo"
    if spec == "demo":
        from cloakbench.datasets import demo_dataset

        root, _ = demo_dataset()
        return public_faces_from_folder(root, source="demo")
    if spec == "dataset":
        if dataset_pool is None:
            raise ConfigError(
                "target_pool 'dataset' means the benchmark dataset's other identities, and there is none here; "
                "use 'auto', 'demo' or the path of an aligned root/<identity>/<image> folder"
            )
        return dataset_pool
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"target_pool {spec!r} is not 'auto', 'demo', 'dataset' or an existing folder")
    return public_faces_from_folder(path)


@dataclass(frozen=True, kw_only=True)
class TargetChoice:
    identity: str
    candidates: tuple[str, ...]  # the farthest identities it was drawn from, farthest first


def pool_centroids(pool: PublicFaces, surrogates: Sequence[Recognizer]) -> dict[str, list[torch.Tensor]]:
    """Each public identity's normalised feature centroid under each surrogate (compute once per pool)."""
    with torch.no_grad():
        return {
            name: [torch.nn.functional.normalize(s.embed_batched(images).mean(dim=0), dim=0) for s in surrogates]
            for name, images in pool.images.items()
        }


SAME_PERSON_COSINE = 0.5
"""The cosine between the centroid of a person's faces and a pool identity's centroid from which that identity is
taken to be the person (:func:`lookalikes`). Measured on the demo set (5 identities, 19-27 photos each): a photo
against its own identity's centroid 0.21-0.88 (SFace) and 0.40-0.94 (FaceNet-CASIA), against another identity's
at most 0.38 and 0.44; centroids of several photos sit further apart than single photos."""


def lookalikes(
    pool: PublicFaces, faces: torch.Tensor, surrogates: Sequence[Recognizer], *,
    threshold: float = SAME_PERSON_COSINE, centroids: Mapping[str, list[torch.Tensor]] | None = None,
) -> list[str]:  # fmt: skip
    """Pool identities that are the person in ``faces``: the centroid of the faces' embeddings is within
    ``threshold`` cosine of the identity's centroid on some surrogate. A target pool that holds the user (a
    user of ``protect`` who is one of the demo set's people) would let a targeted cloak pull the user's photos
    towards the user's own other photos: no protection."""
    if not pool.images or faces.shape[0] == 0:
        return []
    centroids = centroids if centroids is not None else pool_centroids(pool, surrogates)
    with torch.no_grad():
        users = [torch.nn.functional.normalize(s.embed_batched(faces).mean(dim=0), dim=0) for s in surrogates]
    return [
        name
        for name in sorted(pool.images)
        if any(float(u @ c.to(u)) >= threshold for u, c in zip(users, centroids[name], strict=True))
    ]


def choose_target(
    pool: PublicFaces, user_images: torch.Tensor, surrogates: Sequence[Recognizer], *, farthest: int,
    generator: torch.Generator, centroids: Mapping[str, list[torch.Tensor]] | None = None,
) -> TargetChoice:  # fmt: skip
    """Fawkes 0.3's choice: rank public identities by the smallest L2 distance from their embedding to any
    of the user's photos (each surrogate's unit-norm features concatenated), farthest first, and draw one
    among the ``farthest``. ``centroids`` (from :func:`pool_centroids`, possibly of a larger pool) saves
    re-embedding the pool on every call."""
    if not pool.images:
        raise ConfigError(f"target pool {pool.source!r} has no identity left once the protected ones are removed")
    names = sorted(pool.images)
    if centroids is None or any(n not in centroids for n in names):
        centroids = pool_centroids(pool, surrogates)
    with torch.no_grad():
        user = torch.cat([s.embed_batched(user_images) for s in surrogates], dim=1)  # [n, sum of dims]
        public = torch.stack([torch.cat(list(centroids[name])) for name in names]).to(user)
        distance = torch.cdist(user.double(), public.double()).amin(dim=0)  # [identities]
    order = sorted(range(len(names)), key=lambda i: (-float(distance[i]), names[i]))
    candidates = tuple(names[i] for i in order[: max(1, farthest)])
    pick = int(torch.randint(len(candidates), (1,), generator=generator))
    return TargetChoice(identity=candidates[pick], candidates=candidates)


def target_photos(photos: torch.Tensor, count: int, *, generator: torch.Generator) -> torch.Tensor:
    """``count`` of the target's photos drawn at random without repetition, the list doubled while it is
    shorter than ``count`` (Fawkes 0.3: ``random.sample`` of the repeated list, one per user photo)."""
    n = photos.shape[0]
    if n == 0:
        raise ConfigError("the target identity has no photos")
    copies = 1
    while n * copies < count:
        copies *= 2
    pick = torch.randperm(n * copies, generator=generator)[:count]
    return photos[pick % n]
