"""Triangle rasterization in pure PyTorch: the reference, the CPU fallback, and the setup / resolve passes that the
Triton path shares.

Conventions
  pos      [V, 3] float: x along the width (columns), y along the height (rows, downwards as in an image), both in
           pixels with pixel (row i, col j) centred at (j + 0.5, i + 0.5); z = depth, the smallest z wins.
  faces    [F, 3] integer vertex indices. Both windings are drawn (no back-face culling).
  face_id  [H, W] int32, the index into `faces` of the triangle seen at each pixel centre, -1 where none.
  bary     [H, W, 3] float32, the weights of vertices faces[f, 0], faces[f, 1], faces[f, 2] at the pixel centre
           (each >= 0, summing to 1 up to float rounding; 0 where empty). They are linear in screen space (no
           perspective correction), and so is the depth used for the z-test.

Batches (`rasterize_batch_reference`): many independent views of one size in one pass. face_view [F] names the
view (0 .. views - 1) each face is drawn into; face_id [views, H, W] indexes the whole `faces`, bary is
[views, H, W, 3]. Each view is its own image: a face's coordinates are its view's pixels, its bounding box is
clipped to its view, and only faces of one view compete at its pixels, so every view comes out bit for bit as
`rasterize` of that view's faces alone (in their order in `faces`) would give.

Exactness. x and y are snapped to 1/256 pixel (`SUBPIXEL`), as hardware rasterizers do, and the edge functions
are evaluated in int64, so coverage is decided exactly and identically by every backend:
  * edge rule (top-left): a pixel centre exactly on an edge belongs to the triangle for which that edge is a top
    edge (horizontal, interior below) or a left edge (interior to its right), in image coordinates (y down).
    Two triangles that share an edge, one on each side, therefore cover every pixel centre along it exactly once.
  * tie rule: at a pixel the smallest depth (float32) wins; equal depths go to the smallest face index.
  * skipped: triangles with zero area after snapping, a non-finite coordinate, or no pixel centre in the image.
The snapped coordinates must stay within +-2^20 pixels (`MAX_COORD`) so that the edge functions fit in int64
(per view: views never share coordinates, only the buffer). At most 2^31 - 1 faces per call, batch included:
the packed key below holds a face's row in its low 32 bits and face_id is int32.

Passes: `setup` (per-triangle integer edge coefficients and clipped bounding boxes) -> coverage (per covered
pixel centre the packed key (depth, triangle) is min-reduced into a [H * W] int64 buffer: `coverage_reference`
here, an atomic-min Triton kernel in `triton.py`) -> `resolve` (face ids and barycentrics of the winners).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUBPIXEL = 256  # snapping grid: 1/256 pixel, 8 fractional bits
MAX_COORD = 2**20  # |x|, |y| in pixels; keeps the int64 edge functions far from overflow
MAX_SIZE = 2**15  # height, width; a clipped bounding box then has < 2^30 pixels (int32 in the Triton kernel)
MAX_FACES = 2**31 - 1  # per call (all views of a batch): the key's low 32 bits hold the face's row; face_id int32
EMPTY_KEY = torch.iinfo(torch.int64).max
_LOW32 = 0xFFFFFFFF


@dataclass
class Raster:
    """The result of `rasterize`: face_id [H, W] int32 (-1 = empty), bary [H, W, 3] float32; of
    `rasterize_batch`: face_id [views, H, W], bary [views, H, W, 3]."""

    face_id: torch.Tensor
    bary: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:  # [..., H, W] bool, True where a triangle covers the pixel centre
        return self.face_id >= 0


@dataclass
class Setup:
    """Per drawable triangle (T of them, in increasing face order), everything the coverage pass needs.

    face  [T] int64   index into `faces`
    coef  [T, 3, 4] int64   edge k (opposite vertex k): A, B, C, bias with E_k(px, py) = A px + B py + C in subpixel
                      units, oriented so that the interior is E_k > 0; bias 1 on owned (top/left) edges, else 0;
                      a pixel centre is covered when E_k + bias > 0 for all k; E_k / (2 area) = weight of vertex k
    zw    [T, 4] float32   z0, z1, z2, 1 / (2 area in subpixel units squared)
    box   [T, 4] int64   first column, first row, width, height of the pixel-centre bounding box, clipped to the view
    view  [T] int64   the view (image band of the key buffer) the triangle is drawn into; 0 for a single view
    """

    face: torch.Tensor
    coef: torch.Tensor
    zw: torch.Tensor
    box: torch.Tensor
    view: torch.Tensor


def check_raster_inputs(pos: torch.Tensor, faces: torch.Tensor, height: int, width: int, views: int = 1) -> None:
    if pos.ndim != 2 or pos.shape[1] != 3 or not pos.is_floating_point():
        raise ValueError(
            f"pos must be a float [V, 3] tensor (x, y in pixels, z = depth); got {pos.dtype} {tuple(pos.shape)}. "
            "For a UV raster pass (u * width, v * height, 0)."
        )
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.is_floating_point() or faces.dtype == torch.bool:
        raise ValueError(f"faces must be an integer [F, 3] tensor; got {faces.dtype} {tuple(faces.shape)}")
    if faces.device != pos.device:
        raise ValueError(f"pos is on {pos.device} but faces on {faces.device}; move both to one device")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE:
            raise ValueError(f"{name} must be an int in [1, {MAX_SIZE}]; got {value!r}")
    check_face_count(faces.shape[0], views)
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= pos.shape[0]):
        raise ValueError(
            f"faces index vertices {int(faces.min())}..{int(faces.max())} but pos has {pos.shape[0]} rows; "
            "faces must index rows of pos (0-based)"
        )


def check_face_count(count: int, views: int = 1) -> None:
    """At most MAX_FACES faces per call, all views of a batch together (the key's face bits, int32 face_id)."""
    if count > MAX_FACES:
        where = f" over {views} views" if views > 1 else ""
        raise ValueError(
            f"at most 2^31 - 1 faces can be rasterized in one call (the packed (depth, face) key keeps the face in "
            f"32 bits and face_id is int32); got {count} faces{where}: split the mesh or render fewer views per call"
        )


def check_batch_inputs(
    pos: torch.Tensor, faces: torch.Tensor, face_view: torch.Tensor, views: int, height: int, width: int
) -> None:
    """The arguments of `rasterize_batch`: those of `rasterize`, then the view count and face_view."""
    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise ValueError(f"views must be an int >= 1 (the number of images in the batch); got {views!r}")
    check_raster_inputs(pos, faces, height, width, views)
    if not torch.is_tensor(face_view):
        raise ValueError(f"face_view must be an integer [F] tensor (a view index per face); got {type(face_view)}")
    if face_view.shape != faces.shape[:1] or face_view.is_floating_point() or face_view.dtype == torch.bool:
        raise ValueError(
            f"face_view must be an integer [F] tensor, one view index per face ([{faces.shape[0]}] here); "
            f"got {face_view.dtype} {tuple(face_view.shape)}"
        )
    if face_view.device != faces.device:
        raise ValueError(f"faces are on {faces.device} but face_view on {face_view.device}; move both to one device")
    if face_view.numel() and (int(face_view.min()) < 0 or int(face_view.max()) >= views):
        raise ValueError(
            f"face_view names views {int(face_view.min())}..{int(face_view.max())} but views is {views}; "
            f"each face's view must lie in 0..{views - 1}"
        )


def setup(
    pos: torch.Tensor, faces: torch.Tensor, height: int, width: int, face_view: torch.Tensor | None = None
) -> Setup:
    """Snap, orient and bound every triangle; drop the ones that cannot cover a pixel centre (see module doc).
    face_view [F] (a batch): each face's view, carried to `Setup.view`; None: every face in view 0."""
    tri = pos[faces.long()]  # [F, 3 vertices, 3]
    finite = torch.isfinite(tri).flatten(1).all(1)
    xy = torch.where(finite[:, None, None], tri[..., :2].double(), 0.0)
    if xy.numel() and float(xy.abs().max()) > MAX_COORD:
        raise ValueError(
            f"vertex x, y must lie within +-{MAX_COORD} pixels; got {float(xy.abs().max()):.4g}. "
            "Clip or cull triangles far outside the image (e.g. behind the camera) before rasterizing."
        )
    q = torch.round(xy * SUBPIXEL).long()  # [F, 3, 2] snapped, exact in int64
    x, y = q[..., 0], q[..., 1]
    x1, y1, x2, y2 = x.roll(-1, 1), y.roll(-1, 1), x.roll(-2, 1), y.roll(-2, 1)  # edge k runs vertex k+1 -> k+2
    dx, dy = x2 - x1, y2 - y1  # [F, 3]
    area2 = dx[:, 0] * (y[:, 0] - y1[:, 0]) - dy[:, 0] * (x[:, 0] - x1[:, 0])  # E_0 at vertex 0 = 2 * signed area
    sign = area2.sign()[:, None]
    dx, dy = dx * sign, dy * sign
    a, b = -dy, dx
    c = dy * x1 - dx * y1  # E_k = dx (py - y1) - dy (px - x1): a cross product, > 0 inside after orienting
    owned = (dy < 0) | ((dy == 0) & (dx > 0))

    half = SUBPIXEL // 2
    col0 = torch.div(x.amin(1) - half + SUBPIXEL - 1, SUBPIXEL, rounding_mode="floor").clamp(min=0)
    col1 = torch.div(x.amax(1) - half, SUBPIXEL, rounding_mode="floor").clamp(max=width - 1)
    row0 = torch.div(y.amin(1) - half + SUBPIXEL - 1, SUBPIXEL, rounding_mode="floor").clamp(min=0)
    row1 = torch.div(y.amax(1) - half, SUBPIXEL, rounding_mode="floor").clamp(max=height - 1)
    keep = finite & (area2 != 0) & (col1 >= col0) & (row1 >= row0)
    face = keep.nonzero().squeeze(1)

    coef = torch.stack([a, b, c, owned.long()], dim=2)[face]  # [T, 3, 4]
    inv_area2 = (1.0 / area2[face].abs().double()).float()
    zw = torch.cat([tri[face, :, 2].float(), inv_area2[:, None]], dim=1)  # [T, 4]
    box = torch.stack([col0, row0, col1 - col0 + 1, row1 - row0 + 1], dim=1)[face]
    view = torch.zeros_like(face) if face_view is None else face_view.long()[face]
    return Setup(face=face, coef=coef.contiguous(), zw=zw.contiguous(), box=box.contiguous(), view=view)


def depth_keys(e: list[torch.Tensor], z: list[torch.Tensor], inv: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """e: 3 x [N] int64 unbiased edge values, z: 3 x [N] vertex depths, inv [N], tri [N] setup rows -> [N] int64.

    depth = w0 z0 + w1 z1 + w2 z2 with w_k = float32(e_k) * inv, in exactly this float32 order (the Triton kernel
    runs without FMA contraction, so both backends produce the same bits). The key packs the depth as an
    order-preserving int32 (negative floats mirrored, -0 mapped to +0) above the triangle row, so an int64 min
    picks the nearest triangle and, on equal depth, the smallest face index.
    """
    w = [ek.float() * inv for ek in e]
    depth = w[0] * z[0] + w[1] * z[1] + w[2] * z[2]
    bits = depth.view(torch.int32)
    ordered = torch.where(bits < 0, (bits ^ 0x7FFFFFFF) + 1, bits)
    return (ordered.long() << 32) | tri


def _columns(st: Setup, rows: torch.Tensor) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Setup rows gathered as 1-D columns (the fast gather of torch on CPU): coef[edge][A, B, C, bias] and
    zw[z0, z1, z2, inv], each [N]."""
    coef = st.coef.permute(1, 2, 0).contiguous()  # [3, 4, T]
    zw = st.zw.T.contiguous()  # [4, T]
    return [[c.index_select(0, rows) for c in edge] for edge in coef], [c.index_select(0, rows) for c in zw]


def coverage_reference(st: Setup, height: int, width: int, views: int = 1, chunk: int = 1 << 20) -> torch.Tensor:
    """-> [views * H * W] int64: per pixel of each view the min over the view's covering triangles of
    `depth_keys`, EMPTY_KEY where none.

    Vectorised over (triangle, bounding-box row) pairs: the pairs are bucketed by row length rounded up to a power
    of two and each bucket is evaluated as dense [rows, length] blocks (at most 2x padding, no per-pixel
    gathers), about `chunk` candidate pixels at a time, so memory stays bounded whatever the triangle sizes.
    """
    dev = st.face.device
    key = torch.full((views * height * width,), EMPTY_KEY, dtype=torch.int64, device=dev)
    if st.face.numel() == 0:
        return key
    col0, row0, bw, bh = st.box.unbind(1)
    tri = torch.repeat_interleave(torch.arange(st.face.shape[0], device=dev), bh)  # [R] one per (triangle, row)
    row = row0[tri] + torch.arange(tri.shape[0], device=dev) - (torch.cumsum(bh, 0) - bh)[tri]
    bucket = torch.ceil(torch.log2(bw[tri].double())).long()  # row length <= 2^bucket
    order = torch.argsort(bucket, stable=True)
    tri, row, counts = tri[order], row[order], torch.bincount(bucket).tolist()
    coef, zw = _columns(st, tri)  # coef[edge][A, B, C, bias], zw[z0, z1, z2, inv]: [R] each
    c0, n = col0[tri], bw[tri]
    px0, py = c0 * SUBPIXEL + SUBPIXEL // 2, row * SUBPIXEL + SUBPIXEL // 2
    e_row = [a * px0 + b * py + c + bias for a, b, c, bias in coef]  # 3 x [R] biased, at the row's first pixel
    step = [a * SUBPIXEL for a, _, _, _ in coef]  # 3 x [R] change per pixel to the right
    start = (st.view[tri] * height + row) * width + c0  # [R] flat index of the row's first pixel (in its view)
    lo = 0
    for k, count in enumerate(counts):
        span, off = 1 << k, torch.arange(1 << k, device=dev)
        rows_per_chunk = max(1, chunk // span)
        for a in range(lo, lo + count, rows_per_chunk):
            b = min(lo + count, a + rows_per_chunk)
            e = [e_row[j][a:b, None] + step[j][a:b, None] * off for j in range(3)]  # 3 x [Rc, span]
            inside = (e[0] > 0) & (e[1] > 0) & (e[2] > 0) & (off < n[a:b, None])
            flat = inside.view(-1).nonzero().squeeze(1)
            r, o = a + (flat >> k), flat & (span - 1)
            e = [e[j].view(-1).index_select(0, flat) - coef[j][3].index_select(0, r) for j in range(3)]  # unbiased
            z = [zw[j].index_select(0, r) for j in range(4)]
            keys = depth_keys(e, z[:3], z[3], tri.index_select(0, r))
            key.scatter_reduce_(0, start.index_select(0, r) + o, keys, reduce="amin")
        lo += count
    return key


def resolve(
    key: torch.Tensor, st: Setup, height: int, width: int, views: int | None = None, chunk: int = 1 << 20
) -> Raster:
    """[views * H * W] keys -> Raster: the winning triangle's face index and its barycentrics at each pixel centre,
    [H, W] for views=None (one view), else [views, H, W]."""
    n = key.shape[0]
    face_id = torch.full((n,), -1, dtype=torch.int32, device=key.device)
    bary = torch.zeros(n, 3, dtype=torch.float32, device=key.device)
    hit = (key != EMPTY_KEY).nonzero().squeeze(1)
    for lo in range(0, hit.shape[0], chunk):
        pix = hit[lo : lo + chunk]
        tri = key.index_select(0, pix) & _LOW32
        coef, zw = _columns(st, tri)
        local = pix if views is None else pix % (height * width)  # the pixel within its view
        px = (local % width) * SUBPIXEL + SUBPIXEL // 2
        py = torch.div(local, width, rounding_mode="floor") * SUBPIXEL + SUBPIXEL // 2
        e = [a * px + b * py + c for a, b, c, _ in coef]  # 3 x [N], all >= 0
        bary[pix] = torch.stack([ek.float() * zw[3] for ek in e], 1)
        face_id[pix] = st.face.index_select(0, tri).int()
    shape = (height, width) if views is None else (views, height, width)
    return Raster(face_id=face_id.view(shape), bary=bary.view(*shape, 3))


def rasterize_reference(pos: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> Raster:
    """pos [V, 3], faces [F, 3] -> Raster [H, W] (conventions in the module doc); inputs already checked."""
    st = setup(pos, faces, height, width)
    return resolve(coverage_reference(st, height, width), st, height, width)


def rasterize_batch_reference(
    pos: torch.Tensor, faces: torch.Tensor, face_view: torch.Tensor, views: int, height: int, width: int
) -> Raster:
    """pos [V, 3], faces [F, 3], face_view [F] -> Raster [views, H, W] (module doc); inputs already checked."""
    st = setup(pos, faces, height, width, face_view)
    return resolve(coverage_reference(st, height, width, views), st, height, width, views)


def interpolate(attr: torch.Tensor, faces: torch.Tensor, raster: Raster) -> torch.Tensor:
    """attr [V, C] float, faces [F, 3], raster -> [H, W, C] ([views, H, W, C] for a batch): the barycentric blend
    of the covering face's vertex attributes at each pixel centre, 0 where empty. Pure PyTorch on any device (a
    gather and a weighted sum)."""
    if attr.ndim != 2 or not attr.is_floating_point():
        raise ValueError(f"attr must be a float [V, C] tensor (a row per vertex); got {attr.dtype} {tuple(attr.shape)}")
    if attr.device != raster.face_id.device or faces.device != attr.device:
        raise ValueError(
            f"attr ({attr.device}), faces ({faces.device}) and the raster ({raster.face_id.device}) must share a device"
        )
    if faces.numel() and int(faces.max()) >= attr.shape[0]:
        raise ValueError(f"faces index vertex {int(faces.max())} but attr has only {attr.shape[0]} rows")
    out = attr.new_zeros(*raster.face_id.shape, attr.shape[1])
    mask = raster.face_id >= 0
    if faces.numel() and int(raster.face_id.max()) >= faces.shape[0]:
        raise ValueError(f"the raster names face {int(raster.face_id.max())} but faces has {faces.shape[0]} rows")
    corners = attr[faces.long()[raster.face_id[mask].long()]]  # [N, 3, C]
    out[mask] = (corners * raster.bary[mask].to(attr.dtype)[..., None]).sum(1)
    return out
