"""Labelled 3-D point clouds: procedural shapes sampled from trimesh's primitives, or any folder
of mesh and point files.

Procedural (`procedural_clouds`): ten classes of shapes (SHAPES), each sample a random instance
of its class (class-specific random proportions: a box's three sides, a torus's tube, a cone's
height, ...), `num_points` points drawn uniformly from its surface (area-weighted), then
`distort`ed: a random anisotropic scale (each axis by exp(U[-a, a])), a random rotation
(uniform over SO(3)) when `rotate` is set, centred on the centroid and scaled into the unit
sphere (`normalize`), and Gaussian noise of standard deviation `noise`. Each shape comes from
its own seed (the data seed, the split, its index), so every set is reproducible; sets are
cached in the cache folder.

Folder (`folder_clouds`): `path/CLASS/**/FILE`, one subfolder per class, holding mesh files
(MESH_SUFFIXES, read by trimesh; surface points sampled) or point files (`.xyz`: text rows of
x y z [more columns ignored], spaces or commas, `#` comments; `.npy`: an array of shape (N, 3)
or (N, >3), extra columns ignored). A cloud with more than `num_points` points keeps a random
subset, one with fewer but at least the model's `need` is filled up with repeats of random
points (seeded by the file's path: the same every time). Files under a folder named `test`
(ModelNet's CLASS/test/ layout) form the test set; of the others, those whose relative path
hashes into the lowest `val_fraction` are held out (anyformer/data/split.py).

Legend: `N` clouds, `P` points per cloud.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .split import hash_fraction, held_out

POINT_SUFFIXES = (".xyz", ".npy")
MESH_SUFFIXES = (".obj", ".off", ".ply", ".stl", ".glb", ".gltf", ".3mf", ".dae")
CACHE_VERSION = 1


@dataclass
class LabelledClouds:
    """Point clouds (N, P, 3) float32 with their class labels (N,) int64."""

    points: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def require_trimesh() -> Any:
    """The trimesh module, or an ImportError saying how to install it."""
    try:
        import trimesh
    except ImportError:
        raise ImportError(
            "point clouds from meshes need the trimesh package: pip install trimesh (or pip install 'anyformer[points]')"
        ) from None
    return trimesh


# --------------------------------------------------------------------------- geometry


def rotation_from_quaternion(q: Tensor) -> Tensor:
    """(..., 4) quaternions (w, x, y, z; normalised here) -> (..., 3, 3) rotation matrices."""
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, -1).reshape(*q.shape[:-1], 3, 3)


def random_rotations(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """(n, 3, 3) rotations uniform over SO(3) (Haar measure): normalised Gaussian quaternions
    are uniform on the 3-sphere, which covers SO(3) twice, evenly (Shoemake 1992)."""
    return rotation_from_quaternion(torch.randn(n, 4, generator=generator, dtype=torch.float64)).to(dtype)


def normalize(points: Tensor) -> Tensor:
    """(..., P, 3) -> the clouds centred on their centroid and scaled so the farthest point is at
    distance 1. Raises ValueError for a cloud whose points all coincide."""
    centred = points - points.mean(-2, keepdim=True)
    radius = centred.norm(dim=-1).amax(-1, keepdim=True)[..., None]  # (..., 1, 1)
    if bool((radius <= 1e-12).any()):
        raise ValueError("a point cloud has all its points at one place; it has no shape to classify")
    return centred / radius


def distort(points: Tensor, generator: torch.Generator, *, rotate: bool, anisotropy: float, noise: float) -> Tensor:
    """A random variant of one cloud (P, 3): each axis scaled by exp(U[-anisotropy, anisotropy]),
    rotated uniformly over SO(3) when `rotate`, normalised into the unit sphere, plus Gaussian
    noise of standard deviation `noise`. float32 out."""
    x = points.double()
    x = x * torch.exp((torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1) * anisotropy)
    if rotate:
        x = x @ random_rotations(1, generator)[0].T
    x = normalize(x)
    return (x + noise * torch.randn(x.shape, generator=generator, dtype=torch.float64)).float()


# --------------------------------------------------------------------------- procedural shapes


def _star_prism(trimesh: Any, rng: np.random.Generator) -> Any:
    """A five-pointed star (inner radius 0.35-0.6 of the outer) extruded to a height of 0.2-1."""
    ang = np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.35, 0.6))
    outline = np.c_[rad * np.cos(ang), rad * np.sin(ang)]  # (10, 2), counter-clockwise
    vertices = np.vstack([[0.0, 0.0], outline])
    faces = np.array([[0, 1 + i, 1 + (i + 1) % 10] for i in range(10)])  # a fan from the centre
    return trimesh.creation.extrude_triangulation(vertices, faces, height=rng.uniform(0.2, 1.0))


# name -> (trimesh module, rng) -> mesh in its own frame; the class-specific random proportions
SHAPES: dict[str, Callable[[Any, np.random.Generator], Any]] = {
    "box": lambda t, r: t.creation.box(extents=r.uniform(0.4, 2.0, 3)),
    "sphere": lambda t, r: t.creation.icosphere(subdivisions=3),
    "cylinder": lambda t, r: t.creation.cylinder(radius=1.0, height=r.uniform(0.5, 3.0), sections=48),
    "cone": lambda t, r: t.creation.cone(radius=1.0, height=r.uniform(0.8, 3.0), sections=48),
    "capsule": lambda t, r: t.creation.capsule(height=r.uniform(1.5, 4.0), radius=1.0),
    "torus": lambda t, r: t.creation.torus(major_radius=1.0, minor_radius=r.uniform(0.15, 0.5)),
    "annulus": lambda t, r: t.creation.annulus(r_min=r.uniform(0.4, 0.8), r_max=1.0, height=r.uniform(0.2, 1.0)),
    "triangular_prism": lambda t, r: t.creation.cylinder(radius=1.0, height=r.uniform(0.5, 3.0), sections=3),
    "pyramid": lambda t, r: t.creation.cone(radius=1.0, height=r.uniform(0.7, 2.5), sections=4),
    "star_prism": _star_prism,
}


@dataclass
class ShapeSettings:
    """How procedural clouds are drawn: points per cloud and the distortions of `distort`."""

    num_points: int = 1024
    rotate: bool = True
    anisotropy: float = 0.2
    noise: float = 0.01


def sample_shape(name: str, seed: int, settings: ShapeSettings) -> Tensor:
    """One random cloud (P, 3) of class `name` (a key of SHAPES), fixed by `seed`."""
    trimesh = require_trimesh()
    rng = np.random.default_rng(seed)
    mesh = SHAPES[name](trimesh, rng)
    points, _ = trimesh.sample.sample_surface(mesh, settings.num_points, seed=int(rng.integers(2**31)))
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return distort(torch.from_numpy(np.asarray(points)), generator, rotate=settings.rotate,
                   anisotropy=settings.anisotropy, noise=settings.noise)


def shape_set(per_class: int, settings: ShapeSettings, seed: int, split: str) -> LabelledClouds:
    """`per_class` clouds of every class in SHAPES (labels in its order, classes interleaved),
    each from the seed (`seed`, the split's name, its index)."""
    names = list(SHAPES)
    base = int.from_bytes(hashlib.sha1(f"{seed}/{split}".encode()).digest()[:4], "big")
    clouds, labels = [], []
    for i in range(per_class * len(names)):
        label = i % len(names)
        clouds.append(sample_shape(names[label], int(np.random.SeedSequence([base, i]).generate_state(1)[0]), settings))
        labels.append(label)
    return LabelledClouds(torch.stack(clouds), torch.tensor(labels, dtype=torch.long))


def procedural_clouds(
    counts: dict[str, int], settings: ShapeSettings, seed: int, cache_dir: str | Path | None = None
) -> dict[str, LabelledClouds]:
    """The sets `counts` names (split -> clouds per class), from the cache when it holds them."""
    from .tokens import default_cache_dir

    key = repr((CACHE_VERSION, sorted(counts.items()), settings, seed, list(SHAPES)))
    path = Path(cache_dir or default_cache_dir()).expanduser() / f"point-shapes-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return {k: LabelledClouds(v["points"], v["labels"]) for k, v in saved.items()}
    sets = {split: shape_set(n, settings, seed, split) for split, n in counts.items()}
    _save_atomic({k: {"points": v.points, "labels": v.labels} for k, v in sets.items()}, path)
    return sets


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(obj)}")
    torch.save(obj, tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------- files


def read_point_file(path: str | Path) -> np.ndarray:
    """The points (N, 3) float64 of a `.xyz` or `.npy` file (extra columns dropped)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{str(path)!r} is empty; a point file holds x, y, z per point")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # EOFError: a truncated file
            raise ValueError(f"{str(path)!r} is not a NumPy .npy array file ({e or 'it ends early'})") from None
        what = "an array"
    else:
        text = path.read_text(errors="replace").replace(",", " ")
        if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
            raise ValueError(f"{str(path)!r} holds no points (only comments or blank lines); an .xyz file holds 'x y z' per row")
        try:
            array = np.loadtxt(io.StringIO(text), comments="#", ndmin=2, dtype=np.float64)
        except ValueError as e:
            raise ValueError(f"{str(path)!r} is not an .xyz text file of numeric rows 'x y z' ({e})") from None
        what = "rows"
    if array.ndim != 2 or array.shape[1] < 3 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(
            f"{str(path)!r} holds {what} of shape {array.shape} and dtype {array.dtype}; a point file holds numbers "
            "of shape (points, 3): x, y, z per row (further columns, such as normals, are ignored)"
        )
    points = array[:, :3].astype(np.float64)
    if not np.isfinite(points).all():
        raise ValueError(f"{str(path)!r} has coordinates that are NaN or infinite")
    return points


def read_mesh_points(path: str | Path, num_points: int, seed: int) -> np.ndarray:
    """`num_points` points (N, 3) drawn uniformly from the surface of the mesh file at `path`
    (all its vertices instead when it has no faces: a point-cloud .ply)."""
    trimesh = require_trimesh()
    try:
        obj = trimesh.load(str(path))
    except Exception as e:  # trimesh raises many kinds for unreadable files
        raise ValueError(f"trimesh cannot read {str(path)!r} as a mesh: {type(e).__name__}: {e}") from None
    if isinstance(obj, trimesh.Scene):
        if not obj.geometry:
            raise ValueError(f"{str(path)!r} is an empty scene: no mesh to sample points from")
        obj = obj.to_geometry() if hasattr(obj, "to_geometry") else obj.dump(concatenate=True)
    if isinstance(obj, trimesh.Trimesh) and len(obj.faces) and obj.area > 0:
        points, _ = trimesh.sample.sample_surface(obj, num_points, seed=seed)
        return np.asarray(points, dtype=np.float64)
    vertices = getattr(obj, "vertices", None)
    if vertices is None or len(vertices) == 0:
        raise ValueError(f"{str(path)!r} holds no surface and no points ({type(obj).__name__})")
    return np.asarray(vertices, dtype=np.float64)


def fit_points(points: np.ndarray, num_points: int, need: int, rng: np.random.Generator, where: str) -> np.ndarray:
    """Exactly `num_points` rows of `points`: a random subset, or all of them plus random repeats
    when there are fewer (but at least `need`, the model's requirement; else ValueError)."""
    n = len(points)
    if n < need:
        raise ValueError(
            f"{where} has {n} points, fewer than the {need} the model's tokenization needs (model.options.num_groups "
            "and group_size); remove the file, or lower those settings"
        )
    if n >= num_points:
        return points[rng.choice(n, num_points, replace=False)]
    return np.concatenate([points, points[rng.choice(n, num_points - n, replace=True)]])


def read_cloud(path: str | Path, num_points: int, need: int, *, seed: int | None = None) -> Tensor:
    """One point or mesh file as a normalised cloud (num_points, 3) float32; `seed` (default:
    from the path) fixes the sampled points."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no point or mesh file at {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix not in POINT_SUFFIXES + MESH_SUFFIXES:
        raise ValueError(
            f"{str(path)!r} is neither a point file ({', '.join(POINT_SUFFIXES)}) nor a mesh file ({', '.join(MESH_SUFFIXES)})"
        )
    seed = int(hash_fraction(str(path)) * 2**62) if seed is None else seed
    rng = np.random.default_rng(seed)
    raw = read_point_file(path) if suffix in POINT_SUFFIXES else read_mesh_points(path, num_points, int(rng.integers(2**31)))
    return normalize(torch.from_numpy(fit_points(raw, num_points, need, rng, repr(str(path))))).float()


def folder_classes(path: str | Path) -> list[str]:
    """The class names of a folder data set: its subfolders, sorted (raises when there are
    fewer than two)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={str(root)!r} is not a folder; give a folder with one subfolder of point or mesh files per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(
            f"{str(root)!r} has {len(classes)} class subfolder(s) ({', '.join(classes) or 'none'}); a classification data set "
            "needs one subfolder per class, at least two, each holding point files (.xyz, .npy) or mesh files"
        )
    return classes


def folder_files(path: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, label)]) of a folder data set; raises for a class without files."""
    root = Path(path)
    classes = folder_classes(root)
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in POINT_SUFFIXES + MESH_SUFFIXES)
        if not found:
            raise ValueError(
                f"class folder {str(root / name)!r} holds no point files ({', '.join(POINT_SUFFIXES)}) or mesh files "
                f"({', '.join(MESH_SUFFIXES)}); remove it or add files"
            )
        files += [(p, label) for p in found]
    if any(p.suffix.lower() in MESH_SUFFIXES for p, _ in files):
        require_trimesh()
    return classes, files


def folder_clouds(
    path: str | Path, num_points: int, need: int, val_fraction: float, cache_dir: str | Path | None = None
) -> tuple[dict[str, LabelledClouds], list[str]]:
    """({"train", "val", and "test" when the folder has test/ subfolders}, class names) of a
    folder data set, every file read once (then cached, keyed by the files' names, sizes and
    modification times)."""
    from .tokens import default_cache_dir

    root = Path(path)
    classes, files = folder_files(root)
    rels = [p.relative_to(root).as_posix() for p, _ in files]
    stamp = [(r, p.stat().st_size, p.stat().st_mtime_ns) for r, (p, _) in zip(rels, files)]
    key = repr((CACHE_VERSION, str(root.resolve()), stamp, num_points, need))
    cache = Path(cache_dir or default_cache_dir()).expanduser() / f"point-folder-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return {k: LabelledClouds(v["points"], v["labels"]) for k, v in saved["sets"].items()}, classes
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    clouds = []
    for i, ((p, _), rel) in enumerate(zip(files, rels)):
        clouds.append(read_cloud(p, num_points, need, seed=int(hash_fraction(rel) * 2**62)))
        parts = rel.split("/")
        split = "test" if any(d.lower() == "test" for d in parts[1:-1]) else "val" if held_out(rel, val_fraction) else "train"
        splits[split].append(i)
    for split in ("train", "val"):
        if not splits[split]:
            raise ValueError(
                f"data.val_fraction={val_fraction} leaves the {split} split of {str(root)!r} empty ({len(splits['train'])} "
                f"training, {len(splits['val'])} held-out files); choose a fraction in (0, 1) that fits the number of files"
            )
    points, labels = torch.stack(clouds), torch.tensor([label for _, label in files], dtype=torch.long)
    sets = {k: LabelledClouds(points[v], labels[v]) for k, v in splits.items() if v}
    _save_atomic({"sets": {k: {"points": v.points, "labels": v.labels} for k, v in sets.items()}, "classes": classes}, cache)
    return sets, classes


def rotate_clouds(points: Tensor, seed: int) -> Tensor:
    """(N, P, 3) clouds each turned by its own random rotation (uniform over SO(3); fixed by `seed`)
    about the origin."""
    rotations = random_rotations(len(points), torch.Generator().manual_seed(seed), dtype=points.dtype)  # (N, 3, 3)
    return points @ rotations.transpose(1, 2)


def shuffle_points(points: Tensor, seed: int) -> Tensor:
    """(N, P, 3) clouds with each cloud's points in its own random order (fixed by `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(points.shape[1], generator=generator) for _ in range(len(points))])  # (N, P)
    return points.gather(1, order[..., None].expand(-1, -1, 3))


__all__ = [
    "LabelledClouds", "SHAPES", "ShapeSettings", "distort", "folder_classes", "folder_clouds", "normalize",
    "procedural_clouds", "random_rotations", "read_cloud", "rotate_clouds", "shuffle_points",
]
