"""A seeded synthetic abdominal CT phantom with known organ and tumour labels.

The phantom is built analytically in LPS world coordinates (mm) and sampled on the voxel grid,
so its shape, spacing and partial-volume behaviour follow the requested geometry:

* axes: array ``(z, y, x)``; identity direction, so array ``x`` (columns) runs toward the
  patient's **left** (+x in LPS), ``y`` (rows) toward **posterior**, ``z`` (slices) toward
  **superior**. Displayed with column 0 on the left of the screen (radiological convention),
  the patient's right - where the liver is - appears on the screen's left.
* anatomy: air (-1000), body ellipse with subcutaneous fat (~-100) and an abdominal muscle
  wall (~50), abdominal soft tissue with visceral fat, lumbar spine (bone ~700 with a denser
  cortex, discs between vertebrae), paraspinal muscles, aorta and inferior vena cava, liver
  (~60 HU, patient's right), spleen (~50, patient's left), two kidneys (cortex ~180, medulla
  ~120), hypodense liver tumours (10-30 HU, 8-30 mm, at least one >= 15 mm), a gallbladder
  (~10 HU, below the liver, not labelled: a tumour look-alike) and lung bases (-850) in the
  top slices.
* shapes: ellipsoids deformed by a smooth random field, randomised per seed.
* partial volume: every slice is the mean of three sub-slices across its thickness, then a
  light in-plane blur; finally Gaussian noise (sigma 12 HU). Labels come from the slice centre.

Labels: :data:`PHANTOM_LABELS` (tumour voxels are 2, not 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.volume import LabelMap, Volume

#: Label table of the phantom's label maps.
PHANTOM_LABELS: dict[int, str] = {1: "liver", 2: "tumour", 3: "kidney", 4: "spleen"}

#: Nominal tissue intensities in HU (before partial volume and noise).
TISSUE_HU: dict[str, float] = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "visceral_fat": -90.0,
    "muscle": 50.0,
    "soft": 35.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney_cortex": 180.0,
    "kidney_medulla": 120.0,
    "bone": 700.0,
    "bone_cortex": 1000.0,
    "disc": 80.0,
    "gallbladder": 10.0,
    "aorta": 160.0,
    "ivc": 130.0,
}

NOISE_SIGMA_HU = 12.0
_SUBSLICES = (-1.0 / 3.0, 0.0, 1.0 / 3.0)


# --------------------------------------------------------------------------- smooth noise
@dataclass
class _Field:
    """A smooth random field: a sum of separable sinusoid products (std ~0.7, |value| <= 2)."""

    freqs: np.ndarray  # (n, 3) angular frequencies rad/mm for x, y, z
    phases: np.ndarray  # (n, 3)
    weights: np.ndarray  # (n,)

    @classmethod
    def random(cls, rng: np.random.Generator, wavelength_mm: tuple[float, float], n: int = 4):
        lam = rng.uniform(*wavelength_mm, size=(n, 3))
        freqs = 2 * np.pi / lam
        phases = rng.uniform(0, 2 * np.pi, size=(n, 3))
        w = rng.uniform(0.5, 1.0, size=n)
        return cls(freqs, phases, w / w.sum())

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Evaluate on broadcastable coordinate arrays (mm)."""
        out = None
        for (fx, fy, fz), (px, py, pz), w in zip(
            self.freqs, self.phases, self.weights, strict=True
        ):
            term = (w * np.sin(fz * z + pz)) * np.sin(fy * y + py) * np.sin(fx * x + px)
            out = term if out is None else out + term
        # a product of three sines has std ~0.35; x2 makes the field's std ~0.7 (|field| <= 2)
        return out * 2.0


@dataclass
class _Ellipsoid:
    """A deformed, z-rotated ellipsoid in LPS mm."""

    center: tuple[float, float, float]  # x, y, z mm
    semi: tuple[float, float, float]  # x, y, z mm (before rotation)
    angle: float = 0.0  # rotation about z, radians
    amp: float = 0.0  # relative radius deformation
    field: _Field | None = None

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        grow = 1 + 2 * abs(self.amp) if self.field is not None else 1.0  # |field| <= 2
        r = max(self.semi[0], self.semi[1]) * grow + 1.0
        rz = self.semi[2] * grow + 1.0
        c = np.asarray(self.center)
        half = np.array([r, r, rz])
        return c - half, c + half

    def q(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Normalised radius squared divided by the deformed boundary squared (<1 inside)."""
        dx = x - self.center[0]
        dy = y - self.center[1]
        dz = z - self.center[2]
        if self.angle:
            c, s = float(np.cos(self.angle)), float(np.sin(self.angle))
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        q = (dz / self.semi[2]) ** 2 + (dy / self.semi[1]) ** 2 + (dx / self.semi[0]) ** 2
        if self.field is not None and self.amp:
            q = q / (1 + self.amp * self.field(x, y, z)) ** 2
        return q


class _Grid:
    """World coordinates of one rendering pass (sub-slice offset ``dz`` in slices)."""

    def __init__(self, shape: tuple[int, int, int], spacing, origin, dz: float) -> None:
        nz, ny, nx = shape
        self.shape = shape
        self.x = (origin[0] + np.arange(nx) * spacing[2]).astype(np.float64)
        self.y = (origin[1] + np.arange(ny) * spacing[1]).astype(np.float64)
        self.z = (origin[2] + (np.arange(nz) + dz) * spacing[0]).astype(np.float64)

    def window(self, lo: np.ndarray, hi: np.ndarray):
        """Index slices (z, y, x) covering the world box [lo, hi] and broadcastable coords."""
        sl = []
        axes = ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0]))
        for coords, a, b in axes:
            i0 = int(np.searchsorted(coords, a, side="left"))
            i1 = int(np.searchsorted(coords, b, side="right"))
            sl.append(slice(i0, i1))
        if any(s.stop <= s.start for s in sl):
            return None
        z = self.z[sl[0]][:, None, None]
        y = self.y[sl[1]][None, :, None]
        x = self.x[sl[2]][None, None, :]
        return tuple(sl), x, y, z


# --------------------------------------------------------------------------- anatomy
@dataclass
class _Anatomy:
    body: dict[str, Any]
    organs: dict[str, _Ellipsoid]
    tumours: list[tuple[_Ellipsoid, float]]
    liver_texture: _Field
    visceral: _Field
    vertebra_period: float
    vertebra_phase: float


def _random_anatomy(rng: np.random.Generator, spacing, shape, origin) -> _Anatomy:
    nz, ny, nx = shape
    fov_x, fov_y = nx * spacing[2], ny * spacing[1]
    z0 = origin[2]
    zlen = nz * spacing[0]
    cx = origin[0] + (nx - 1) * spacing[2] / 2
    cy = origin[1] + (ny - 1) * spacing[1] / 2

    def t(frac: float) -> float:  # fraction of the z extent -> world z
        return z0 + frac * zlen

    ax = fov_x * 0.5 * rng.uniform(0.82, 0.9)
    ay = fov_y * 0.5 * rng.uniform(0.62, 0.7)
    body = {
        "center": (cx, cy + rng.uniform(-0.02, 0.02) * fov_y),
        "semi": (ax, ay),
        "fat": rng.uniform(0.06, 0.11) * ax,
        "muscle": rng.uniform(0.05, 0.07) * ax,
        "field": _Field.random(rng, (120.0, 300.0)),
        "amp": 0.03,
    }
    bx, by = body["center"]

    def e(u, v, tz, su, sv, stz, angle=0.0, amp=0.12, wl=(40.0, 110.0)) -> _Ellipsoid:
        j = rng.uniform(-0.04, 0.04, size=3)
        k = rng.uniform(0.9, 1.1, size=3)
        return _Ellipsoid(
            center=(bx + (u + j[0]) * ax, by + (v + j[1]) * ay, t(tz + j[2])),
            semi=(su * ax * k[0], sv * ay * k[1], stz * zlen * k[2]),
            angle=angle + rng.uniform(-0.15, 0.15),
            amp=amp,
            field=_Field.random(rng, wl),
        )

    organs: dict[str, _Ellipsoid] = {
        # liver: large right lobe plus a smaller anterior left lobe reaching across the midline
        "liver_right": e(-0.38, -0.05, 0.62, 0.46, 0.6, 0.36, angle=0.2),
        "liver_left": e(0.02, -0.38, 0.76, 0.32, 0.24, 0.2, angle=-0.35),
        "spleen": e(0.52, 0.22, 0.68, 0.2, 0.3, 0.2, angle=-0.5),
        "kidney_right": e(-0.42, 0.45, 0.3, 0.15, 0.22, 0.19, angle=0.45, amp=0.06),
        "kidney_left": e(0.42, 0.45, 0.36, 0.15, 0.22, 0.19, angle=-0.45, amp=0.06),
        # bile-filled, hypodense like a tumour but outside the liver label: a distractor
        "gallbladder": e(-0.2, -0.3, 0.38, 0.1, 0.12, 0.12, angle=0.5, amp=0.08),
        "lung_right": e(-0.45, 0.3, 1.22, 0.42, 0.5, 0.3, amp=0.08),
        "lung_left": e(0.45, 0.3, 1.22, 0.42, 0.5, 0.3, amp=0.08),
    }
    # vessels and spine: cylinders (ellipsoids much longer than the volume)
    long = 10.0
    organs["aorta"] = _Ellipsoid(
        (bx + 0.08 * ax, by + 0.42 * ay, t(0.5)), (0.09 * ax, 0.1 * ay, long * zlen)
    )
    organs["ivc"] = _Ellipsoid(
        (bx - 0.14 * ax, by + 0.38 * ay, t(0.5)), (0.1 * ax, 0.08 * ay, long * zlen)
    )
    organs["vertebra"] = _Ellipsoid(
        (bx, by + 0.68 * ay, t(0.5)), (0.17 * ax, 0.2 * ay, long * zlen)
    )
    organs["spinous"] = _Ellipsoid(
        (bx, by + 0.92 * ay, t(0.5)), (0.05 * ax, 0.12 * ay, long * zlen)
    )
    for side, sgn in (("r", -1), ("l", 1)):
        organs[f"paraspinal_{side}"] = _Ellipsoid(
            (bx + sgn * 0.24 * ax, by + 0.8 * ay, t(0.5)), (0.14 * ax, 0.16 * ay, long * zlen)
        )
    return _Anatomy(
        body=body,
        organs=organs,
        tumours=[],
        liver_texture=_Field.random(rng, (15.0, 40.0)),
        visceral=_Field.random(rng, (25.0, 60.0)),
        vertebra_period=rng.uniform(26.0, 32.0),
        vertebra_phase=rng.uniform(0, 1),
    )


def _paint(
    hu: np.ndarray,
    lab: np.ndarray | None,
    grid: _Grid,
    ell: _Ellipsoid,
    value: Any,
    label: int | None = None,
    within: np.ndarray | None = None,
    scale: float = 1.0,
) -> np.ndarray | None:
    """Set voxels inside ``ell`` (optionally shrunk by ``scale``) to ``value``; return the mask
    window (slices, mask) for further use. ``value`` may be a callable(x, y, z) -> HU."""
    lo, hi = ell.bbox()
    win = grid.window(lo, hi)
    if win is None:
        return None
    sl, x, y, z = win
    m = ell.q(x, y, z) < scale * scale
    if within is not None:
        m &= within[sl]
    if not m.any():
        return None
    v = value(x, y, z) if callable(value) else float(value)
    sub = hu[sl]
    sub[m] = np.broadcast_to(v, m.shape)[m] if np.ndim(v) else v
    if lab is not None and label is not None:
        lab[sl][m] = label
    full = np.zeros(hu.shape, dtype=bool)
    full[sl] = m
    return full


def _render(
    anat: _Anatomy, grid: _Grid, with_labels: bool, tumours: bool = True
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Noise-free HU (float64), labels (uint8, if asked) and the liver mask (without tumours)
    for one set of sub-slices; tumours are painted when ``tumours``."""
    shape = grid.shape
    hu = np.full(shape, TISSUE_HU["air"], dtype=np.float64)
    lab = np.zeros(shape, dtype=np.uint8) if with_labels else None
    b = anat.body
    x2 = grid.x[None, None, :]
    y2 = grid.y[None, :, None]
    z2 = grid.z[:, None, None]
    dx = x2 - b["center"][0]
    dy = y2 - b["center"][1]
    ax, ay = b["semi"]
    deform = 1 + b["amp"] * b["field"](x2, y2, z2)

    def inside(shrink: float) -> np.ndarray:
        return (dx / (ax - shrink)) ** 2 + (dy / (ay - shrink)) ** 2 < deform**2

    body = inside(0.0)
    hu[body] = TISSUE_HU["fat"]
    wall = inside(b["fat"])
    hu[wall] = TISSUE_HU["muscle"]
    cavity = inside(b["fat"] + b["muscle"])
    vf = anat.visceral(x2, y2, z2)
    hu[cavity] = np.where(vf > 0.35, TISSUE_HU["visceral_fat"], TISSUE_HU["soft"])[cavity]

    o = anat.organs
    for side in ("r", "l"):
        _paint(hu, lab, grid, o[f"paraspinal_{side}"], TISSUE_HU["muscle"], within=body)
    for name in ("lung_right", "lung_left"):
        _paint(hu, lab, grid, o[name], TISSUE_HU["lung"], within=cavity)

    tex = anat.liver_texture

    def liver_hu(x, y, z):
        return TISSUE_HU["liver"] + 5.0 * tex(x, y, z)

    liver = np.zeros(shape, dtype=bool)
    for name in ("liver_right", "liver_left"):
        m = _paint(hu, lab, grid, o[name], liver_hu, 1, within=cavity)
        if m is not None:
            liver |= m

    def later(m: np.ndarray | None) -> np.ndarray | None:
        if m is not None:
            liver[m] = False  # organs painted after the liver take its voxels
        return m

    later(_paint(hu, lab, grid, o["gallbladder"], TISSUE_HU["gallbladder"], 0, within=cavity))
    later(_paint(hu, lab, grid, o["spleen"], TISSUE_HU["spleen"], 4, within=cavity))
    for name in ("kidney_right", "kidney_left"):
        later(_paint(hu, lab, grid, o[name], TISSUE_HU["kidney_cortex"], 3, within=cavity))
        _paint(hu, None, grid, o[name], TISSUE_HU["kidney_medulla"], within=cavity, scale=0.68)
    later(_paint(hu, lab, grid, o["aorta"], TISSUE_HU["aorta"], 0, within=cavity))
    later(_paint(hu, lab, grid, o["ivc"], TISSUE_HU["ivc"], 0, within=cavity))
    # vertebrae: bone with a dense rim, discs at regular z intervals
    phase = (grid.z / anat.vertebra_period + anat.vertebra_phase) % 1.0
    disc_z = np.broadcast_to((phase < 0.2)[:, None, None], shape)
    vert = later(_paint(hu, lab, grid, o["vertebra"], TISSUE_HU["bone_cortex"], 0, within=body))
    _paint(hu, None, grid, o["vertebra"], TISSUE_HU["bone"], within=body, scale=0.82)
    if vert is not None:
        hu[vert & disc_z] = TISSUE_HU["disc"]
    spin = later(_paint(hu, lab, grid, o["spinous"], TISSUE_HU["bone"], 0, within=body))
    if spin is not None:
        hu[spin & disc_z] = TISSUE_HU["muscle"]
    if tumours:
        _paint_tumours(anat, grid, hu, lab, liver)
    return hu, lab, liver


def _paint_tumours(
    anat: _Anatomy, grid: _Grid, hu: np.ndarray, lab: np.ndarray | None, liver: np.ndarray
) -> None:
    """Tumours last, clipped to what is still liver."""
    for tum, thu in anat.tumours:
        _paint(hu, lab, grid, tum, thu, 2, within=liver)


def _place_tumours(
    anat: _Anatomy,
    rng: np.random.Generator,
    liver: np.ndarray,
    spacing,
    origin,
    n_tumours: tuple[int, int],
) -> int:
    """Choose tumour ellipsoids inside ``liver`` (the slice-centre liver mask), the first one
    >= 15 mm across when the liver is thick enough."""
    from scipy import ndimage

    shape = liver.shape
    if not liver.any():
        raise InputError(
            f"phantom shape {shape} with spacing {spacing} is too small to hold a liver; "
            "use a larger shape or spacing"
        )
    # distance to the liver's border, computed on its bounding box (+1 voxel of background)
    nz = np.nonzero(liver)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in nz)
    dist = np.zeros(shape, dtype=np.float64)
    crop = np.pad(liver[box], 1)
    dist[box] = ndimage.distance_transform_edt(crop, sampling=spacing)[1:-1, 1:-1, 1:-1]
    lo, hi = n_tumours
    count = int(rng.integers(lo, hi + 1))
    if count == 0:
        return 0
    centres: list[tuple[np.ndarray, float]] = []
    for i in range(count):
        want_d = rng.uniform(15.0, 30.0) if i == 0 else rng.uniform(8.0, 30.0)
        for _ in range(6):
            r = want_d / 2
            ok = dist >= r + 0.5 * max(spacing)
            cand = np.argwhere(ok)
            if len(cand):
                world = np.asarray(origin)[None, :] + cand[:, ::-1] * np.asarray(spacing)[::-1]
                keep = np.ones(len(cand), dtype=bool)
                for c, rc in centres:
                    keep &= np.linalg.norm(world - c, axis=1) > (r + rc + 2.0)
                if keep.any():
                    pick = world[rng.choice(np.flatnonzero(keep))]
                    break
            want_d = max(want_d * 0.8, 15.0) if i == 0 and want_d > 15.0 else want_d * 0.8
        else:
            continue
        aspect = rng.uniform(0.85, 1.15, size=3)
        semi = tuple(float(r * a) for a in aspect / aspect.max())
        ell = _Ellipsoid(
            center=tuple(float(v) for v in pick),
            semi=semi,
            angle=rng.uniform(0, np.pi),
            amp=0.08,
            field=_Field.random(rng, (8.0, 25.0)),
        )
        anat.tumours.append((ell, float(rng.uniform(10.0, 30.0))))
        centres.append((pick, r))
    return count


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = (48, 160, 160),
    spacing: tuple[float, float, float] = (3.0, 1.2, 1.2),
    n_tumours: tuple[int, int] = (1, 3),
    *,
    noise_sigma: float = NOISE_SIGMA_HU,
) -> tuple[Volume, LabelMap]:
    """A seeded synthetic abdominal CT volume and its label map.

    Args:
        seed: random seed; the same seed, shape and spacing give identical arrays.
        shape: array shape ``(z, y, x)``.
        spacing: voxel size ``(z, y, x)`` in mm (anisotropic by default, thick slices).
        n_tumours: inclusive ``(min, max)`` number of liver tumours.
        noise_sigma: standard deviation of the added Gaussian noise in HU (0: noise-free).

    Returns:
        ``(image, labels)``: ``image.array`` int16 HU ``(z, y, x)``, LPS, identity direction,
        origin at the grid centre in x/y, ``meta['modality'] == 'CT'`` and ``meta['tumours']``
        (centre LPS mm, semi-axes mm, HU of each tumour); ``labels`` uint8 on the same grid with
        :data:`PHANTOM_LABELS`. The first tumour is 15-30 mm across when the liver is thick
        enough; when fewer tumours fit than were drawn, ``meta['warnings']`` says so.

    Organ sizes scale with the field of view (``shape * spacing``); tumour sizes are in mm.

    Raises:
        InputError: a shape/spacing that cannot hold the anatomy or bad ``n_tumours``.
    """
    from scipy import ndimage

    shp = tuple(int(s) for s in shape)
    if len(shp) != 3 or min(shp) < 8:
        raise InputError(f"phantom shape must be three sizes >= 8 (z, y, x), got {shape}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise InputError(f"phantom spacing must be three positive numbers (z, y, x), got {spacing}")
    nz, ny, nx = shp
    origin = (-(nx - 1) * sp[2] / 2, -(ny - 1) * sp[1] / 2, -(nz - 1) * sp[0] / 2)
    try:
        lo, hi = (int(v) for v in n_tumours)
    except (TypeError, ValueError):
        lo, hi = -1, -1
    if lo < 0 or hi < lo:
        raise InputError(f"n_tumours must be (min, max) with 0 <= min <= max, got {n_tumours}")
    rng = np.random.default_rng(seed)
    anat = _random_anatomy(rng, sp, shp, origin)
    # slice centres first (they give the labels), tumours placed in that liver, then the
    # sub-slices above and below for partial volume
    centre = _Grid(shp, sp, origin, 0.0)
    acc, labels, liver = _render(anat, centre, with_labels=True, tumours=False)
    assert labels is not None
    wanted = _place_tumours(anat, rng, labels == 1, sp, origin, (lo, hi))
    _paint_tumours(anat, centre, acc, labels, liver)
    for dz in _SUBSLICES:
        if dz != 0.0:
            acc += _render(anat, _Grid(shp, sp, origin, dz), with_labels=False)[0]
    acc /= len(_SUBSLICES)
    # in-plane reconstruction blur (~0.5 voxel), then quantum noise
    acc = ndimage.gaussian_filter(acc, sigma=(0.0, 0.5, 0.5), mode="nearest")
    noise = rng.normal(0.0, 1.0, size=shp)
    if noise_sigma:
        acc += float(noise_sigma) * noise
    arr = np.clip(np.rint(acc), -1024, 3071).astype(np.int16)
    tumours = [
        {"center_lps": list(t.center), "semi_axes_mm": list(t.semi), "hu": h}
        for t, h in anat.tumours
    ]
    meta = {
        "modality": "CT",
        "description": "synthetic abdominal CT phantom",
        "phantom_seed": int(seed),
        "tumours": tumours,
        "warnings": []
        if len(tumours) == wanted
        else [
            f"only {len(tumours)} of {wanted} tumours fit in this liver; use a larger shape/spacing"
        ],
    }
    vol = Volume(array=arr, spacing=sp, origin=origin, direction=np.eye(3), meta=meta)
    lm = LabelMap.like(vol, labels, PHANTOM_LABELS, modality="CT", phantom_seed=int(seed))
    return vol, lm
