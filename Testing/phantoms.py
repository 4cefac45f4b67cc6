"""Synthetic CT-like phantoms for the 3D tests and benchmarks (generated on the fly, never committed).

A phantom is a body-like volume in Hounsfield units (air outside an elliptic trunk, lungs, heart,
liver, spleen, kidneys), its organ label map, an optional lesion (a sphere inside one named organ)
and a report whose sentences describe it, e.g. "There is a large mass in the liver."

Array axes are (Z, Y, X); with the identity direction that is (inferior->superior,
anterior->posterior, right->left) in LPS, so the lungs sit at high Z and the liver on the
patient's right (low X).

>>> p = make_phantom(32, lesion_organ="liver", rng=np.random.default_rng(0))
>>> p.volume.shape, int(p.labels.max()), bool(p.lesion.any())
((32, 32, 32), 5, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ORGANS: dict[int, str] = {1: "lung", 2: "heart", 3: "liver", 4: "spleen", 5: "kidney"}
"""Label value -> organ name of the phantom label maps."""

ORGAN_HU: dict[str, float] = {"lung": -850.0, "heart": 40.0, "liver": 60.0, "spleen": 45.0, "kidney": 30.0}
BODY_HU = -20.0
AIR_HU = -1000.0
LESION_WORD = "mass"

# organ ellipsoids: centre (z, y, x) and radii in [-1, 1] coordinates (trunk: z along the body)
_ELLIPSOIDS: dict[str, list[tuple[tuple[float, float, float], tuple[float, float, float]]]] = {
    "lung": [((0.45, 0.0, -0.42), (0.42, 0.42, 0.30)), ((0.45, 0.0, 0.42), (0.42, 0.42, 0.30))],
    "heart": [((0.25, -0.22, 0.10), (0.24, 0.24, 0.24))],
    "liver": [((-0.22, -0.05, -0.38), (0.26, 0.40, 0.36))],
    "spleen": [((-0.20, 0.15, 0.50), (0.20, 0.22, 0.18))],
    "kidney": [((-0.60, 0.30, -0.35), (0.20, 0.15, 0.13)), ((-0.60, 0.30, 0.35), (0.20, 0.15, 0.13))],
}
_NORMAL_SENTENCES: dict[str, tuple[str, ...]] = {
    "lung": ("The lungs are clear.", "No pulmonary nodule."),
    "heart": ("The heart is normal in size.", "No pericardial effusion."),
    "liver": ("The liver is unremarkable.",),
    "spleen": ("The spleen is normal.",),
    "kidney": ("Both kidneys are normal.",),
}


@dataclass
class Phantom:
    """One generated CT-like case.

    volume: (Z, Y, X) float32 HU; labels: (Z, Y, X) uint8 organ labels (see :data:`ORGANS`);
    lesion: (Z, Y, X) bool; lesion_organ: the organ holding the lesion or None; report: the
    report text; findings: organ -> set of disease labels (empty for a normal organ).
    """

    volume: np.ndarray
    labels: np.ndarray
    lesion: np.ndarray
    lesion_organ: str | None
    report: str
    findings: dict[str, set[str]] = field(default_factory=dict)


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:
    z, y, x = coords
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (x - centre[2]) / radii[2]
    ) ** 2 <= 1


def make_phantom(
    size: int | tuple[int, int, int] = 32,
    lesion_organ: str | None = "liver",
    rng: np.random.Generator | None = None,
    lesion_radius: float | None = None,
    lesion_contrast: float = 250.0,
    noise_hu: float = 15.0,
    jitter: float = 0.06,
    normal_sentence_rate: float = 0.5,
) -> Phantom:
    """Generate one phantom.

    Args:
        size: volume shape (Z, Y, X) in voxels (an int for a cube).
        lesion_organ: organ name (see :data:`ORGANS`) that gets a spherical lesion, or None.
        rng: random generator (organ positions/sizes, lesion site, noise, sentence choice).
        lesion_radius: lesion radius in voxels (default: 9-13 % of the smallest side).
        lesion_contrast: lesion HU minus organ HU (in lung the lesion is soft tissue, +900 HU).
        noise_hu: standard deviation of the Gaussian noise, HU.
        jitter: random shift/scale of each organ, in [-1, 1] units.
        normal_sentence_rate: chance that a normal organ gets a sentence saying so (else it is unmentioned).
    """
    rng = rng if rng is not None else np.random.default_rng()
    shape = (size,) * 3 if isinstance(size, int) else tuple(size)
    if lesion_organ is not None and lesion_organ not in ORGAN_HU:
        raise ValueError(f"unknown organ {lesion_organ!r}; choose from {sorted(ORGAN_HU)}")
    coords = _grid(shape)
    volume = np.full(shape, AIR_HU, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body = _ellipsoid(coords, (0.0, 0.0, 0.0), (1.05, 0.70, 0.92))
    volume[body] = BODY_HU
    for value, organ in ORGANS.items():
        for centre, radii in _ELLIPSOIDS[organ]:
            c = tuple(v + rng.uniform(-jitter, jitter) for v in centre)
            r = tuple(v * (1 + rng.uniform(-jitter, jitter) * 2) for v in radii)
            region = _ellipsoid(coords, c, r) & body & (labels == 0)
            labels[region] = value
            volume[region] = ORGAN_HU[organ]
    lesion = np.zeros(shape, dtype=bool)
    findings: dict[str, set[str]] = {organ: set() for organ in ORGAN_HU}
    sentences: list[str] = []
    if lesion_organ is not None:
        value = next(v for v, o in ORGANS.items() if o == lesion_organ)
        organ_mask = labels == value
        radius = lesion_radius if lesion_radius is not None else min(shape) * rng.uniform(0.09, 0.13)
        centre = _lesion_centre(organ_mask, radius, rng)
        zz, yy, xx = np.indices(shape, dtype=np.float32)
        sphere = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= radius**2
        lesion = sphere & organ_mask
        contrast = 900.0 if lesion_organ == "lung" else lesion_contrast
        volume[lesion] = ORGAN_HU[lesion_organ] + contrast
        findings[lesion_organ].add(LESION_WORD)
        size_word = "large" if radius >= 0.11 * min(shape) else "small"
        sentences.append(f"There is a {size_word} {LESION_WORD} in the {lesion_organ}.")
    for organ in ORGAN_HU:
        if organ != lesion_organ and rng.random() < normal_sentence_rate:
            choices = _NORMAL_SENTENCES[organ]
            sentences.append(choices[int(rng.integers(len(choices)))])
    if not sentences:
        sentences.append("No acute abnormality.")
    order = rng.permutation(len(sentences))
    report = " ".join(sentences[i] for i in order)
    volume += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    return Phantom(volume, labels, lesion, lesion_organ, report, findings)


def _lesion_centre(organ_mask: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A voxel of the organ at least ~radius from its border (the deepest ones if none is)."""
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(organ_mask)
    candidates = np.argwhere(depth >= min(radius, depth.max()))
    return candidates[int(rng.integers(len(candidates)))].astype(np.float32)


def make_dataset(
    n: int,
    size: int = 32,
    seed: int = 0,
    organs: tuple[str | None, ...] = ("liver", "lung", "kidney", None),
    **options: float,
) -> list[Phantom]:
    """``n`` phantoms whose lesion organ cycles through ``organs`` (None: a normal case); options: make_phantom's."""
    rng = np.random.default_rng(seed)
    return [make_phantom(size, organs[i % len(organs)], rng, **options) for i in range(n)]


def rotated_direction(angle_deg: float = 30.0) -> tuple[float, ...]:
    """A row-major 3x3 direction (LPS) rotated about z by ``angle_deg`` and with a flipped y axis."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    flip = np.diag([1.0, -1.0, 1.0])
    return tuple(float(v) for v in (rot @ flip).ravel())
