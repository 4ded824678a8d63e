"""``warp`` render engine: a portrait animated by a landmark-driven dense warp.

Per session, once (``open_session``): the avatar (``avatar`` bytes or a bundled
``avatar_name``, default ``astronaut``) is decoded, framed to a square around the face
(at most ``framing`` × the face box, default 4: head and shoulders), resized to ``size``
(default 512, 128..1024), its 68 landmarks found (dlib) and a 3D rig fitted
(:mod:`giris.workers.face_rig`). Then everything a frame needs that does not move is
precomputed: the warp region (``roi``: an ellipse around the head and neck, with its
bounding box), fixed anchors on that box and on the ellipse (the background stays put),
a coarse grid over the box (``grid_cell`` px cells, default ``size/64``), the thin-plate
kernel between the grid and the anchors, the source as a float tensor on the device,
the mouth's rest opening.

Per frame (``render``):

1. The rig turns the 73-vector into image positions of 68 landmarks + 12 skull/neck
   points (blendshape displacements, then head pose, projected); with ``eyeWide`` on or
   the brows raised, 16 more that carry the lash band with the lid and the brows as lines
   (``face_rig.LASH_BAND``).
2. A thin-plate spline is fitted *in the output frame*: centres at those targets and at the
   anchors, values the backward displacement (rest − target, 0 on anchors). Working in
   the output frame means a mouth opening is smooth there (in the source the inner lips
   coincide and would tear). One small (~110²) solve per frame.
3. The spline is evaluated on the coarse grid, tapered to 0 at the box's edge, upsampled
   bilinearly to the box and fed to ``torch.nn.functional.grid_sample`` (CPU, or CUDA when
   the worker's device is ``cuda``); only the box is resampled, the rest of the frame is
   a copy of the still background.
4. Compositing, on the uint8 frame, in small boxes: a mouth interior between the inner
   lips as the jaw opens beyond the portrait's own opening. A portrait whose lips are
   parted at rest keeps its own teeth: they are taken from the source, rigid with the head
   (not stretched by the warp, not carried down by the jaw; lower teeth, where the photo
   shows a row apart from the upper one, go down with the lower lip), and a dark cavity
   fills only the gap that opens between them, fading in with the opening (no change at
   rest, no jump in the teeth's brightness when a syllable starts). A closed-mouth portrait
   gets a drawn interior (a row of upper teeth). Either way the cavity's edges are smooth
   curves through the inner lips' landmarks, it is shaded in the portrait's lip tones
   (dark at the back and in the corners, lit along the lower lip), and at wide openings a
   tongue and a row of lower teeth show.
   Parted lips drawn meeting on /p b m/ (``mouthClose``) and under a frown (the rig's
   ``lip_seal``), from the frame's own lips stretched over the gap (smoothed along the
   mouth as far as stretched, a grin's dark corners lifted to the lip's tone); as speech
   parts a frown's sealed lips the cavity darkens in from that closed rest.
   Eyelids drawn down over each eye as ``eyeBlink*`` rises, after the rig has warped the
   upper lid part of the way (``face_rig.BLINK_WARP``): the frame's own skin between brow
   and lid resampled down to the lid's edge, the photo's lash band squeezed into a thin
   line there.

``render_batch`` on CUDA resamples every job of the same frame size in one ``grid_sample``;
on the CPU it renders job by job: the resampling cost is per output pixel, a batch saves
only the ~20 µs call overhead and would force the whole frame (not the face box) through.
``batch_frames = true`` takes the CUDA way on the CPU too (whole frames, one call), which
is how the tests check that path's bookkeeping on machines without a GPU.

Options: ``threads`` (torch intra-op threads, default 1: stages are pinned to cores),
``batch_frames`` (default: only on CUDA), ``preload_landmarks`` (load dlib's models at
start, default true),
``regularization`` (thin-plate smoothing, default 1e-3), ``grid_cell`` (coarse grid cell
in pixels at 512, scaled with the size; default 8), ``framing`` (default 4.0),
``cache_avatars`` (prepared avatars kept per worker, default 8).
Spec keys: ``avatar`` (bytes), ``avatar_name`` (str), ``size`` (int).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from giris.workers import images
from giris.workers import landmarks as LM
from giris.workers.bases import RenderEngine
from giris.workers.coefficients import INDEX, N_CHANNELS, POSE
from giris.workers.engine import EngineContext, EngineError
from giris.workers.face_rig import (CAMERA_DISTANCE, INNER_PAIRS, LIP_MEET, PIVOT, TEMPLATE_Z, FaceRig,
                                   fit_rig)
from giris.workers.face_rig import smoothstep as _smoothstep

ASSETS = Path(__file__).resolve().parent / "assets"
MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 128, 1024, 512
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

# the warp region around the head, face frame (inter-ocular units; y up from the eyes)
RING_CENTER = (0.0, -0.35)
RING_RADII = (2.25, 2.6)

#: the collar: fixed anchors beside the lower face, so what lies there (a helmet ring, a
#: collar, the shoulders, the wall) does not move with the head or the jaw. The ring alone
#: left ~1 IOD between the jaw and its anchors, and the smooth flow spread the head's motion
#: over it: the astronaut's helmet ring beside her chin moved ~75% as far as the jaw.
#: Jaw landmark (image-left side; the right side mirrors it, 16 - k) → distances out from
#: the jaw line along its normal, inter-ocular units: an inner row close to the jaw's sides
#: (the rim is ~0.2 IOD from it there), an outer row beside the lower jaw that keeps the
#: spline from overshooting past the inner one, and under the chin (6, 10) one anchor
#: further out: the neck, between them, is where the head's motion fades.
COLLAR = {2: (0.3,), 3: (0.3, 0.6), 4: (0.25, 0.6), 5: (0.25, 0.6), 6: (0.5,)}
#: a collar anchor gives way (moves with the nearby jaw) where a jaw point's motion would
#: exceed this share of the distance between them (the flow's gradient there): usual
#: speech and sway stay below it, a big nod or a wide-open mouth does not fold the picture
COLLAR_STRAIN = 0.8

#: mouthClose at which a portrait's parted lips are drawn sealed (/p b m/ peak at ~0.35-0.6
#: after coarticulation)
CLOSE_SEAL = 1.8
UPPER_IN = [60, 61, 62, 63, 64]
LOWER_IN = [60, 67, 66, 65, 64]
#: a seal's lips, corner to corner: inner and outer edges of the upper and the lower lip
SEAL_UP_IN, SEAL_LO_IN = [48] + UPPER_IN + [54], [48] + LOWER_IN + [54]
SEAL_UP_OUT, SEAL_LO_OUT = [48, 49, 50, 51, 52, 53, 54], [48, 59, 58, 57, 56, 55, 54]
#: the share of each lip, from its outer edge, a seal stretches over the gap (the rest, by
#: the inner edge, may be the warp's squashed teeth); how dark the seam where they meet
SEAL_KEEP = 0.45
SEAL_SEAM = 0.25
#: a grin's dark mouth corners (the shadow between its parted lips, out past the inner
#: corners' landmarks) are lifted within SEAL_CORNER (IOD) of each corner, channel by
#: channel, to SEAL_FLOOR of the darker lip's colour (a closed mouth's corners are lip,
#: faintly shaded; the paler lip's tone lifted the skin's shadow below them to a pink patch)
SEAL_CORNER = 0.3
SEAL_FLOOR = 0.85
#: ... and up to SEAL_CORNER_EDGE (IOD) past the lips' outer edges there (the shadow's rim)
SEAL_CORNER_EDGE = 0.04
#: the stretched lips are averaged along the mouth over ±SEAL_SMOOTH (IOD) as far as they
#: are stretched: the stretch drew each column's texture (a highlight, a crease) out into a
#: vertical streak
SEAL_SMOOTH = 0.04
EYES = {  # ARKit side: (upper chain, lower chain) from outer to inner corner
    "Right": ([36, 37, 38, 39], [36, 41, 40, 39]),
    "Left": ([45, 44, 43, 42], [45, 46, 47, 42]),
}
BROWS = {"Right": [17, 18, 19, 20, 21], "Left": [22, 23, 24, 25, 26]}
#: a blink's lid (inter-ocular units): the skin swept down over the eye starts at most
#: LID_REACH above the upper lid (less under a low brow); the photo's lash band (lashes,
#: liner, shadow) is the LID_LASH above the upper lid's landmarks, squeezed to
#: LID_LASH_CLOSED at the closed lid's edge; the skin darkens by LID_SHADE towards it
LID_REACH = 0.16
LID_LASH = 0.07
LID_LASH_CLOSED = 0.03
LID_SHADE = 0.2


def bundled_avatars() -> list[str]:
    """Names of the avatars shipped in ``giris/workers/assets``."""
    return sorted(p.stem for p in ASSETS.glob("*.png"))


@lru_cache(maxsize=1)
def bundled_landmarks() -> dict[str, np.ndarray]:
    """dlib's 68 points of each bundled avatar, found once and shipped beside it
    (``NAME.landmarks.json``, keyed by the image's SHA-256): bundled avatars open without
    running, or even installing, dlib."""
    known: dict[str, np.ndarray] = {}
    for path in ASSETS.glob("*.landmarks.json"):
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            pts = np.asarray(d["points"], np.float32).reshape(68, 2)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged file: dlib finds the points instead
        known[str(d["sha256"])] = pts
    return known


def _collar(rig: FaceRig) -> np.ndarray:
    """The collar's anchors (see ``COLLAR``) in image pixels: points out from the rest jaw
    line along its normal (in the face frame, so a tilted portrait's collar is tilted)."""
    jaw = rig.rest[:17, :2].astype(np.float64)
    centre = jaw.mean(0)
    table = {**COLLAR, **{16 - k: g for k, g in COLLAR.items()}}
    pts = []
    for k, gaps in sorted(table.items()):
        t = jaw[min(k + 1, 16)] - jaw[max(k - 1, 0)]
        nrm = np.array([t[1], -t[0]]) / max(float(np.hypot(*t)), 1e-9)
        if np.dot(nrm, jaw[k] - centre) < 0:  # outwards, away from the face
            nrm = -nrm
        pts += [jaw[k] + g * nrm for g in gaps]
    return rig.to_image(np.asarray(pts, np.float32))


def _collar_give(state: "WarpSession", jaw_t: np.ndarray, jaw_disp: np.ndarray) -> np.ndarray:
    """Per frame, the collar anchors' values (backward displacement, px, (C, 2)): 0 (held)
    unless a jaw point moves, relative to the anchor, by more than ``COLLAR_STRAIN`` of the
    distance left between them; then the anchor gives way, following the nearby jaw points
    just enough to cap that strain (a big nod or a wide-open mouth would fold the picture
    between a fixed anchor and a jaw sliding past or into it)."""
    d2 = _sqdist(state.collar_px, jaw_t)
    dist = np.sqrt(np.maximum(d2, 1e-6))
    strain = (np.hypot(jaw_disp[:, 0], jaw_disp[:, 1])[None, :] / dist).max(1)
    give = np.clip(1.0 - COLLAR_STRAIN / np.maximum(strain, 1e-6), 0.0, 1.0)
    if not give.any():
        return np.zeros((len(give), 2))
    w = 1.0 / d2 ** 2
    w /= w.sum(1, keepdims=True)
    return give[:, None] * (w @ jaw_disp)


def _anchor_system(a64: np.ndarray, n_m: int, lam: float) -> np.ndarray:
    """The thin-plate system (n_m + A + 3)² for n_m moving centres (filled per frame)
    before the anchors ``a64`` (face units): the anchor blocks and the affine rows."""
    n_a = len(a64)
    n = n_m + n_a
    system = np.zeros((n + 3, n + 3))
    system[n_m:n, n_m:n] = _tps(_sqdist(a64, a64)) + lam * np.eye(n_a)
    system[:n, n] = system[n, :n] = 1.0
    system[n_m:n, n + 1:] = a64
    system[n + 1:, n_m:n] = a64.T
    return system


def _flow_at(state: "WarpSession", p: np.ndarray, c: np.ndarray, sol: np.ndarray) -> np.ndarray:
    """The spline's value (px, (k, 2)) at points ``p`` (face units) for centres ``c`` and
    coefficients ``sol`` (untapered: for points inside the face)."""
    n_m = len(c)
    n = n_m + len(state.anchors_n)
    return (_tps_mm(p, c) @ sol[:n_m] + _tps_mm(p, state.anchors_n) @ sol[n_m:n]
            + sol[n] + p @ sol[n + 1:])


def _tps(d2: np.ndarray) -> np.ndarray:
    """Thin-plate kernel r² log r from squared distances (0 at 0)."""
    return 0.5 * d2 * np.log(np.maximum(d2, 1e-20))


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _tps_mm(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray | None = None) -> np.ndarray:
    """Thin-plate kernel between point sets, squared distances by one matrix product."""
    if a_sq is None:
        a_sq = (a * a).sum(1)[:, None]
    d2 = a @ b.T
    d2 *= -2.0
    d2 += a_sq
    d2 += (b * b).sum(1)[None, :]
    np.maximum(d2, 1e-20, out=d2)
    out = np.log(d2)
    out *= d2
    out *= 0.5
    return out


@dataclass
class Prepared:
    """An avatar framed and resized to one size, with its rig (shared between sessions)."""

    image: np.ndarray        # (S, S, 3) uint8
    rig: FaceRig


@dataclass
class WarpSession:
    spec: dict
    size: int
    image: np.ndarray                    # the still frame (S, S, 3) uint8
    rig: FaceRig
    device: torch.device
    src: torch.Tensor                    # (1, 3, S, S) float32 on the device
    roi: tuple[int, int, int, int]       # x0, y0, x1, y1 (exclusive)
    gh: int
    gw: int
    grid_px: np.ndarray                  # (G, 2) coarse grid, pixels
    grid_n: np.ndarray                   # (G, 2) coarse grid, face units
    anchors_n: np.ndarray                # (A, 2) fixed anchors, face units
    k_ga: np.ndarray                     # (G, A) kernel grid-anchors (float32)
    grid_sq: np.ndarray                  # (G, 1) squared norms of grid_n
    system: np.ndarray                   # (P+A+3)² spline system with the anchor blocks filled
    band_system: np.ndarray              # the same with the 16 band points after the P
    band_rest_px: np.ndarray             # (16, 2) their rest positions (face_rig.LASH_BAND)
    anchors64: np.ndarray                # (A, 2) the anchors in float64, for the solve's kernel
    p_g: np.ndarray                      # (G, 3) [1, u, v] on the grid
    taper: np.ndarray                    # (G, 1)
    #: (G, 2) twice: how much of a flow component pointing out of the frame (negative,
    #: positive) is kept, fading to 0 at the frame's own edges
    out_taper: tuple[np.ndarray, np.ndarray]
    rest_px: np.ndarray                  # (P, 2) rest positions of the rig's moving points
    palette: np.ndarray                  # (3, 3) the mouth interior's colours (``_palette``)
    lip_rgb: tuple[np.ndarray, np.ndarray] | None  # upper, lower lip colour (lips parted at rest)
    mouth_rest_gap: float                # portrait's own inner-lip opening, pixels
    teeth: "Teeth | None" = None         # the portrait's own teeth (lips parted at rest)
    colour: float = 1.0                  # how colourful the face is: 0 (a gray photo) .. 1
    #: the collar anchors' positions (C, 2) px: the last C anchors (see COLLAR_STRAIN)
    collar_px: np.ndarray | None = None
    nbytes: int = 0  # held in all (measured at open)
    device_nbytes: int = 0  # of which on the render device
    frames: int = 0
    extra: dict = field(default_factory=dict)


class WarpRenderEngine(RenderEngine):
    """Landmark-driven dense warp of a portrait (see the module docstring)."""

    def __init__(self, options: Mapping[str, Any], context: EngineContext) -> None:
        super().__init__(options, context)
        threads = int(self.options.get("threads", 1))
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(context.device if str(context.device).startswith("cuda") else "cpu")
        if self.device.type == "cuda":
            _check_cuda(self.device)
        #: whole frames, every same-size job in one grid_sample (the CUDA way)
        self.batched = bool(self.options.get("batch_frames", self.device.type == "cuda"))
        self.lam = float(self.options.get("regularization", 1e-3))
        self.grid_cell = float(self.options.get("grid_cell", 8.0))
        self.framing = float(self.options.get("framing", 4.0))
        self._cache: OrderedDict[tuple, Prepared] = OrderedDict()
        self._cache_size = int(self.options.get("cache_avatars", 8))
        #: load dlib's models at start (a server: the first custom portrait does not wait
        #: ~1 s for them); off for a one-shot run that uses a bundled avatar
        self.preload_landmarks = bool(self.options.get("preload_landmarks", True))
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ session set-up
    @staticmethod
    def _size(spec: Mapping[str, Any]) -> int:
        try:
            size = int(spec.get("size", DEFAULT_SIZE))
        except (TypeError, ValueError):
            raise EngineError(f"size must be an integer, not {spec.get('size')!r}", code="bad_input")
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise EngineError(f"size must be {MIN_SIZE}..{MAX_SIZE}, not {size}", code="bad_input")
        return size

    @staticmethod
    def _avatar(spec: Mapping[str, Any]) -> bytes | Path:
        """The portrait's bytes as sent, or the bundled one's file; raises for neither
        (cheap: nothing is read or decoded)."""
        data = spec.get("avatar")
        if data is not None and not (isinstance(data, str) and data == ""):
            if isinstance(data, str):
                raise EngineError("avatar must be image bytes (use avatar_name for a bundled one)",
                                  code="bad_image")
            return bytes(data)
        name = spec.get("avatar_name") or "astronaut"
        if not isinstance(name, str) or not _NAME.match(name) or not (ASSETS / f"{name}.png").is_file():
            raise EngineError(f"unknown avatar {name!r}; bundled: {', '.join(bundled_avatars())}",
                              code="bad_input")
        return ASSETS / f"{name}.png"

    def prepare(self, data: bytes, size: int, max_pixels: int = images.MAX_PIXELS) -> Prepared:
        """Decode, frame, resize and rig an avatar (cached by content and size)."""
        key = (hashlib.sha256(data).hexdigest(), size, self.framing)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        rgb = images.decode_image(data, max_pixels)
        known = bundled_landmarks().get(key[0])
        lm = known.copy() if known is not None else LM.find_face(rgb)
        image, lm = frame_square(rgb, lm, size, self.framing)
        prepared = Prepared(image=image, rig=fit_rig(lm))
        with self._lock:
            self._cache[key] = prepared
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return prepared

    def estimate(self, spec: Mapping[str, Any]) -> dict[str, int]:
        s = self._size(spec)
        px = s * s
        # source float32 + still uint8 + (worst case box = frame) sampling grid, float
        # output and uint8 staging, + a little for the coarse grid and kernels
        n = px * 12 + px * 3 + px * 8 + px * 12 + px * 3 + 600_000
        key = self._device_key()
        if key == "cpu":
            return {"cpu": n}
        return {key: px * 12 + px * 8 + px * 12 + px * 3, "cpu": px * 6 + 600_000}

    def held(self, state: WarpSession) -> dict[str, int]:
        """What the session holds, measured, on the device and on the host (on a GPU the
        source and the per-frame box buffers are there, the still, the rig and the spline
        kernels on the host)."""
        if not state.nbytes:
            return self.estimate(state.spec)
        key = self._device_key()
        if key == "cpu":
            return {"cpu": state.nbytes}
        return {key: state.device_nbytes, "cpu": state.nbytes - state.device_nbytes}

    def _device_key(self) -> str:
        if self.device.type == "cpu":
            return "cpu"
        return f"cuda:{self.device.index if self.device.index is not None else 0}"

    def check(self, spec: Mapping[str, Any]) -> None:
        # whether a face is found in a portrait sent as bytes waits for the open
        self._size(spec)
        self._avatar(spec)

    def open_session(self, spec: Mapping[str, Any]) -> WarpSession:
        size = self._size(spec)
        avatar = self._avatar(spec)
        data = avatar.read_bytes() if isinstance(avatar, Path) else avatar
        prepared = self.prepare(data, size, int(spec.get("max_image_pixels") or images.MAX_PIXELS))
        return self._session(dict(spec, size=size), prepared)

    def _session(self, spec: dict, prep: Prepared) -> WarpSession:
        size = int(spec["size"])
        rig = prep.rig
        iod = rig.iod

        # the region that moves: an ellipse around head and neck, and its bounding box
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        ring_face = np.stack([RING_CENTER[0] + RING_RADII[0] * np.cos(t),
                              RING_CENTER[1] + RING_RADII[1] * np.sin(t)], 1).astype(np.float32)
        ring_px = rig.to_image(ring_face)
        lo = np.floor(ring_px.min(0)).astype(int)
        hi = np.ceil(ring_px.max(0)).astype(int) + 1
        x0, y0 = max(0, int(lo[0])), max(0, int(lo[1]))
        x1, y1 = min(size, int(hi[0])), min(size, int(hi[1]))
        w, h = x1 - x0, y1 - y0
        # the region resampled: the box, or the whole frame (every same-size session then
        # batches into one call), where the flow is still the box's: anchored on its edges,
        # tapered to 0 at them and 0 outside it (the suit below the box stays put)
        rx0, ry0, rx1, ry1 = (0, 0, size, size) if self.batched else (x0, y0, x1, y1)
        rw, rh = rx1 - rx0, ry1 - ry0
        if w < 16 or h < 16:
            raise EngineError("the face is too close to the image edge to animate", code="bad_image")
        # which of the box's sides (left, top, right, bottom) the frame itself cuts
        cut_l, cut_t, cut_r, cut_b = x0 == 0, y0 == 0, x1 == size, y1 == size

        # anchors (the flow is 0 there): the box's inner edges, and the ring inside the
        # anchors' box. Where the box stops at the frame's edge the anchors' box goes on
        # out to the ring, as if the picture went on: anchors on the frame's last row held
        # it still and a chin there, pulled down as the jaw opened, was pinched into a notch
        ax0 = min(0, int(lo[0])) if cut_l else x0
        ay0 = min(0, int(lo[1])) if cut_t else y0
        ax1 = max(size, int(hi[0])) if cut_r else x1
        ay1 = max(size, int(hi[1])) if cut_b else y1
        per_side = 7
        edge = []
        for s in np.linspace(0, 1, per_side):
            edge += [(ax0 + s * (ax1 - 1 - ax0), ay0), (ax0 + s * (ax1 - 1 - ax0), ay1 - 1),
                     (ax0, ay0 + s * (ay1 - 1 - ay0)), (ax1 - 1, ay0 + s * (ay1 - 1 - ay0))]
        edge = np.unique(np.round(np.array(edge, np.float32), 2), axis=0)
        inside = ((ring_px[:, 0] > ax0 + 0.15 * iod) & (ring_px[:, 0] < ax1 - 1 - 0.15 * iod)
                  & (ring_px[:, 1] > ay0 + 0.15 * iod) & (ring_px[:, 1] < ay1 - 1 - 0.15 * iod))
        # the collar beside the lower face (last, so _coarse finds them at the end)
        collar_px = _collar(rig)
        anchors_px = np.concatenate([edge, ring_px[inside], collar_px]).astype(np.float32)

        def norm(p: np.ndarray) -> np.ndarray:
            return ((p - rig.origin) / iod).astype(np.float32)

        cell = max(4.0, self.grid_cell * size / 512.0)
        gw = max(2, int(np.ceil((rw - 1) / cell)) + 1)
        gh = max(2, int(np.ceil((rh - 1) / cell)) + 1)
        gx = np.linspace(rx0, rx1 - 1, gw, dtype=np.float32)
        gy = np.linspace(ry0, ry1 - 1, gh, dtype=np.float32)
        grid_px = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
        grid_n = norm(grid_px)
        anchors_n = norm(anchors_px)
        k_ga = _tps(_sqdist(grid_n, anchors_n)).astype(np.float32)
        a64 = anchors_n.astype(np.float64)
        system = _anchor_system(a64, len(rig.rest), self.lam)
        band_rest_px = rig.band_rest_px  # (a property: computed on each read)
        band_system = _anchor_system(a64, len(rig.rest) + len(band_rest_px), self.lam)
        p_g = np.concatenate([np.ones((len(grid_n), 1), np.float32), grid_n], 1)
        # taper: 1 inside, smoothly 0 at the box edges that are not the frame's edges (and
        # outside them, where the whole frame is resampled)
        m = max(3.0, 0.03 * max(w, h))
        # (per grid point: a box that is the whole frame has no inner edge at all, and
        # every distance stays infinite; scalars here broke the CUDA/whole-frame path)
        far = np.full(len(grid_px), np.inf, np.float32)
        dx = np.minimum(far if cut_l else grid_px[:, 0] - x0, far if cut_r else (x1 - 1) - grid_px[:, 0])
        dy = np.minimum(far if cut_t else grid_px[:, 1] - y0, far if cut_b else (y1 - 1) - grid_px[:, 1])
        taper = _smoothstep(np.minimum(dx, dy) / m).astype(np.float32)[:, None]
        # at the frame's own edges the flow may pull the picture in (a chin leaving at the
        # bottom) but not reach past the edge: a sample from beyond it repeats the edge's
        # pixels in streaks (hair on the top edge smeared as the head went down). The part
        # pointing out fades to 0 over a reach wider than the head's motion
        reach = max(m, 1.0 * iod)

        def fade(d: np.ndarray, cut: bool) -> np.ndarray:
            return _smoothstep(d / reach).astype(np.float32) if cut else np.ones(len(d), np.float32)
        gx_, gy_ = grid_px[:, 0], grid_px[:, 1]
        out_taper = (np.stack([fade(gx_, cut_l), fade(gy_, cut_t)], 1),
                     np.stack([fade(size - 1 - gx_, cut_r), fade(size - 1 - gy_, cut_b)], 1))

        image = prep.image
        src = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(torch.float32)[None]
        src = (src + 0.5).to(self.device)  # +0.5: the truncating cast to uint8 then rounds
        rest_px = rig.rest_px
        lm = rest_px[:68]

        gap = _chain_gap(lm)
        lips = (_lip_colour(image, lm, [50, 51, 52], [61, 62, 63], iod),
                _lip_colour(image, lm, [58, 57, 56], [67, 66, 65], iod))
        lip_rgb = None
        if gap > max(1.5, 0.03 * iod):  # parted at rest (a smile showing teeth): /p b m/ seal it
            lip_rgb = lips
            teeth = _teeth_plate(image, lm, float(np.mean([c @ _LUMA for c in lip_rgb])))
        else:
            teeth = None
        # the mouth interior is drawn in colours: in a black-and-white (or faded) portrait
        # as gray (or as faded) as the face around it, not a red mouth in a gray face
        fx0, fy0 = np.maximum(np.floor(lm.min(0)).astype(int), 0)
        fx1, fy1 = np.ceil(lm.max(0)).astype(int) + 1
        skin = image[fy0:fy1, fx0:fx1].reshape(-1, 3).astype(np.int16)
        chroma = float(np.median(skin.max(1) - skin.min(1))) if len(skin) else 0.0
        colour = float(np.clip(chroma / COLOURFUL_CHROMA, 0.0, 1.0))
        device_nbytes = src.numel() * 4 + rw * rh * (8 + 12 + 3)  # source; grid, float and uint8 box
        nbytes = (device_nbytes + image.nbytes + k_ga.nbytes + system.nbytes + band_system.nbytes
                  + grid_px.nbytes * 3)
        if teeth is not None:
            nbytes += teeth.crop.numel() * 4
        return WarpSession(spec=spec, size=size, image=image, rig=rig, device=self.device, src=src,
                           roi=(rx0, ry0, rx1, ry1), gh=gh, gw=gw, grid_px=grid_px, grid_n=grid_n,
                           anchors_n=anchors_n, k_ga=k_ga, p_g=p_g, taper=taper, out_taper=out_taper,
                           grid_sq=(grid_n * grid_n).sum(1)[:, None], system=system,
                           band_system=band_system, band_rest_px=band_rest_px,
                           anchors64=a64,
                           collar_px=collar_px,
                           rest_px=rest_px, lip_rgb=lip_rgb, mouth_rest_gap=gap, teeth=teeth,
                           palette=_palette(lips[0]), colour=colour, nbytes=nbytes,
                           device_nbytes=device_nbytes)

    @classmethod
    def preload(cls, options: Mapping[str, Any]) -> None:
        """dlib's models (~1.5 s with the GIL held) once, in the launcher: a restarted
        renderer forked from it has them already."""
        if bool(options.get("preload_landmarks", True)):
            try:
                LM.load_models()
            except EngineError:
                pass  # no dlib: the worker says so itself

    def warmup(self) -> None:
        """At start, not at the first user's request: load dlib's models (~1 s), fit the
        bundled avatar at the default size (its sessions then open in milliseconds) and
        draw one frame (torch's kernels). Without dlib, bundled avatars still work (their
        points ship with them); other portraits are refused with the reason."""
        if self.preload_landmarks:
            try:
                LM.load_models()
            except EngineError as e:
                self.ctx.log.warning("portraits other than the bundled ones cannot be fitted",
                                     extra={"reason": str(e)})
        state = self.open_session({})
        out = np.empty(state.image.shape, np.uint8)
        row = np.zeros(N_CHANNELS, np.float32)
        row[INDEX["jawOpen"]] = 0.3
        self.render(state, row, out)
        self.close_session(state)

    def close_session(self, state: WarpSession) -> None:
        state.src = None  # type: ignore[assignment]
        state.k_ga = state.system = state.band_system = None  # type: ignore[assignment]

    # -------------------------------------------------------------------------- frames
    def _solve(self, state: WarpSession, c: np.ndarray, disp: np.ndarray, system: np.ndarray,
               collar: np.ndarray | None) -> np.ndarray:
        """The spline's coefficients (moving points, anchors, affine part; float32 (n+3, 2))
        for centres ``c`` (face units) carrying ``disp`` (px), the collar's values given."""
        n_m = len(c)
        n = n_m + len(state.anchors_n)
        A = system.copy()                                    # anchor blocks are constant
        k = _tps_mm(c, state.anchors64)
        A[:n_m, n_m:n] = k
        A[n_m:n, :n_m] = k.T
        A[:n_m, :n_m] = _tps_mm(c, c)
        A[np.arange(n_m), np.arange(n_m)] += self.lam
        A[:n_m, n + 1:] = c
        A[n + 1:, :n_m] = c.T
        rhs = np.zeros((n + 3, 2))
        rhs[:n_m] = disp
        if collar is not None:
            rhs[n - len(collar):n] = collar
        return np.linalg.solve(A, rhs).astype(np.float32)

    def _coarse(self, state: WarpSession, targets: np.ndarray, band: np.ndarray | None = None,
                band_w: float = 1.0) -> np.ndarray | None:
        """Coarse sampling grid (2, gh, gw), normalised for grid_sample; None when still.

        ``band``: the band points (``face_rig.LASH_BAND``; eyeWide or raised brows) at their
        targets, each sampling the source ``band_w`` of the way from where the flow without
        them samples there (0: the same picture) to its rest point (1: the lash band rigid
        with the lid, the brow with its landmarks)."""
        disp = state.rest_px - targets                       # backward displacement, px
        if float(np.abs(disp).max()) < 0.02:
            return None
        rig = state.rig
        c = ((targets - rig.origin) / rig.iod).astype(np.float64)
        collar = None
        if state.collar_px is not None and len(state.collar_px):
            collar = _collar_give(state, targets[:17], disp[:17])
        system = state.system
        if band is not None:
            cb = ((band - rig.origin) / rig.iod).astype(np.float64)
            band_disp = state.band_rest_px - band
            if band_w < 1.0:  # blending in: from where the flow without the band samples
                sol = self._solve(state, c, disp, system, collar)
                free = _flow_at(state, cb.astype(np.float32), c.astype(np.float32), sol)
                band_disp = free + band_w * (band_disp - free)
            c = np.concatenate([c, cb])
            disp = np.concatenate([disp, band_disp])
            system = state.band_system
        n_m = len(c)
        n = n_m + len(state.anchors_n)
        sol = self._solve(state, c, disp, system, collar)
        k_gm = _tps_mm(state.grid_n, c.astype(np.float32), state.grid_sq)
        flow = k_gm @ sol[:n_m]
        flow += state.k_ga @ sol[n_m:n]
        flow += state.p_g @ sol[n:]
        flow *= state.taper
        flow *= np.where(flow < 0, state.out_taper[0], state.out_taper[1])
        coords = state.grid_px + flow
        coords *= 2.0 / (state.size - 1)
        coords -= 1.0
        return coords.reshape(state.gh, state.gw, 2).transpose(2, 0, 1)

    def _resample(self, srcs: torch.Tensor, coarse: np.ndarray, h: int, w: int) -> torch.Tensor:
        """Upsample coarse grids (N, 2, gh, gw) and resample: float (N, 3, h, w) on device.

        The sources carry a +0.5 bias, so a truncating cast to uint8 rounds.
        """
        c = torch.from_numpy(np.ascontiguousarray(coarse)).to(self.device, non_blocking=True)
        grid = F.interpolate(c, size=(h, w), mode="bilinear", align_corners=True)
        grid = grid.permute(0, 2, 3, 1).contiguous()
        return F.grid_sample(srcs, grid, mode="bilinear", padding_mode="border", align_corners=True)

    def render(self, state: WarpSession, coeffs: np.ndarray, out: np.ndarray) -> None:
        self.render_batch([(state, coeffs, out)])

    def render_batch(self, jobs: Sequence[tuple[Any, np.ndarray, np.ndarray]]) -> None:
        pending: dict[tuple, list] = {}
        for state, row, out in jobs:
            row = np.asarray(row, np.float32).reshape(N_CHANNELS)
            if out.shape != state.image.shape or out.dtype != np.uint8:
                raise EngineError(f"output buffer must be uint8 {state.image.shape}, not "
                                  f"{out.dtype} {out.shape}", code="bad_input")
            targets, band, band_w = state.rig.frame_targets(row)
            coarse = self._coarse(state, targets, band, band_w)
            if coarse is None:
                np.copyto(out, state.image)
                self._composite(state, row, targets, out)
                continue
            if not self.batched:
                self._write(state, out, self._resample(state.src, coarse[None], *_hw(state.roi))[0])
                self._composite(state, row, targets, out)
            else:
                key = (state.size, state.roi)
                pending.setdefault(key, []).append((state, row, out, targets, coarse))
        for key, group in pending.items():  # one resampling per frame size
            srcs = torch.cat([g[0].src for g in group]) if len(group) > 1 else group[0][0].src
            res = self._resample(srcs, np.stack([g[4] for g in group]), *_hw(key[1]))
            # uint8 frames, still on the device: each is copied once, straight into its slot
            res = res.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            for (state, row, out, targets, _), frame in zip(group, res):
                self._write(state, out, frame)
                self._composite(state, row, targets, out)
        for state, _, _ in jobs:
            state.frames += 1

    @staticmethod
    def _write(state: WarpSession, out: np.ndarray, roi_frame: torch.Tensor) -> None:
        """Still background around the box; the box from ``roi_frame``: uint8 (h, w, 3),
        or float (3, h, w) (biased by +0.5) cast straight into ``out``."""
        x0, y0, x1, y1 = state.roi
        s = state.size
        img = state.image
        if y0 > 0:
            out[:y0] = img[:y0]
        if y1 < s:
            out[y1:] = img[y1:]
        if x0 > 0:
            out[y0:y1, :x0] = img[y0:y1, :x0]
        if x1 < s:
            out[y0:y1, x1:] = img[y0:y1, x1:]
        if roi_frame.dtype == torch.uint8:  # (h, w, 3)
            if roi_frame.device.type == "cpu":
                np.copyto(out[y0:y1, x0:x1], roi_frame.numpy())
            else:  # device → the slot, with no host tensor in between
                torch.from_numpy(out[y0:y1, x0:x1]).copy_(roi_frame)
            return
        # cast whole planes (the truncating cast rounds: the source carries +0.5), then
        # interleave plane by plane: ~0.45 ms at 512² against ~0.7 for one strided cast-copy;
        # .cpu(): the box may be on the GPU (a CUDA device without batch_frames)
        planes = roi_frame.to(torch.uint8).cpu().numpy()
        box = out[y0:y1, x0:x1]
        for ch in range(planes.shape[0]):
            box[:, :, ch] = planes[ch]

    # ---------------------------------------------------------------------- compositing
    def _composite(self, state: WarpSession, row: np.ndarray, targets: np.ndarray, out: np.ndarray) -> None:
        iod = state.rig.iod
        lm = targets[:68]
        teeth = state.teeth
        pose = None
        if teeth is not None and any(row[INDEX[n]] for n in POSE):
            pose = _head_affine(state.rig, row)  # the teeth ride on the head, not the jaw
        seal, shut = 0.0, 0.0
        if state.lip_rgb is not None:
            # a /p b m/ closes them, and a frown (the rig's lip_seal) relaxes them shut
            seal = max(min(1.0, float(row[INDEX["mouthClose"]]) * CLOSE_SEAL), state.rig.lip_seal(row))
            shut = state.rig.frown_shut(row)
        drawn = seal > 0.02 * CLOSE_SEAL
        cover = float(_smoothstep(seal)) if drawn else 0.0
        _mouth(out, lm, iod, state.mouth_rest_gap, float(row[INDEX["tongueOut"]]), state.palette,
               state.colour, teeth, pose, shut, cover)
        if drawn:
            _seal(out, lm, iod, seal, state.lip_rgb)
        for side, (upper, lower) in EYES.items():
            b = float(row[INDEX[f"eyeBlink{side}"]])
            if b > 0.02:
                _eyelid(out, lm[upper], lm[lower], lm[BROWS[side]], min(b, 1.0), iod)


def _check_cuda(device: torch.device) -> None:
    """Fail at start, with the reason, when the configured GPU cannot be used (a CPU build
    of torch, no driver, no such device): not at every session's first frame."""
    if not torch.cuda.is_available():
        raise EngineError(f"render device {device} is not usable: this torch ({torch.__version__}, "
                          f"CUDA {torch.version.cuda or 'none'}) sees no GPU; install a CUDA "
                          "build of torch or set the stage's device to \"cpu\"",
                          code="engine_unavailable")
    try:
        torch.zeros(1, device=device).add_(1).item()
    except Exception as e:  # noqa: BLE001 - the driver's own words are the useful part
        raise EngineError(f"render device {device} is not usable: {e}", code="engine_unavailable") from e


def _hw(roi: tuple[int, int, int, int]) -> tuple[int, int]:
    return roi[3] - roi[1], roi[2] - roi[0]


def frame_square(rgb: np.ndarray, lm: np.ndarray, size: int, framing: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop a square around the face (head and shoulders) and resize it to ``size``."""
    h, w = rgb.shape[:2]
    lo, hi = lm.min(0), lm.max(0)
    face = float(max(hi - lo))
    side = int(min(min(h, w), max(face * framing, 64)))
    cx = float((lo[0] + hi[0]) / 2)
    cy = float(lo[1] + (hi[1] - lo[1]) * 0.55)  # the face a little above the centre
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    crop = rgb[y0:y0 + side, x0:x0 + side]
    scale = size / side
    if side != size:
        t = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).to(torch.float32)[None]
        if side > size:
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        else:
            t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)
        crop = t[0].clamp_(0, 255).add_(0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    image = np.ascontiguousarray(crop, dtype=np.uint8)
    # pixel centres: x_new + 0.5 = (x_old - x0 + 0.5) * scale
    lm_new = ((lm - np.array([x0, y0], np.float32) + 0.5) * scale - 0.5).astype(np.float32)
    return image, lm_new


def _chain_gap(lm: np.ndarray) -> float:
    """Largest distance between the upper and lower inner lip (pixels)."""
    return float(max(np.hypot(*(lm[a] - lm[b])) for a, b in INNER_PAIRS))


def _frame(p0: np.ndarray, p1: np.ndarray):
    """Unit axis from p0 to p1 and its normal (image y down: the normal points down)."""
    d = p1 - p0
    length = float(np.hypot(*d))
    ax = d / max(length, 1e-6)
    nrm = np.array([-ax[1], ax[0]], np.float32)
    if nrm[1] < 0:
        nrm = -nrm
    return ax, nrm, length


def _pixels(box) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a box, float32."""
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return xs, ys


def _local_xy(xs, ys, p0, ax, nrm):
    rx, ry = xs - p0[0], ys - p0[1]
    ax = ax.astype(np.float32)
    nrm = nrm.astype(np.float32)
    return rx * ax[0] + ry * ax[1], rx * nrm[0] + ry * nrm[1]


def _chain(pts: np.ndarray, p0, ax, nrm):
    rel = pts - p0
    u = rel @ ax
    v = rel @ nrm
    return np.maximum.accumulate(u).astype(np.float32), v.astype(np.float32)


def _box(pts: np.ndarray, pad: float, shape) -> tuple[int, int, int, int] | None:
    lo = np.floor(pts.min(0) - pad).astype(int)
    hi = np.ceil(pts.max(0) + pad).astype(int) + 1
    x0, y0 = max(0, lo[0]), max(0, lo[1])
    x1, y1 = min(shape[1], hi[0]), min(shape[0], hi[1])
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return int(x0), int(y0), int(x1), int(y1)


_TEETH = np.array([228, 222, 208], np.float32)
#: the mouth interior's colours as shares, per channel, of the portrait's upper lip colour
#: (``_palette``): the deep cavity (throat, the insides of the cheeks), the lit inner edge
#: of the lower lip, the tongue. Drawn in the photo's own light and tone: a pale, a dark or
#: a warm portrait gets a cavity to match (fixed colours were one flat dark red for all)
CAVITY_TINT = np.array([0.24, 0.105, 0.125], np.float32)
RIM_TINT = np.array([0.56, 0.3, 0.31], np.float32)
TONGUE_TINT = np.array([0.84, 0.5, 0.53], np.float32)
#: the lit rim along the lower lip's inner edge fades over this (inter-ocular units)
MOUTH_RIM = 0.05
#: teeth drawn as a row seen from the front: their centres equally spaced in angle round
#: the arch (narrower towards the corners); one tooth's angle, upper and lower row
TOOTH_PITCH = (0.3, 0.2)
#: the warmer light deep in the mouth (on the lower teeth)
_IN_MOUTH = np.array([1.0, 0.88, 0.8], np.float32)
#: points per segment of the inner lips' smooth curve (``_smooth_chains``)
CHAIN_STEPS = 8
#: a face whose median pixel spans this much between its channels is drawn in full colour
COLOURFUL_CHROMA = 24.0
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
#: how much brighter than the lips (luma levels) the gap between them must be to be
#: teeth: the bundled smile's are ~55 above its lips; lips just apart, a line of lip or
#: shadow 5-50 below them
TEETH_CONTRAST = 20.0


#: depth (face frame, inter-ocular units) of the upper teeth: a little behind the inner
#: upper lip; the head's motion of that plane carries the portrait's own teeth
TEETH_Z = float(TEMPLATE_Z[[61, 62, 63]].mean()) - 0.05
#: opening (inter-ocular units beyond the portrait's own) over which the photo's teeth take
#: over from the warp's (the same pixels at 0: the warp had only stretched them)
TEETH_RAMP = 0.02
#: opening over which the cavity darkens in (it appears only in the newly opened gap)
CAVITY_RAMP = 0.07


@dataclass
class Teeth:
    """The portrait's own mouth interior between its parted lips at rest (source pixels)."""

    p0: np.ndarray           # rest inner-lip corner 60
    ax: np.ndarray           # unit axis 60 → 64 and its (downward) normal
    nrm: np.ndarray
    length: float
    uu: np.ndarray           # rest upper inner-lip chain (u, v) in that frame
    vu: np.ndarray
    ul: np.ndarray           # rest lower inner-lip chain
    vl: np.ndarray
    lower_px: np.ndarray     # (5, 2) rest lower inner lip, pixels
    #: share of the rest gap, from the upper lip, that is upper teeth (rides with the head);
    #: the rest (lower teeth seen apart from the upper row) goes down with the lower lip
    split: float
    rgb: np.ndarray          # the teeth's colour (for the drawn lower-teeth hint)
    crop: torch.Tensor       # (1, 3, h, w) float32 (CPU): the source about the mouth
    crop_at: tuple[int, int]  # its top-left pixel (x, y)


def _teeth_plate(image: np.ndarray, lm: np.ndarray, lip_luma: float) -> Teeth | None:
    """The portrait's teeth between its parted inner lips: where a dark line (the gap
    between the upper and the lower row) splits them, and their colour. None where no
    teeth show: lips only just apart (a line of lip or shadow, not teeth, between them)
    would have spoken through a toothless hole (the drawn interior suits them)."""
    p0, p1 = lm[60], lm[64]
    ax, nrm, length = _frame(p0, p1)
    if length < 4:
        return None
    uu, vu = _chain(lm[UPPER_IN], p0, ax, nrm)
    ul, vl = _chain(lm[LOWER_IN], p0, ax, nrm)
    us = np.linspace(0.25, 0.75, 9, dtype=np.float32) * length
    ts = np.linspace(0.0, 1.0, 17, dtype=np.float32)
    v_up, v_lo = np.interp(us, uu, vu), np.interp(us, ul, vl)
    v = v_up[None, :] + ts[:, None] * np.maximum(v_lo - v_up, 0)[None, :]
    x = p0[0] + us[None, :] * ax[0] + v * nrm[0]
    y = p0[1] + us[None, :] * ax[1] + v * nrm[1]
    rgb = _bilinear(image, x.astype(np.float32), y.astype(np.float32))  # (17, 9, 3)
    lum = rgb @ _LUMA
    bright = float(np.percentile(lum, 75))
    prof = lum.mean(1)
    k = 5 + int(np.argmin(prof[5:15]))          # depth 0.31 .. 0.87 of the gap
    split = float(ts[k]) if prof[k] < 0.6 * bright else 1.0
    if bright < lip_luma + TEETH_CONTRAST:
        return None
    upper = (ts[:, None] <= split) & (lum >= bright)
    teeth_rgb = np.median(rgb[upper], 0) if upper.any() else _TEETH
    # the frames sample the teeth from a small copy of the source about the mouth (one
    # grid_sample of the mouth's box, ~25 µs, where numpy's gathers took ~0.17 ms)
    mouth = np.concatenate([lm[48:68], lm[31:36]])
    pad = 0.5 * length + 4
    cx0, cy0 = np.maximum(np.floor(mouth.min(0) - pad).astype(int), 0)
    cx1, cy1 = np.minimum(np.ceil(mouth.max(0) + pad).astype(int) + 1, image.shape[1::-1])
    crop = torch.from_numpy(np.ascontiguousarray(image[cy0:cy1, cx0:cx1].transpose(2, 0, 1)))
    return Teeth(p0=p0.astype(np.float32), ax=ax.astype(np.float32), nrm=nrm.astype(np.float32),
                 length=float(length), uu=uu, vu=vu, ul=ul, vl=vl,
                 lower_px=lm[LOWER_IN].astype(np.float32), split=split,
                 rgb=np.asarray(teeth_rgb, np.float32), crop=crop.to(torch.float32)[None],
                 crop_at=(int(cx0), int(cy0)))


def _head_affine(rig: FaceRig, row: np.ndarray, z: float = TEETH_Z) -> tuple[np.ndarray, np.ndarray]:
    """The head pose of a 73-vector on the plane at depth ``z`` (as ``FaceRig.project``
    moves a point there, blendshapes aside), as image-pixel affine maps (2×3): forward
    (rest → now) and inverse. Scalar arithmetic: ~10 µs, a tenth of numpy's small ops."""
    yaw, pitch, roll, tx, ty, tz = (float(row[INDEX[n]]) for n in POSE)
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    # the top two rows of face_rig.rotation: Rz(roll) · Rx(pitch) · Ry(yaw)
    r00, r01, r02 = cr * cy - sr * sp * sy, -sr * cp, cr * sy + sr * sp * cy
    r10, r11, r12 = sr * cy + cr * sp * sy, cr * cp, sr * sy - cr * sp * cy
    px, py, pz = PIVOT
    k = CAMERA_DISTANCE / max(CAMERA_DISTANCE - tz, 1.0)
    # face frame: xy' = k · (R₂ (xy − pivot) + R[:2, 2] (z − pivot_z) + t) + pivot
    bx = k * (r02 * (z - pz) + tx - r00 * px - r01 * py) + px
    by = k * (r12 * (z - pz) + ty - r10 * px - r11 * py) + py
    # image = origin + iod · axesᵀ · xy (axes orthonormal): m = axesᵀ (k R₂) axes
    (a00, a01), (a10, a11) = rig.axes.tolist()
    ox, oy = float(rig.origin[0]), float(rig.origin[1])
    iod = float(rig.iod)
    f00, f01, f10, f11 = k * r00, k * r01, k * r10, k * r11
    g00, g01 = f00 * a00 + f01 * a10, f00 * a01 + f01 * a11      # (k R₂) · axes
    g10, g11 = f10 * a00 + f11 * a10, f10 * a01 + f11 * a11
    m00, m01 = a00 * g00 + a10 * g10, a00 * g01 + a10 * g11     # axesᵀ · that
    m10, m11 = a01 * g00 + a11 * g10, a01 * g01 + a11 * g11
    b0 = ox - (m00 * ox + m01 * oy) + iod * (a00 * bx + a10 * by)
    b1 = oy - (m10 * ox + m11 * oy) + iod * (a01 * bx + a11 * by)
    det = m00 * m11 - m01 * m10
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    fwd = np.array([[m00, m01, b0], [m10, m11, b1]], np.float32)
    inv = np.array([[i00, i01, -(i00 * b0 + i01 * b1)], [i10, i11, -(i10 * b0 + i11 * b1)]], np.float32)
    return fwd, inv


def _apply(m: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``image`` (uint8 H×W×3) sampled at float pixel positions, edges clamped: float32."""
    h, w = image.shape[:2]
    x = np.clip(x, 0, w - 1.001)
    y = np.clip(y, 0, h - 1.001)
    x0 = x.astype(np.int32)
    y0 = y.astype(np.int32)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    top = image[y0, x0].astype(np.float32)
    top += (image[y0, x0 + 1] - top) * fx
    bot = image[y0 + 1, x0].astype(np.float32)
    bot += (image[y0 + 1, x0 + 1] - bot) * fx
    top += (bot - top) * fy
    return top


def _sample(t: Teeth, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The source about the mouth at float pixel positions (bilinear, edges repeated):
    float32 (..., 3)."""
    c = t.crop
    h, w = c.shape[2], c.shape[3]
    grid = np.empty(x.shape + (2,), np.float32)
    grid[..., 0] = (x - t.crop_at[0]) * (2.0 / max(w - 1, 1)) - 1.0
    grid[..., 1] = (y - t.crop_at[1]) * (2.0 / max(h - 1, 1)) - 1.0
    got = F.grid_sample(c, torch.from_numpy(grid)[None], mode="bilinear", padding_mode="border",
                        align_corners=True)
    return got[0].permute(1, 2, 0).numpy()


def _teeth_at(t: Teeth, qx: np.ndarray, qy: np.ndarray) -> tuple[np.ndarray, ...]:
    """Where photo pixels ``qx, qy`` sit in the teeth's frame: across the mouth (``vs``),
    the upper lip's rest line there (``vu0``), the rest gap under it (``g0``), and the fade
    at the mouth's ends (``side``)."""
    us, vs = _local_xy(qx, qy, t.p0, t.ax, t.nrm)
    vu0 = np.interp(us, t.uu, t.vu).astype(np.float32)
    g0 = np.maximum(np.interp(us, t.ul, t.vl).astype(np.float32) - vu0, 0)
    return vs, vu0, g0, (us + 0.5).clip(0, 1) * (t.length - us + 0.5).clip(0, 1)


def _photo_teeth(t: Teeth, xs: np.ndarray, ys: np.ndarray,
                 p0, ax, nrm, u: np.ndarray, v_lo: np.ndarray, pose) -> tuple[np.ndarray, np.ndarray]:
    """The portrait's own teeth at the output pixels ``xs, ys``: colours and weights (0 where the
    cavity shows). Upper teeth ride with the head (``pose``: forward and inverse affine of
    the head's motion, None when still); a lower row seen apart from them with the lower lip."""
    qx, qy = (xs, ys) if pose is None else _apply(pose[1], xs, ys)
    vs, vu0, g0, side = _teeth_at(t, qx, qy)
    v_split = vu0 + t.split * g0
    # an upper lip raised off the teeth (above its rest line) shows their top row
    push = np.maximum(vu0 + 0.5 - vs, 0)
    w_up = (v_split - vs + 0.5).clip(0, 1) * ((t.split * g0 - 0.5) / 1.5).clip(0, 1) * side
    col = _sample(t, qx + push * t.nrm[0], qy + push * t.nrm[1])
    if t.split >= 1.0:
        return col, w_up
    # the lower row: as far above the lower lip as at rest
    lx, ly = t.lower_px[:, 0], t.lower_px[:, 1]
    if pose is not None:
        lx, ly = _apply(pose[0], lx, ly)
    lo_posed = np.stack([lx, ly], 1)
    ul, vl = _chain(lo_posed, p0, ax, nrm)
    drop = v_lo - np.interp(u, ul, vl).astype(np.float32)
    qx, qy = xs - drop * nrm[0], ys - drop * nrm[1]
    if pose is not None:
        qx, qy = _apply(pose[1], qx, qy)
    vs, vu0, g0, side = _teeth_at(t, qx, qy)
    w_lo = (vs - (vu0 + t.split * g0) + 0.5).clip(0, 1) * (((1 - t.split) * g0 - 0.5) / 1.5).clip(0, 1)
    w_lo *= side * (1 - w_up)
    col_lo = _sample(t, qx, qy)
    w = w_up + w_lo
    col = (col * w_up[..., None] + col_lo * w_lo[..., None]) / np.maximum(w, 1e-6)[..., None]
    return col, w


def _lip_colour(image: np.ndarray, lm: np.ndarray, outer: list[int], inner: list[int],
                iod: float) -> np.ndarray:
    """A lip's colour: the median of small patches halfway between its outer and inner
    landmarks (``outer``, ``inner`` paired)."""
    r = max(1, int(round(0.02 * iod)))
    px = [_patch(image, q, r) for q in 0.5 * (lm[outer] + lm[inner])]
    return np.median(np.concatenate(px), 0).astype(np.float32)


def _palette(lip: np.ndarray) -> np.ndarray:
    """The mouth interior's colours (deep cavity, lit rim, tongue; (3, 3) float32) from the
    portrait's upper lip colour (see ``CAVITY_TINT``)."""
    return np.stack([lip * CAVITY_TINT, lip * RIM_TINT, lip * TONGUE_TINT]).astype(np.float32)


#: where a segment of the smooth lip curve is sampled (0 .. 1, both ends: a point shared
#: by two segments is sampled twice, which ``np.interp`` takes), and the bases there: the
#: segment's u from its start and width (2, CHAIN_STEPS + 1), its v from its ends' values
#: and (scaled) slopes (cubic Hermite, (4, CHAIN_STEPS + 1))
_STEPS = np.linspace(0.0, 1.0, CHAIN_STEPS + 1, dtype=np.float32)
_LINEAR = np.stack([np.ones_like(_STEPS), _STEPS])
_HERMITE = np.stack([2 * _STEPS ** 3 - 3 * _STEPS ** 2 + 1, _STEPS ** 3 - 2 * _STEPS ** 2 + _STEPS,
                     3 * _STEPS ** 2 - 2 * _STEPS ** 3, _STEPS ** 3 - _STEPS ** 2])


def _smooth_chains(*chains: tuple[np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lip chains (``_chain``: (u, v), u ascending) as smooth curves, densely sampled for
    ``np.interp``: the shape-preserving cubic through each chain's points (PCHIP: slopes
    from the weighted harmonic mean of the secants, 0 at a peak, so the curve never bulges
    past its points onto the lip). The warp bends the lips smoothly through their
    landmarks; straight segments between them showed the cavity as a polygon with corners.
    (A few points: scalar arithmetic, then one product with each basis for all.)"""
    rows, starts = [], []
    for u, v in chains:
        us, vs = u.tolist(), v.tolist()
        n = len(us) - 1
        h = [max(us[i + 1] - us[i], 1e-3) for i in range(n)]
        d = [(vs[i + 1] - vs[i]) / h[i] for i in range(n)]
        m = [0.0] * (n + 1)
        for i in range(1, n):
            if d[i - 1] * d[i] > 0:
                w1, w2 = 2 * h[i] + h[i - 1], h[i] + 2 * h[i - 1]
                m[i] = (w1 + w2) / (w1 / d[i - 1] + w2 / d[i])
        for k, ha, hb, da, db in ((0, h[0], h[1], d[0], d[1]), (n, h[-1], h[-2], d[-1], d[-2])):
            e = ((2 * ha + hb) * da - ha * db) / (ha + hb)
            m[k] = 0.0 if e * da <= 0 else 3 * da if da * db < 0 and abs(e) > 3 * abs(da) else e
        rows += [[vs[i], h[i] * m[i], vs[i + 1], h[i] * m[i + 1]] for i in range(n)]
        starts += [[us[i], h[i]] for i in range(n)]
    k = len(chains)
    uu = (np.array(starts, np.float32) @ _LINEAR).reshape(k, -1)
    vv = (np.array(rows, np.float32) @ _HERMITE).reshape(k, -1)
    return list(zip(uu, vv))


def _tooth_row(u: np.ndarray, length: float, pitch: float, show: float) -> tuple[np.ndarray, np.ndarray]:
    """A row of teeth seen from the front across a mouth ``length`` px wide, their middles
    equally spaced in angle round the arch (narrower towards the corners), per pixel:
    ``edge``, 0 in a tooth's middle .. 1 at the seam beside it (squared: each tooth's tip is
    an arc), and the tooth's shade there (its sides turned away from the light, a faint
    seam), both × ``show`` (0 where the teeth are too narrow to show them: they would
    alias into a dotted line)."""
    c = (u * (1.8 / length) - 0.9).clip(-0.9, 0.9)       # sin of the angle round the arch
    q = np.arcsin(c)
    q *= 1.0 / pitch
    q -= np.floor(q)
    e = np.abs(q * 2.0 - 1.0)                               # 0 mid-tooth, 1 at a seam
    e2 = e * e
    tone = 1.0 - (0.1 * show) * e2 - (0.16 * show) * (e * 5.0 - 4.0).clip(0, 1)
    e2 *= show
    return e2, tone


def _mouth(out: np.ndarray, lm: np.ndarray, iod: float, rest_gap: float, tongue: float,
           palette: np.ndarray, colour: float = 1.0, teeth: Teeth | None = None,
           pose: tuple[np.ndarray, np.ndarray] | None = None, shut: float = 0.0,
           cover: float = 0.0) -> None:
    """Draw the mouth interior between the inner lips (smooth curves through their
    landmarks), as much as they opened, in the portrait's own tones (``palette``) as
    saturated as the face (``colour``: 0 gray .. 1 full): a cavity dark at the back and
    in the corners, lit along the lower lip's inner edge, a tongue and the lower teeth at
    wide openings. With ``teeth`` (the portrait's own) those stay where the head puts them
    and the cavity fills only what opened around them; without, upper teeth are drawn.
    ``shut`` (0 .. 1): how far a frown has closed the lips at rest (``FaceRig.frown_shut``):
    the cavity darkens in from that closed rest (the lips parting from a sealed frown show
    a dark mouth, not the photo's lit teeth alone); tongue and lower teeth still wait for
    the opening past the portrait's own gap. ``cover`` (0 .. 1): how far drawn lips
    (``_seal``) close the gap towards their meeting line after; only what they leave is drawn.

    Each part is a weight map over a colour; the maps are laid over each other and turned
    into colour once (one product), not blended colour by colour; sizes that vary little
    across the mouth are taken from its widest gap (a few array passes less a frame)."""
    gap = _chain_gap(lm)
    opened = gap - rest_gap
    dark = gap - rest_gap * (1.0 - shut)                    # opened from the (shut) rest
    if dark <= 0.0 or cover > 0.0 and (1.0 - cover) * gap < 1.0:  # (drawn lips leave < 1 px)
        return
    strength = float(_smoothstep(dark / (CAVITY_RAMP * iod)))
    tongue = min(max(tongue, 0.0), 1.0)
    up, lo = lm[UPPER_IN], lm[LOWER_IN]
    p0, p1 = lm[60], lm[64]
    ax, nrm, length = _frame(p0, p1)
    if length < 2:
        return
    edges = np.concatenate([up, lo])
    if cover > 0.0:  # (the box: what the drawn lips leave open about their meeting line)
        meet = up + LIP_MEET * (lo - up)
        edges = np.concatenate([up + cover * (meet - up), lo + cover * (meet - lo)])
    box = _box(edges, 1.5, out.shape)
    if box is None:
        return
    xs, ys = _pixels(box)
    u, v = _local_xy(xs, ys, p0, ax, nrm)
    (uu, vu), (ul, vl) = _smooth_chains(_chain(up, p0, ax, nrm), _chain(lo, p0, ax, nrm))
    v_up = np.interp(u, uu, vu).astype(np.float32)
    v_lo = np.interp(u, ul, vl).astype(np.float32)
    du = v - v_up                                           # px below the upper lip
    dl = v_lo - v                                           # px above the lower lip
    inside = (du + 0.5).clip(0, 1) * (dl + 0.5).clip(0, 1)
    inside *= (u + 0.5).clip(0, 1) * (length - u + 0.5).clip(0, 1)
    if not inside.any():
        return
    sc = np.abs(u * (2.0 / length) - 1.0)                   # 0 at the centre, 1 at the corners
    corner = 1.0 - 0.5 * sc * sc
    # the cavity: lit along the lower lip's inner edge, dark at the back (away from the
    # lips), in the shadow of the upper lip and teeth over its top half, and darker still
    # into the corners
    shade = du.clip(0.0, 0.5 * gap) * (0.6 / gap) + 0.7
    shade *= corner
    rim = np.exp(np.maximum(dl, 0.0) * (-1.0 / max(1.0, MOUTH_RIM * iod)))
    rim *= shade
    layers, colours = [shade - rim, rim], [palette[0], palette[1]]

    def over(weight: np.ndarray, tone: np.ndarray, rgb: np.ndarray) -> None:
        """Lay ``rgb`` shaded by ``tone`` over what is there, by ``weight``."""
        keep = 1.0 - weight
        for layer in layers:
            layer *= keep
        tone *= weight
        layers.append(tone)
        colours.append(rgb)

    wide = opened / iod                    # opened past the portrait's own gap, inter-ocular units
    if wide > 0.1:
        # the tongue: lying low behind the lower teeth, its back (top) in shadow
        ct = u * (2.5 / length) - 1.25                      # -1 .. 1 across its width
        across = 1.0 - ct * ct
        h_t = (0.42 + 0.2 * tongue) * gap
        into = across * h_t - dl                            # px below its top edge
        gate = min(1.0, (wide - 0.1) / 0.1) * (0.75 + 0.25 * tongue)
        w_t = (into * (gate / 1.5) + 0.5 * gate).clip(0, gate)
        tone = (into * (0.5 / (0.9 * h_t)) + 0.5).clip(0.5, 1.0) * (across * 0.4 + 0.6)
        over(w_t, tone, palette[2])
    tooth_rgb = _TEETH if teeth is None else teeth.rgb
    if teeth is None:
        # upper teeth: a row under the upper lip over the middle of the mouth, in the lip's
        # shadow at the top, rounded tips
        th = min(0.11 * iod, 0.42 * gap)
        edge, tone = _tooth_row(u, length, TOOTH_PITCH[0], _teeth_show(length, TOOTH_PITCH[0]))
        w_u = (th + 0.5 - (0.16 * th) * edge - du).clip(0, 1) * ((0.8 - sc) * 4.0).clip(0, 1)
        tone *= du.clip(0.0, 0.5 * th) * (0.56 / max(th, 1.0)) + 0.72
        tone *= corner * 0.8 + 0.2
        over(w_u, tone, tooth_rgb)
    if (teeth is None or teeth.split >= 1.0) and wide > 0.14:
        # lower teeth (unless the photo shows a row): their tips above the lower lip, in
        # the upper teeth's shadow and the mouth's warmer light, darker towards the corners
        # and where the lip meets them
        lth = min(0.065 * iod, 0.2 * gap)
        edge, tone = _tooth_row(u, length, TOOTH_PITCH[1], _teeth_show(length, TOOTH_PITCH[1]))
        gate = min(1.0, (wide - 0.14) / 0.1)
        w_l = (lth + 0.5 - (0.28 * lth) * edge - dl).clip(0, 1) * ((0.62 - sc) * (5.0 * gate)).clip(0, gate)
        tone *= dl.clip(0.0, lth) * (0.24 / max(lth, 1.0)) + 0.58
        tone *= corner
        over(w_l, tone, tooth_rgb * _IN_MOUTH)
    rgb = np.stack(colours)
    if colour < 1.0:  # as colourful as the face (linear: the colours, not the pixels)
        gray = (rgb @ _LUMA)[:, None]
        rgb = gray + (rgb - gray) * colour
    col = np.stack(layers, -1) @ rgb
    if teeth is None:
        alpha = strength * inside
    else:
        photo, w = _photo_teeth(teeth, xs, ys, p0, ax, nrm, u, v_lo, pose)
        col += (photo - col) * w[..., None]
        # the photo's teeth replace the warp's (stretched) copy of them at once; the cavity
        # darkens in with the opening
        alpha = inside * (w * float(_smoothstep(dark / (TEETH_RAMP * iod))) + (1 - w) * strength)
    _blend(out, box, col, alpha)


def _teeth_show(length: float, pitch: float) -> float:
    """How much of the teeth's shape (tips, seams) to draw: none for middle teeth under
    ~2 px wide, all from ~5 px."""
    return min(1.0, max(0.0, (pitch * 0.5 / 0.9 * length - 2.0) / 3.0))


def _patch(image: np.ndarray, p: np.ndarray, r: int) -> np.ndarray:
    """The pixels (n, 3) of the square of radius ``r`` about ``p``, clipped to the image."""
    cx, cy = int(round(float(p[0]))), int(round(float(p[1])))
    return image[max(0, cy - r):cy + r + 1, max(0, cx - r):cx + r + 1].reshape(-1, 3)


def _blend(out: np.ndarray, box: tuple[int, int, int, int], col: np.ndarray, alpha: np.ndarray) -> None:
    """Lay ``col`` (float, the box's shape) over ``out``'s ``box`` by ``alpha``, in place."""
    x0, y0, x1, y1 = box
    region = out[y0:y1, x0:x1]
    blended = region.astype(np.float32)
    blended += (col - blended) * alpha[..., None]
    blended += 0.5
    np.copyto(region, blended.clip(0, 255).astype(np.uint8))


def _seal(out: np.ndarray, lm: np.ndarray, iod: float, f: float,
          lips: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Draw parted lips meeting (``f`` 0 .. 1 of the way), for /p b m/ or a frown on a
    portrait whose lips are apart at rest: a smooth warp cannot close a gap (the teeth
    between the lips were only squashed, and the spline's lip edges sit a few pixels into
    them), so the lips are drawn over it, as the eyelids are on a blink, from the frame's
    own lips: each lip's outer part (``SEAL_KEEP`` of it, clear of the warp's edge) is
    stretched along the mouth's normal from its outer edge to the meeting line, the
    identity at ``f`` 0 and at the outer edge (no outline), a soft seam where they meet;
    averaged along the mouth as far as stretched (``SEAL_SMOOTH``), and with ``lips``
    (upper, lower colour) the grin's dark corners lifted to the lip's tone (``SEAL_CORNER``)."""
    p0, p1 = lm[48], lm[54]
    ax, nrm, length = _frame(p0, p1)
    if length < 2:
        return
    box = _box(lm[48:60], 1.5, out.shape)
    if box is None:
        return
    xs, ys = _pixels(box)
    u, v = _local_xy(xs, ys, p0, ax, nrm)

    def line(ids: list[int]) -> np.ndarray:
        uc, vc = _chain(lm[ids], p0, ax, nrm)
        return np.interp(u, uc, vc).astype(np.float32)
    v_up, v_lo = line(SEAL_UP_IN), line(SEAL_LO_IN)
    v_lo = np.maximum(v_lo, v_up)
    v_top = np.minimum(line(SEAL_UP_OUT), v_up - 1.0)
    v_bot = np.maximum(line(SEAL_LO_OUT), v_lo + 1.0)
    f = float(_smoothstep(f))
    meet = v_up + LIP_MEET * (v_lo - v_up)
    # each lip grows from its inner edge towards the meeting line, all the way at f = 1;
    # its pixels from its outer edge down (up) to there come from its outer part
    reach_up = v_up + f * (meet - v_up) + 0.5
    reach_lo = v_lo - f * (v_lo - meet) - 0.5
    src_up = v_up - f * (1.0 - SEAL_KEEP) * (v_up - v_top)
    src_lo = v_lo + f * (1.0 - SEAL_KEEP) * (v_bot - v_lo)
    near = (1.0 - np.minimum(u, length - u) * (1.0 / (SEAL_CORNER * iod))).clip(0, 1)
    rim = 0.5 if lips is None else near * (SEAL_CORNER_EDGE * iod) + 0.5
    in_up = (v >= v_top - rim) & (v < meet)
    in_lo = (v >= meet) & (v <= v_bot + rim)
    side = np.clip(u + 0.5, 0, 1) * np.clip(length - u + 0.5, 0, 1)
    a = (np.clip(reach_up - v + 0.5, 0, 1) * in_up + np.clip(v - reach_lo + 0.5, 0, 1) * in_lo) * side
    a *= min(1.0, f / 0.2)
    yy, xx = np.nonzero(a > 0)
    if not len(yy):
        return
    v_s, t_s = v[yy, xx], a[yy, xx]
    up = in_up[yy, xx]
    top, bot = v_top[yy, xx], v_bot[yy, xx]
    # (past the outer edge, by the corners: the pixels where they are)
    k_up = (src_up[yy, xx] - top) / np.maximum(reach_up[yy, xx] - top, 1e-3) - 1
    k_lo = (bot - src_lo[yy, xx]) / np.maximum(bot - reach_lo[yy, xx], 1e-3) - 1
    s_up = v_s + (v_s - top).clip(0, None) * k_up
    s_lo = v_s - (bot - v_s).clip(0, None) * k_lo
    dv = np.where(up, s_up, s_lo) - v_s
    py, px = yy + box[1], xx + box[0]
    # the box and its copy averaged along the rows (±r px: the mouth runs along them), sampled
    # at once; the average taken as far as the lip is stretched there (none at its outer edge)
    x0, y0, x1, y1 = box
    sharp = out[y0:y1, x0:x1].astype(np.float32)
    both = np.concatenate([sharp, sharp], -1)
    r = max(1, int(round(SEAL_SMOOTH * iod)))
    if x1 - x0 > 2 * r:
        both[:, r:-r, 3:] *= 0.5
        both[:, r:-r, 3:] += 0.25 * (sharp[:, :-2 * r] + sharp[:, 2 * r:])
    col = _bilinear(both, xx + dv * float(nrm[0]), yy + dv * float(nrm[1]))
    stretched = np.where(up, v_s - top, bot - v_s) / np.maximum(
        np.where(up, reach_up[yy, xx] - top, bot - reach_lo[yy, xx]), 1e-3)
    col = col[:, :3] + (col[:, 3:] - col[:, :3]) * (stretched.clip(0, 1) * f)[:, None]
    if lips is not None:  # no channel under SEAL_FLOOR of the darker lip's, near the corners
        floor = np.minimum(lips[0], lips[1]) * SEAL_FLOOR
        col += (floor - col).clip(0, None) * (near[yy, xx] * f)[:, None]
    seam = max(0.8, 0.015 * iod)
    col *= (1.0 - SEAL_SEAM * f * np.clip(1 - np.abs(v_s - meet[yy, xx]) / seam, 0, 1))[:, None]
    under = sharp[yy, xx]
    out[py, px] = np.clip(under + (col - under) * t_s[:, None] + 0.5, 0, 255).astype(np.uint8)


def _eyelid(out: np.ndarray, upper: np.ndarray, lower: np.ndarray, brow: np.ndarray,
            blink: float, iod: float) -> None:
    """Draw an eyelid down over one eye: ``blink`` 0 (open) .. 1 (closed).

    The lid is the photo's own: the frame's skin between the brow and the upper lid (as
    the warp left it) is resampled down, along the eye's normal, to the lid's moving
    edge: the clean skin above the lash line stretched over the eye, the photo's lash
    band (lashes, liner, the lid's shadow) squeezed into a thin line at that edge. At the
    top the resampling is the identity (the lid is continuous with the crease and the
    skin above it: no outline); at ``blink`` 0 it is the identity everywhere. The skin
    darkens slightly towards the lash line. No colour of its own: a gray portrait's lid
    stays gray."""
    p0, p1 = upper[0], upper[-1]
    ax, nrm, length = _frame(p0, p1)
    if length < 2:
        return
    uu, vu = _chain(upper, p0, ax, nrm)
    ul, vl = _chain(lower, p0, ax, nrm)
    if uu[-1] < uu[0] + 1:
        return
    ub, vb = _local_xy(brow[:, 0], brow[:, 1], p0, ax, nrm)
    order = np.argsort(ub)
    # how far above the lid the sweep starts: clear of the brow's lower edge
    reach = float(np.clip(0.55 * np.min(vu - np.interp(uu, ub[order], vb[order])),
                          LID_LASH * iod + 1.5, LID_REACH * iod))
    pad = 0.08 * iod + 2
    box = _box(np.concatenate([upper, lower, upper - nrm * (reach + 1.5)]), pad, out.shape)
    if box is None:
        return
    xs, ys = _pixels(box)
    u, v = _local_xy(xs, ys, p0, ax, nrm)
    f = blink ** 1.2
    # the lid's region, roughly, from the chains' extremes: only its pixels are worked on
    sel = ((v > min(0.0, vu.min()) - reach - 0.5) & (v < vl.max() + f * max(0.6, 0.02 * iod) + 1.0))
    yy, xx = np.nonzero(sel)
    u, v = u[yy, xx], v[yy, xx]
    v_up = np.interp(u, uu, vu).astype(np.float32)
    v_lo = np.maximum(np.interp(u, ul, vl).astype(np.float32), v_up)
    v_lid = v_up + f * (v_lo - v_up + max(0.6, 0.02 * iod))  # the lid's edge: closed, just
    # past the lower lid's landmarks (on its rim: a sliver of white shows above them)
    top = v_up - reach
    # past the corners the lid fades out; wider at the outer one (u = 0), whose lash tail
    # comes down with the lid rather than stand up from its end
    margin = 0.06 * length + 0.5
    outer = 0.18 * length + 0.5
    side = np.clip((u + outer) / outer, 0, 1) * np.clip((length + margin - u) / margin, 0, 1)
    feather = max(1.0, 0.04 * iod)
    a = np.clip(v_lid - v + 0.5, 0, 1) * _smoothstep((v - top) / feather) * side
    keep = a > 0
    if not keep.any():
        return
    yy, xx, u, v, a = yy[keep], xx[keep], u[keep], v[keep], a[keep]
    v_up, v_lid, top = v_up[keep], v_lid[keep], top[keep]
    # where each lid pixel comes from (v_src, same u): [top, v_up - lash] (skin) onto
    # [top, v_lid - w], [v_up - lash, v_up + 0.5] (the lash band) onto [v_lid - w, v_lid]
    lash = LID_LASH * iod
    w = lash + 0.5 + f * (max(0.8, LID_LASH_CLOSED * iod) - lash - 0.5)
    in_lash = v >= v_lid - w
    v_src = top + (v - top) * ((v_up - lash - top) / np.maximum(v_lid - w - top, 1e-3))
    v_src[in_lash] = (v_up - lash + (v - (v_lid - w)) * ((lash + 0.5) / w))[in_lash]
    # sampled along the normal only, never from below the pixel itself; the lash band is
    # squeezed ~3×: one tap would alias it into a dotted line, its pixels take three
    # across their source span (one gather for all)
    span = (lash + 0.5) / w / 3.0
    li = np.flatnonzero(in_lash)
    vs = np.concatenate([v_src, v_src[li] - span, v_src[li] + span])
    k = np.concatenate([np.arange(len(v)), li, li])
    dv = np.minimum(vs, v[k]) - v[k]
    py, px = yy + box[1], xx + box[0]
    taps = _bilinear(out, px[k] + dv * float(nrm[0]), py[k] + dv * float(nrm[1]))
    col = taps[:len(v)]
    if len(li):
        n = len(li)
        col[li] = (col[li] + taps[len(v):len(v) + n] + taps[len(v) + n:]) * (1.0 / 3.0)
    # the skin darker towards the lash line
    depth = np.clip((v - top) / np.maximum(v_lid - top, 1e-3), 0, 1)
    col *= (1.0 - LID_SHADE * f * depth ** 1.5)[:, None]
    under = out[py, px].astype(np.float32)
    out[py, px] = np.clip(under + (col - under) * a[:, None] + 0.5, 0, 255).astype(np.uint8)
