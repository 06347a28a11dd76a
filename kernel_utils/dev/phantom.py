"""Analytic neck-CT phantom: skull base, C1-C7, upper thoracic spine, soft tissue, optional fractures.

All geometry is in patient millimetres, DICOM LPS axes: x towards the patient's left, y posterior,
z superior. `sample_patient` draws one patient; `render_slice` evaluates one axial plane of it on a
grid of (y, x) millimetre coordinates and returns HU, vertebra labels and fracture voxels.
Labels follow the competition's segmentations: 1-7 = C1-C7, 8-19 = T1-T12, 0 = background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VERTEBRA_NAMES = tuple([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)])
N_THORACIC_RENDERED = 5  # T1..T5: enough to fill the bottom of any neck CT

AIR, FAT, MUSCLE, CORD, DISC, BRAIN = -1000.0, -100.0, 55.0, 30.0, 90.0, 35.0
CANCELLOUS, CORTICAL, TABLE = 300.0, 1250.0, 150.0


@dataclass(frozen=True)
class Vertebra:
    """One vertebra as a rigid body; body centre (cx, cy), heights along z, sizes in mm."""

    label: int
    z_top: float
    z_bottom: float
    cx: float
    cy: float
    body_a: float  # lateral semi-axis of the body
    body_b: float  # antero-posterior semi-axis of the body
    canal_a: float
    canal_b: float
    spinous_len: float
    transverse_len: float
    cortex: float
    dens_height: float = 0.0  # C2 only: the peg rising into the atlas ring

    @property
    def height(self) -> float:
        return self.z_top - self.z_bottom

    @property
    def z_mid(self) -> float:
        return 0.5 * (self.z_top + self.z_bottom)

    @property
    def canal_w(self) -> float:
        """Antero-posterior offset of the spinal canal centre from the body centre."""
        if self.label == 1:
            return 6.0 + self.canal_b
        return self.body_b + self.canal_b + 1.5

    def z_extent(self) -> tuple[float, float]:
        """(bottom, top) z of everything this vertebra renders, processes and dens included."""
        top = self.z_top + self.dens_height
        return self.z_bottom - 0.6 * self.spinous_len - 2.0, top + 1.0


@dataclass(frozen=True)
class Fracture:
    """A fracture: a thin slab through a vertebra, the bone on one side shifted."""

    label: int
    point: tuple[float, float, float]
    normal: tuple[float, float, float]
    radius: float
    width: float
    shift: tuple[float, float, float]
    gap_hu: float


@dataclass(frozen=True)
class Patient:
    """Everything needed to render a neck CT of one patient."""

    vertebrae: tuple[Vertebra, ...]
    fractures: tuple[Fracture, ...]
    skull_z: float  # lowest z of the skull base
    neck_a: float
    neck_b: float
    neck_dy: float  # neck centre relative to the spine, anterior is negative
    fat: float
    airway_r: float
    table_y: float
    shoulder_z: float  # z below which the outline widens into the shoulders

    def spine_xy(self, z: float) -> tuple[float, float]:
        """Body-centre line of the spine at height z (interpolated between vertebrae)."""
        zs = np.array([v.z_mid for v in self.vertebrae])[::-1]
        xs = np.array([v.cx for v in self.vertebrae])[::-1]
        ys = np.array([v.cy for v in self.vertebrae])[::-1]
        return float(np.interp(z, zs, xs)), float(np.interp(z, zs, ys))

    @property
    def cervical_z(self) -> tuple[float, float]:
        """(bottom of C7, top of the dens)."""
        c7 = self.vertebrae[6]
        c1 = self.vertebrae[0]
        return c7.z_bottom, c1.z_top + 1.0


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def sample_patient(rng: np.random.Generator, fractured: tuple[int, ...] = (), difficulty: float = 0.5,
                   z_c1_top: float = 0.0) -> Patient:
    """Draw a patient: sizes, heights, lordosis, tilt, and the fractures of the `fractured` labels (1-7)."""
    s = rng.uniform(0.88, 1.12)
    lordosis = rng.uniform(3.0, 11.0)
    tilt_x = rng.uniform(-0.06, 0.06)
    tilt_y = rng.uniform(-0.08, 0.08)
    x0, y0 = rng.uniform(-6, 6), rng.uniform(-4, 8)

    heights = [10.0 * s, 16.0 * s] + [rng.uniform(12.5, 15.0) * s for _ in range(5)]
    heights += [rng.uniform(17.0, 21.0) * s for _ in range(N_THORACIC_RENDERED)]
    disc = rng.uniform(4.0, 5.5) * s
    dens = 13.0 * s

    vertebrae: list[Vertebra] = []
    z = z_c1_top
    n = 7 + N_THORACIC_RENDERED
    z_tops: list[float] = []
    for i in range(n):
        z_tops.append(z)
        gap = 2.0 * s if i == 0 else disc
        z = z - heights[i] - gap
    z_c7_bottom = z_tops[6] - heights[6]
    span = z_c1_top - z_c7_bottom
    for i in range(n):
        label = i + 1
        top, bottom = z_tops[i], z_tops[i] - heights[i]
        mid = 0.5 * (top + bottom)
        t = np.clip((mid - z_c7_bottom) / span, 0.0, 1.0)
        cy = y0 - lordosis * np.sin(np.pi * t) + tilt_y * (mid - z_c1_top)
        if mid < z_c7_bottom:  # thoracic kyphosis: the spine runs posterior
            cy += 0.12 * (z_c7_bottom - mid)
        cx = x0 + tilt_x * (mid - z_c1_top) + rng.normal(0, 0.4)
        if label == 1:
            a, b, ca, cb, sp, tr = 0.0, 0.0, 14.0, 11.5, 5.0, 13.0
        elif label <= 7:
            k = label - 2  # 0 for C2 .. 5 for C7
            a = _lerp(8.5, 10.5, k / 5) * s
            b = _lerp(7.5, 8.5, k / 5) * s
            ca, cb = 12.0 * s, 7.0 * s
            sp = [13.0, 9.0, 9.0, 10.0, 14.0, 22.0][k] * s
            tr = _lerp(6.0, 9.0, k / 5) * s
        else:
            a, b = 12.0 * s, 10.5 * s
            ca, cb = 8.0 * s, 7.0 * s
            sp, tr = 24.0 * s, 14.0 * s
        vertebrae.append(Vertebra(
            label=label, z_top=top, z_bottom=bottom, cx=cx, cy=cy, body_a=a, body_b=b,
            canal_a=ca * (s if label == 1 else 1.0), canal_b=cb * (s if label == 1 else 1.0),
            spinous_len=sp, transverse_len=tr, cortex=rng.uniform(1.2, 1.8),
            dens_height=dens if label == 2 else 0.0))
    # The atlas sits on the axis' dens: share its centre line.
    c2 = vertebrae[1]
    vertebrae[0] = Vertebra(**{**vertebrae[0].__dict__, "cx": c2.cx, "cy": c2.cy})

    fractures = tuple(f for label in fractured for f in _sample_fractures(rng, vertebrae[label - 1], difficulty))
    neck_a = rng.uniform(52, 66) * s
    return Patient(
        vertebrae=tuple(vertebrae), fractures=fractures,
        skull_z=z_c1_top + rng.uniform(3.0, 6.0),
        neck_a=neck_a, neck_b=neck_a * rng.uniform(0.85, 1.0), neck_dy=-rng.uniform(10, 18),
        fat=rng.uniform(3.0, 12.0), airway_r=rng.uniform(6.0, 9.0),
        table_y=y0 + neck_a + rng.uniform(8, 20),
        shoulder_z=z_c7_bottom + rng.uniform(-5, 15))


def _sample_fractures(rng: np.random.Generator, v: Vertebra, difficulty: float) -> list[Fracture]:
    """One or two fracture slabs through vertebra v; thinner, less displaced, fainter as difficulty rises."""
    out = []
    for _ in range(1 + int(rng.random() < 0.3)):
        site = rng.random()
        w = v.canal_w
        if v.label == 1:  # anterior arch, posterior arch or a lateral mass
            side = rng.choice([-1.0, 1.0])
            px, py = [(0.0, -9.0), (side * 6.0, w + v.canal_b + 1.5), (side * (v.canal_a - 1), 1.0)][rng.integers(3)]
            pz = v.z_mid + rng.uniform(-2, 2)
        elif v.label == 2 and site < 0.35:  # odontoid (dens) fracture
            px, py, pz = 0.0, -0.15 * v.body_b, v.z_top + rng.uniform(0.0, 6.0)
        elif site < 0.7:  # vertebral body
            px = rng.uniform(-0.5, 0.5) * v.body_a
            py = rng.uniform(-0.5, 0.5) * v.body_b
            pz = v.z_mid + rng.uniform(-0.3, 0.3) * v.height
        else:  # lamina or pedicle
            px = rng.choice([-1.0, 1.0]) * (v.canal_a + 1.0)
            py = w + rng.uniform(-0.5, 0.8) * v.canal_b
            pz = v.z_mid + rng.uniform(-0.2, 0.3) * v.height
        normal = rng.normal(size=3) * np.array([1.0, 1.0, 0.7])
        normal /= np.linalg.norm(normal)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        shift = direction * _lerp(3.0, 0.3, difficulty) * rng.uniform(0.3, 1.0)
        out.append(Fracture(  # a lucent line (blood and soft tissue), darker than cancellous bone at any difficulty
            label=v.label, point=(v.cx + px, v.cy + py, pz), normal=tuple(normal.tolist()),
            radius=rng.uniform(8.0, 13.0), width=_lerp(3.0, 0.7, difficulty) * rng.uniform(0.85, 1.15),
            shift=tuple(shift.tolist()), gap_hu=_lerp(-50.0, 180.0, difficulty)))
    return out


def _ellipse(u: np.ndarray, w: np.ndarray, a: float, b: float) -> np.ndarray:
    return (u / a) ** 2 + (w / b) ** 2 <= 1.0


def vertebra_bone(v: Vertebra, X: np.ndarray, Y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Bone of vertebra v in the plane at height z: (HU where bone, else nan) and the bone mask, both like X."""
    hu = np.full(X.shape, np.nan, dtype=np.float32)
    lo, hi = v.z_extent()
    if not (lo <= z <= hi):
        return hu, np.zeros(X.shape, dtype=bool)
    u = X - v.cx
    w = Y - v.cy
    t = v.cortex
    h = v.height
    wc = v.canal_w
    ca, cb = v.canal_a, v.canal_b
    canal = _ellipse(u, w - wc, ca, cb)

    def paint(mask: np.ndarray, core: np.ndarray | None = None) -> None:
        hu[mask] = CORTICAL
        if core is not None:
            hu[mask & core] = CANCELLOUS

    in_height = v.z_bottom <= z <= v.z_top
    if v.label == 1:
        if in_height:
            front, back = -9.5 - 2.5, wc + cb + 3.0
            A, B, cw = ca + 4.0, 0.5 * (back - front), 0.5 * (back + front)
            ring = _ellipse(u, w - cw, A, B) & ~_ellipse(u, w - cw, A - 3.2, B - 3.2)
            paint(ring)
            for side in (-1.0, 1.0):  # lateral masses
                mass = _ellipse(u - side * (A - 4.5), w - cw + 2.0, 5.5, 8.0)
                paint(mass, _ellipse(u - side * (A - 4.5), w - cw + 2.0, 5.5 - t, 8.0 - t))
                tp = (np.abs(w - cw + 2.0) < 3.0) & (side * u > A - 2.0) & (side * u < A + v.transverse_len)
                hole = _ellipse(u - side * (A + 0.45 * v.transverse_len), w - cw + 2.0, 2.2, 2.2)
                paint(tp & ~hole)
        return hu, ~np.isnan(hu)

    a, b = v.body_a, v.body_b
    if in_height:
        body = _ellipse(u, w, a, b)
        inner = _ellipse(u, w, a - t, b - t) if (v.z_bottom + t < z < v.z_top - t) else np.zeros_like(body)
        paint(body, inner)
    if v.label == 2 and v.z_top < z <= v.z_top + v.dens_height:
        rise = (z - v.z_top) / v.dens_height
        r = 5.0 * np.sqrt(max(1.0 - rise**4, 0.0)) + 0.5
        du, dw = u, w + 0.15 * b
        paint(_ellipse(du, dw, r, r), _ellipse(du, dw, max(r - t, 0.1), max(r - t, 0.1)))
    z_rel = (z - v.z_bottom) / h
    ta = 3.2
    if 0.12 <= z_rel <= 0.95:  # pedicles, laminae and the arch around the canal
        arch = _ellipse(u, w - wc, ca + ta, cb + ta) & ~canal & (w > wc - 0.5 * cb)
        pedicles = (np.abs(u) > 0.6 * ca) & (np.abs(u) < ca + ta) & (w > 0.3 * b) & (w < wc)
        paint(arch | pedicles)
    if -0.1 <= z_rel <= 1.05:  # articular pillars
        for side in (-1.0, 1.0):
            pillar = _ellipse(u - side * (ca + 2.5), w - wc + 1.0, 4.5, 6.0)
            paint(pillar, _ellipse(u - side * (ca + 2.5), w - wc + 1.0, 4.5 - t, 6.0 - t))
    w0 = wc + cb + ta - 1.0
    along = np.clip(w - w0, 0.0, None)
    centre_z = v.z_bottom + 0.55 * h - 0.55 * along
    spinous = (np.abs(u) < 1.9) & (w >= w0) & (w <= w0 + v.spinous_len) & (np.abs(z - centre_z) < 0.2 * h)
    paint(spinous)
    if 0.3 <= z_rel <= 0.8:  # transverse processes, with the foramen transversarium in C2-C6
        wt = 0.2 * b
        for side in (-1.0, 1.0):
            tp = (np.abs(w - wt) < 3.0) & (side * u > 0.6 * a) & (side * u < a + v.transverse_len)
            if v.label <= 6:
                tp &= ~_ellipse(u - side * (a + 0.45 * v.transverse_len), w - wt, 2.2, 2.2)
            paint(tp)
    if v.label >= 8 and abs(z - v.z_mid) < 0.5 * h + 25:  # ribs, sloping down from the spine
        ru = np.abs(u)
        centre = v.z_mid - 0.18 * np.clip(ru - a, 0.0, None)
        ring = _ellipse(u, w + 28.0, 62.0 + 6.0 * (v.label - 8), 52.0)
        ring &= ~_ellipse(u, w + 28.0, 56.0 + 6.0 * (v.label - 8), 46.0)
        paint(ring & (np.abs(z - centre) < 4.5) & (w > -20.0) & (ru > a))
    return hu, ~np.isnan(hu)


def _soft_tissue(p: Patient, X: np.ndarray, Y: np.ndarray, z: float) -> np.ndarray:
    """Air, table, fat, muscle, cord, airway, skull base, mandible and clavicles at height z (HU)."""
    sx, sy = p.spine_xy(z)
    u, w = X - sx, Y - sy
    hu = np.full(X.shape, AIR, dtype=np.float32)
    hu[(np.abs(Y - p.table_y - 3.0) < 3.0) & (np.abs(X - sx) < 180.0)] = TABLE
    na, nb = p.neck_a, p.neck_b
    if z > p.skull_z:  # the head widens above the skull base
        grow = np.clip((z - p.skull_z) / 30.0, 0.0, 1.0)
        na, nb = na + 18.0 * grow, nb + 25.0 * grow
    if z < p.shoulder_z:  # the shoulders widen the outline laterally
        na = na + 3.2 * min(p.shoulder_z - z, 45.0)
    nb = min(nb, p.table_y - sy - p.neck_dy)
    outline = _ellipse(u, w - p.neck_dy, na, nb)
    hu[outline] = FAT
    hu[_ellipse(u, w - p.neck_dy, na - p.fat, nb - p.fat)] = MUSCLE
    c1 = p.vertebrae[0]
    hu[_ellipse(u, w - (c1.canal_w if z > c1.z_bottom else p.vertebrae[3].canal_w), 8.0, 6.0)] = CORD
    if z < p.skull_z:
        ar = p.airway_r
        pharynx = z > p.vertebrae[3].z_mid
        hu[_ellipse(u, w + 25.0, ar * (1.6 if pharynx else 1.0), ar)] = AIR
    else:
        fm = _ellipse(u, w - c1.canal_w, 16.0, 17.0)  # foramen magnum
        rel = z - p.skull_z
        if rel < 14.0:
            plate = _ellipse(u, w - 4.0, 38.0, 32.0) & ~fm
            hu[plate] = CORTICAL * 0.75
        shell = _ellipse(u, w - 8.0, na - p.fat - 2.0, nb - p.fat - 2.0)
        inside = _ellipse(u, w - 8.0, na - p.fat - 9.0, nb - p.fat - 9.0)
        if rel > 22.0:
            hu[inside] = BRAIN
            hu[shell & ~inside] = CORTICAL
        else:
            hu[shell & ~inside & (w > 12.0)] = CORTICAL
        for side in (-1.0, 1.0):  # mastoids, with air cells
            mastoid = _ellipse(u - side * 46.0, w - 6.0, 9.0, 11.0)
            hu[mastoid] = CORTICAL * 0.7
            hu[_ellipse(u - side * 46.0, w - 6.0, 5.0, 6.0)] = -600.0
    c2 = p.vertebrae[1]
    if c2.z_mid < z < p.skull_z + 4.0:  # mandible: a U of bone in front of the airway
        cw = p.neck_dy - 0.55 * nb
        mand = _ellipse(u, w - cw, 0.62 * na, 0.5 * nb) & ~_ellipse(u, w - cw, 0.62 * na - 4.5, 0.5 * nb - 4.5)
        hu[mand & (w < cw)] = CORTICAL
    for upper, lower in zip(p.vertebrae[1:-1], p.vertebrae[2:], strict=True):  # intervertebral discs
        if lower.z_top < z < upper.z_bottom:
            hu[_ellipse(X - 0.5 * (upper.cx + lower.cx), Y - 0.5 * (upper.cy + lower.cy),
                        0.5 * (upper.body_a + lower.body_a), 0.5 * (upper.body_b + lower.body_b))] = DISC
    t1 = p.vertebrae[7]
    if abs(z - (t1.z_top + 4.0)) < 5.5:  # clavicles
        for side in (-1.0, 1.0):
            t = np.clip((side * u - 18.0) / 90.0, 0.0, 1.0)
            d = np.hypot(side * u - (18.0 + 90.0 * t), w - (-45.0 + 28.0 * t))
            hu[(d < 5.5) & (side * u > 15.0)] = CORTICAL * 0.8
    return hu


def render_slice(p: Patient, X: np.ndarray, Y: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the axial plane at height z.

    Args:
        p: the patient.
        X, Y: float32 [H, W] patient x and y (mm) of every sample.
        z: the plane's patient z (mm).

    Returns:
        hu float32 [H, W], labels uint8 [H, W] (0, 1-7 C1-C7, 8-19 T1-...), fracture bool [H, W].
    """
    hu = _soft_tissue(p, X, Y, z)
    labels = np.zeros(X.shape, dtype=np.uint8)
    fracture = np.zeros(X.shape, dtype=bool)
    for v in p.vertebrae:
        lo, hi = v.z_extent()
        if not (lo <= z <= hi):
            continue
        bone, mask = vertebra_bone(v, X, Y, z)
        for f in p.fractures:
            if f.label != v.label:
                continue
            n = np.asarray(f.normal)
            dx, dy, dz = X - f.point[0], Y - f.point[1], z - f.point[2]
            dist = n[0] * dx + n[1] * dy + n[2] * dz
            radial = np.sqrt(np.maximum(dx * dx + dy * dy + dz * dz - dist * dist, 0.0))
            fragment = (dist > 0) & (radial < 1.4 * f.radius)
            if fragment.any():
                shifted, smask = vertebra_bone(v, X - f.shift[0], Y - f.shift[1], z - f.shift[2])
                bone = np.where(fragment, shifted, bone)
                mask = np.where(fragment, smask, mask)
            gap = (np.abs(dist) < 0.5 * f.width) & (radial < f.radius) & mask
            bone[gap] = f.gap_hu
            fracture |= gap
        hu[mask] = bone[mask]
        labels[mask] = v.label
    return hu, labels, fracture
