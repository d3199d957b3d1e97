"""Point clouds: farthest-point sampling and k-nearest neighbours against brute-force
references, invariance of the model to point order, proper random rotations, the procedural
shapes and the folder loader, training with exact resume, `eval` and `classify`, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from anyformer.config import ConfigError, ModelConfig, apply_overrides, from_dict, load_yaml, save_yaml, to_dict
from anyformer.models import build_model
from anyformer.models.point_groups import farthest_point_sample, group_points, knn
from anyformer.training import Trainer
from anyformer.training.config import RunConfig, default_run_config
from tests.helpers import REPO
from tests.training_helpers import interrupted_copy

trimesh = pytest.importorskip("trimesh", reason="point clouds from meshes need trimesh (pip install trimesh)")

from anyformer.data.point_clouds import (  # noqa: E402  (after the skip: the module needs trimesh at run time)
    SHAPES, ShapeSettings, distort, folder_clouds, normalize, random_rotations, read_cloud, require_trimesh, sample_shape,
)


def brute_force_fps(points: list[list[float]], k: int) -> list[int]:
    """Greedy farthest-point sampling by plain loops: start at the point farthest from the
    centroid, then repeatedly the unchosen point farthest from its nearest chosen one."""
    n = len(points)
    centroid = [sum(p[j] for p in points) / n for j in range(3)]
    chosen = [max(range(n), key=lambda i: math.dist(points[i], centroid))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(math.dist(points[i], points[c]) for c in chosen)))
    return chosen


def tiny_model_config(**points) -> ModelConfig:
    return ModelConfig(
        arch="point_cloud", dim=32, num_layers=2, attention=dict(num_heads=2), ffn=dict(hidden_dim=64), positional=dict(kind="none"),
        head=dict(kind="sequence_classification", num_labels=5),
        options=dict(num_points=64, num_groups=8, group_size=6, widths=[16, 16], position_hidden=16) | points,
    )


# --------------------------------------------------------------------------- grouping


@pytest.mark.parametrize("n,k", [(7, 7), (12, 5), (30, 10)])
def test_farthest_point_sampling_matches_brute_force(n, k) -> None:
    clouds = torch.randn(4, n, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    got = farthest_point_sample(clouds, k)
    assert got.shape == (4, k)
    for cloud, idx in zip(clouds, got.tolist()):
        assert idx == brute_force_fps(cloud.tolist(), k)
        assert len(set(idx)) == k
        # each centre is as far from the centres before it as any point still unchosen is
        pts = cloud.tolist()
        for i in range(1, k):
            gap = min(math.dist(pts[idx[i]], pts[c]) for c in idx[:i])
            best = max(min(math.dist(pts[j], pts[c]) for c in idx[:i]) for j in range(n) if j not in idx[:i])
            assert gap == pytest.approx(best, rel=1e-12)


def test_farthest_point_sampling_is_invariant_to_point_order() -> None:
    cloud = torch.randn(2, 50, 3, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    a = torch.stack([c[i] for c, i in zip(cloud, farthest_point_sample(cloud, 12))])
    b = torch.stack([c[i] for c, i in zip(cloud[:, perm], farthest_point_sample(cloud[:, perm], 12))])
    assert torch.equal(a, b)


def test_farthest_point_sampling_never_repeats_a_point_of_a_cloud_with_duplicates() -> None:
    corners = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    cloud = corners.repeat(3, 1)[None]  # 12 points at 4 places
    idx = farthest_point_sample(cloud, 10)[0].tolist()
    assert len(set(idx)) == 10
    assert {tuple(cloud[0, i].tolist()) for i in idx[:4]} == {tuple(c) for c in corners.tolist()}  # every place first


def test_knn_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    points, queries = torch.randn(2, 40, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    got = knn(points, queries, 7)
    for b in range(2):
        for q in range(5):
            dists = [math.dist(queries[b, q].tolist(), p) for p in points[b].tolist()]
            assert got[b, q].tolist() == sorted(range(40), key=dists.__getitem__)[:7]


def test_groups_are_the_neighbours_relative_to_their_centre() -> None:
    cloud = torch.randn(3, 40, 3, generator=torch.Generator().manual_seed(4))
    centres, groups = group_points(cloud, 6, 5)
    assert centres.shape == (3, 6, 3) and groups.shape == (3, 6, 5, 3)
    assert torch.equal(groups[:, :, 0], torch.zeros(3, 6, 3))  # the centre is its own nearest point
    for b in range(3):
        for g in range(6):
            idx = knn(cloud[b : b + 1], centres[b : b + 1, g : g + 1], 5)[0, 0]
            assert torch.allclose(groups[b, g] + centres[b, g], cloud[b, idx])


# --------------------------------------------------------------------------- model


def test_model_output_is_invariant_to_point_order_and_batching() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).eval()
    clouds = torch.randn(3, 64, 3)
    perm = torch.stack([torch.randperm(64) for _ in range(3)])
    shuffled = clouds.gather(1, perm[..., None].expand(-1, -1, 3))
    with torch.no_grad():
        out = model(clouds)
        assert out.shape == (3, 5)
        assert torch.allclose(model(shuffled), out, atol=1e-6)
        assert torch.allclose(model(clouds[1:2]), out[1:2], atol=1e-6)
        # a rotation does change the output: invariance to it is learned, not built in
        turned = clouds @ random_rotations(1, torch.Generator().manual_seed(0), dtype=torch.float32)[0].T
        assert not torch.allclose(model(turned), out, atol=1e-4)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    torch.nn.functional.cross_entropy(model(torch.randn(4, 64, 3)), torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_the_summary_counts_flops_per_token_like_a_flop_counter() -> None:
    """The summary's forward FLOPs per token against torch's FLOP counter on one cloud: the
    PointNet runs once per point of each group (its biases and norms, which the counter skips,
    keep the summary a few percent above); counting every weight once per token, as a plain
    stack's formula does, misses most of the work."""
    from torch.utils.flop_counter import FlopCounterMode

    from anyformer.models.summary import flops_per_token, summarize

    cfg = tiny_model_config(num_points=128, num_groups=16, group_size=16, widths=[32, 64])
    model = build_model(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 128, 3))
    measured = counter.get_total_flops() / 17  # the class token and 16 groups
    ours = summarize(model, seq_len=17).flops_per_token_forward
    assert measured <= ours <= 1.06 * measured
    assert flops_per_token(cfg, sum(p.numel() for p in model.parameters()), 17) < 0.2 * measured


def test_the_summary_counts_the_attention_where_it_dominates() -> None:
    """384 groups of one point through layers of width 8: the scores over all 385 tokens are
    most of the work, and the summary's count is within 2% of torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from anyformer.models.summary import summarize

    cfg = tiny_model_config(num_points=512, num_groups=384, group_size=1, widths=[4], position_hidden=4)
    cfg.dim, cfg.ffn.hidden_dim, cfg.attention.kernel = 8, 8, "eager"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 512, 3, generator=torch.Generator().manual_seed(0)))
    measured = counter.get_total_flops() / 385
    assert abs(summarize(model, seq_len=385).flops_per_token_forward - measured) <= 0.02 * measured


def test_points_config_round_trips_and_overrides() -> None:
    cfg = tiny_model_config(widths=[8, 24, 40])
    again = from_dict(ModelConfig, to_dict(cfg))
    assert again == cfg and again.arch_options.widths == [8, 24, 40]
    run = apply_overrides(task_config(Path("unused")), ["--model.options.widths=[4,4]", "--model.options.num_groups=16"])
    assert run.model.arch_options.widths == [4, 4] and run.model.arch_options.num_groups == 16


def test_point_settings_are_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="num_groups=65 exceeds model.options.num_points=64"):
        tiny_model_config(num_groups=65).validate()
    with pytest.raises(ConfigError, match="group_size=100 exceeds"):
        tiny_model_config(group_size=100).validate()
    with pytest.raises(ConfigError, match="at least 1"):
        tiny_model_config(num_groups=0).validate()
    with pytest.raises(ConfigError, match="at least 1"):
        tiny_model_config(widths=[]).validate()
    with pytest.raises(ConfigError, match=r"model.options \(point_cloud\).num_grups"):
        tiny_model_config(num_grups=3).validate()
    with pytest.raises(ConfigError, match="Set model.positional.kind=none"):
        build_model(ModelConfig(arch="point_cloud", dim=32, attention=dict(num_heads=2), positional=dict(kind="rope"),
                                options=dict(num_points=64, num_groups=8, group_size=8)))
    model = build_model(tiny_model_config())
    with pytest.raises(ValueError, match="have 7 points, fewer than the 8 that the model"):
        model(torch.randn(2, 7, 3))
    with pytest.raises(ValueError, match=r"shape \(batch, points, 3\).*points\[None\]"):
        model(torch.randn(64, 3))


# --------------------------------------------------------------------------- data


def test_random_rotations_are_proper_and_uniform() -> None:
    r = random_rotations(4000, torch.Generator().manual_seed(0))
    eye = torch.eye(3, dtype=torch.float64).expand(4000, 3, 3)
    assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(4000, dtype=torch.float64), atol=1e-12)
    # Haar measure: every entry averages 0 (a mean of 4000 draws of variance 1/3: within 0.05)
    assert r.mean(0).abs().max() < 0.05


def test_distort_rotates_properly_and_normalises() -> None:
    x = torch.randn(100, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = distort(x, torch.Generator().manual_seed(1), rotate=True, anisotropy=0.0, noise=0.0).double()
    base = normalize(x)
    fit = torch.linalg.lstsq(base, out).solution  # out = base @ fit, fit = R^T
    assert torch.allclose(base @ fit, out, atol=1e-5)
    assert torch.allclose(fit.T @ fit, torch.eye(3, dtype=torch.float64), atol=1e-5) and float(torch.linalg.det(fit)) == pytest.approx(1, abs=1e-5)
    assert not torch.allclose(fit, torch.eye(3, dtype=torch.float64), atol=1e-2)
    assert float(out.norm(dim=-1).max()) == pytest.approx(1.0, abs=1e-6) and out.mean(0).abs().max() < 1e-6


def test_procedural_shapes_are_reproducible_and_normalised() -> None:
    settings = ShapeSettings(num_points=128, noise=0.0)
    assert len(SHAPES) >= 8
    for i, name in enumerate(SHAPES):
        cloud = sample_shape(name, i, settings)
        assert cloud.shape == (128, 3) and cloud.dtype == torch.float32
        assert float(cloud.norm(dim=-1).max()) == pytest.approx(1.0, abs=1e-5) and cloud.mean(0).abs().max() < 1e-5
        assert torch.equal(cloud, sample_shape(name, i, settings))
        assert not torch.equal(cloud, sample_shape(name, i + 100, settings))
    # unrotated, a box's points lie on the six planes of its axis-aligned bounding box; rotated, they do not
    for rotate, inside in ((False, 1e-5), (True, 1e-2)):
        box = sample_shape("box", 0, ShapeSettings(num_points=256, rotate=rotate, noise=0.0))
        planes = torch.cat([box - box.amin(0), box.amax(0) - box], -1)  # (P, 6) distances to the bounding planes
        assert (planes.min(-1).values.max() < inside) == (not rotate)


def _write_folder(root: Path) -> dict[str, int]:
    """Three classes of 4 training files each (every format) plus one test file per class; the
    number of points of each cloud file, by relative path."""
    rng = np.random.default_rng(0)
    sizes = {}
    for c, name in enumerate(["cubes", "rings", "spheres"]):
        mesh = [trimesh.creation.box(), trimesh.creation.annulus(0.5, 1.0, 0.3), trimesh.creation.icosphere()][c]
        (root / name / "test").mkdir(parents=True)
        pts = mesh.sample(100) + rng.normal(0, 0.01, (100, 3))
        np.save(root / name / "a.npy", pts)
        np.savetxt(root / name / "b.xyz", np.c_[pts[:80], np.ones((80, 3))], delimiter=",", header="x,y,z,nx,ny,nz")
        mesh.export(root / name / "c.obj")
        mesh.export(root / name / "d.stl")
        np.save(root / name / "test" / "e.npy", pts[:30])  # fewer than num_points: filled up with repeats
        (root / name / "notes.txt").write_text("ignored")
        sizes |= {f"{name}/a.npy": 100, f"{name}/b.xyz": 80, f"{name}/test/e.npy": 30}
    return sizes


def test_folder_loader_reads_every_format_into_its_class(tmp_path) -> None:
    from anyformer.data.split import hash_fraction, held_out

    _write_folder(tmp_path / "data")
    root = tmp_path / "data"
    sets, classes = folder_clouds(root, 64, 8, 0.5, tmp_path / "cache")
    assert classes == ["cubes", "rings", "spheres"]
    assert sets["test"].labels.tolist() == [0, 1, 2] and sets["test"].points.shape == (3, 64, 3)
    rels = [f"{c}/{f}" for c in classes for f in ("a.npy", "b.xyz", "c.obj", "d.stl")]
    val = [r for r in rels if held_out(r, 0.5)]
    assert len(sets["val"]) == len(val) and len(sets["train"]) == len(rels) - len(val)
    # every file's cloud sits in its split with its class's label
    for rel in rels + [f"{c}/test/e.npy" for c in classes]:
        cloud = read_cloud(root / rel, 64, 8, seed=int(hash_fraction(rel) * 2**62))
        split = sets["test" if "/test/" in rel else "val" if rel in val else "train"]
        (hit,) = [i for i in range(len(split)) if torch.equal(split.points[i], cloud)]
        assert split.labels[hit] == classes.index(rel.split("/")[0])
    assert torch.equal(sets["train"].points, folder_clouds(root, 64, 8, 0.5, tmp_path / "cache")[0]["train"].points)  # cached


def test_point_files_keep_their_own_points(tmp_path) -> None:
    """A file of exactly num_points points is those points, normalised (in some order); a
    file of fewer is filled up with repeats of its own points; extra columns are dropped."""
    pts = np.random.default_rng(1).normal(size=(64, 3))
    np.savetxt(tmp_path / "p.xyz", np.c_[pts, np.ones((64, 2))], delimiter=",", header="x,y,z,r,g")
    np.save(tmp_path / "p.npy", pts[:30].astype(np.float32))

    def rows(x: torch.Tensor) -> list:
        return sorted(map(tuple, x.double().round(decimals=5).tolist()))

    assert rows(read_cloud(tmp_path / "p.xyz", 64, 8)) == rows(normalize(torch.from_numpy(pts)))
    filled = read_cloud(tmp_path / "p.npy", 64, 8)
    assert filled.shape == (64, 3) and len(set(rows(filled))) == 30
    assert torch.equal(filled, read_cloud(tmp_path / "p.npy", 64, 8))  # the same repeats every time


def test_bad_point_files_are_named(tmp_path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        folder_clouds(tmp_path / "missing", 64, 8, 0.2, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="0 class subfolder"):
        folder_clouds(tmp_path / "empty", 64, 8, 0.2, tmp_path)
    (tmp_path / "one" / "a").mkdir(parents=True)
    (tmp_path / "one" / "b").mkdir(parents=True)
    np.save(tmp_path / "one" / "a" / "x.npy", np.zeros((70, 3)))
    with pytest.raises(ValueError, match="holds no point files"):
        folder_clouds(tmp_path / "one", 64, 8, 0.2, tmp_path)
    np.save(tmp_path / "flat.npy", np.zeros((70, 2)))
    with pytest.raises(ValueError, match=r"shape \(70, 2\).*\(points, 3\)"):
        read_cloud(tmp_path / "flat.npy", 64, 8)
    np.save(tmp_path / "line.npy", np.zeros(70))
    with pytest.raises(ValueError, match=r"shape \(70,\)"):
        read_cloud(tmp_path / "line.npy", 64, 8)
    np.save(tmp_path / "few.npy", np.random.rand(5, 3))
    with pytest.raises(ValueError, match="has 5 points, fewer than the 8 the model's tokenization needs"):
        read_cloud(tmp_path / "few.npy", 64, 8)
    np.save(tmp_path / "same.npy", np.ones((70, 3)))
    with pytest.raises(ValueError, match="all its points at one place"):
        read_cloud(tmp_path / "same.npy", 64, 8)
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        read_cloud(tmp_path / "empty.npy", 64, 8)
    np.save(tmp_path / "whole.npy", np.random.rand(70, 3))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "whole.npy").read_bytes()[:200])
    with pytest.raises(ValueError, match="not a NumPy .npy array file"):
        read_cloud(tmp_path / "cut.npy", 64, 8)
    (tmp_path / "comments.xyz").write_text("# x y z\n\n")
    with pytest.raises(ValueError, match="holds no points"):
        read_cloud(tmp_path / "comments.xyz", 64, 8)
    (tmp_path / "words.xyz").write_text("one two three\n")
    with pytest.raises(ValueError, match="not an .xyz text file"):
        read_cloud(tmp_path / "words.xyz", 64, 8)
    (tmp_path / "nan.xyz").write_text("1 2 nan\n" * 70)
    with pytest.raises(ValueError, match="NaN or infinite"):
        read_cloud(tmp_path / "nan.xyz", 64, 8)
    (tmp_path / "bad.obj").write_text("this is not a mesh\n")
    with pytest.raises(ValueError, match="bad.obj"):
        read_cloud(tmp_path / "bad.obj", 64, 8)
    (tmp_path / "cloud.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="neither a point file"):
        read_cloud(tmp_path / "cloud.png", 64, 8)
    monkeypatch.setitem(__import__("sys").modules, "trimesh", None)
    with pytest.raises(ImportError, match="pip install trimesh"):
        require_trimesh()


# --------------------------------------------------------------------------- the task


def task_config(tmp: Path, *extra: str) -> RunConfig:
    return apply_overrides(default_run_config(), [
        "--task.kind=point_cloud_classification", "--task.options.shapes_per_class=6", "--task.options.val_per_class=2",
        "--task.options.test_per_class=2", "--data.corpus=shapes", f"--data.cache_dir={tmp / 'cache'}", "--model.arch=point_cloud",
        "--model.positional.kind=none", "--model.dim=32", "--model.num_layers=2", "--model.attention.num_heads=2",
        "--model.ffn.hidden_dim=64", "--model.head.kind=sequence_classification", "--model.options.num_points=64",
        "--model.options.num_groups=8", "--model.options.group_size=8", "--model.options.widths=[16,16]",
        "--model.options.position_hidden=16", "--train.batch_size=8", "--train.max_steps=8", "--train.max_minutes=null",
        "--train.warmup_steps=2", "--train.eval_every=4", "--train.eval_batches=2", "--train.log_every=2",
        "--train.dtype=float32", "--train.optimizer=adamw", "--train.samples=0", "--train.lr=3e-3",
        f"--train.out_dir={tmp / 'run'}", "--train.threads=1", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trainer:
    tmp = tmp_path_factory.mktemp("points")
    t = Trainer(task_config(tmp), run_dir=tmp / "run", verbose=False)
    t.fit()
    return t


def test_trains_and_resumes_exactly(tmp_path) -> None:
    cfg = task_config(tmp_path)
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    assert len(full.losses) == 8 and not (tmp_path / "full" / "tokenizer.json").exists()
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)


def test_evaluation_equals_a_direct_loop(trained) -> None:
    model, data = trained.model, trained.data
    assert data.train.points.shape == (60, 64, 3) and torch.bincount(data.train.labels).tolist() == [6] * 10
    scores = trained.task.evaluate(model, data, trained.env)
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(data.val.points).double(), -1)
    assert scores["accuracy"] == pytest.approx(float((logp.argmax(-1) == data.val.labels).double().mean()))
    assert scores["val_loss"] == pytest.approx(float(-logp[torch.arange(20), data.val.labels].mean()), rel=1e-5)
    assert scores["majority_accuracy"] == pytest.approx(0.1)


def test_eval_reports_robustness_and_classify_reads_files(trained, tmp_path, capsys) -> None:
    from anyformer.cli import main

    run = str(trained.run_dir)
    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    assert float(lines["test_shuffled_accuracy"]) == float(lines["test_accuracy"])  # invariant to point order
    assert 0.0 <= float(lines["test_rotated_accuracy"]) <= 1.0 and Path(lines["confusion_matrix"].strip()).is_file()
    np.save(tmp_path / "torus.npy", trimesh.creation.torus(1.0, 0.3).sample(200))
    trimesh.creation.cone(1.0, 2.0).export(tmp_path / "cone.obj")
    for name in ("torus.npy", "cone.obj"):
        assert main(["classify", run, str(tmp_path / name)]) == 0
        rows = capsys.readouterr().out.strip().splitlines()
        assert sorted(r.split()[0] for r in rows) == sorted(SHAPES)
        assert sum(float(r.split()[1]) for r in rows) == pytest.approx(1.0, abs=5e-3)
    np.save(tmp_path / "few.npy", np.random.rand(5, 3))
    assert main(["classify", run, str(tmp_path / "few.npy")]) != 0
    assert "fewer than the 8" in capsys.readouterr().err


def test_folder_data_trains(tmp_path) -> None:
    _write_folder(tmp_path / "data")
    cfg = task_config(tmp_path, "--data.corpus=folder", f"--data.path={tmp_path / 'data'}", "--data.val_fraction=0.5",
                      "--train.max_steps=2", "--train.eval_every=2")
    t = Trainer(cfg, run_dir=tmp_path / "run", verbose=False)
    assert len(t.fit().losses) == 2 and t.data.classes == ["cubes", "rings", "spheres"]
    assert t.cfg.model.head.num_labels == 3 and len(t.data.test) == 3


def test_bad_task_settings_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="trains model.arch 'point_cloud'"):
        task_config(tmp_path, "--model.arch=encoder").validate()
    with pytest.raises(ConfigError, match="data.corpus 'shapes'"):
        task_config(tmp_path, "--data.corpus=shakespeare").validate()
    with pytest.raises(ConfigError, match="set data.path"):
        task_config(tmp_path, "--data.corpus=folder").validate()
    with pytest.raises(ConfigError, match="model.positional.kind=none"):
        task_config(tmp_path, "--model.positional.kind=rope").validate()
    with pytest.raises(ConfigError, match="num_groups=80 exceeds"):
        task_config(tmp_path, "--model.options.num_groups=80").validate()
    with pytest.raises(ConfigError, match="shapes_per_class"):
        Trainer(task_config(tmp_path, "--task.options.shapes_per_class=0"), run_dir=tmp_path / "r", verbose=False)


def test_config_file_loads_and_validates() -> None:
    cfg = load_yaml(RunConfig, REPO / "configs" / "point-clouds.yaml")
    cfg.validate()
    assert cfg.model.arch == "point_cloud" and cfg.task.kind == "point_cloud_classification"


def test_run_config_saves_and_loads_points(tmp_path) -> None:
    cfg = task_config(tmp_path, "--model.options.widths=[8,12]")
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(RunConfig, tmp_path / "c.yaml").model.arch_options == cfg.model.arch_options


def test_a_cloud_of_the_wrong_shape_is_named_and_the_batch_hint_given_only_for_one_cloud() -> None:
    from anyformer.models.point_groups import check_points

    with pytest.raises(ValueError, match=r"got \(10, 3\); for one cloud add a batch dimension"):
        check_points(torch.zeros(10, 3), 4, "the test")
    for shape in [(10, 4), (2, 10, 2), (3,)]:
        with pytest.raises(ValueError, match="must have shape") as err:
            check_points(torch.zeros(shape), 4, "the test")
        assert "batch dimension" not in str(err.value), shape


def test_the_default_centre_mlp_is_point_maes() -> None:
    """The centre's position MLP by default: 3 -> 128 -> GELU -> dim, the positional embedding
    of Point-BERT and Point-MAE (Yu et al. 2022; Pang et al. 2022)."""
    cfg = ModelConfig(arch="point_cloud", dim=32, num_layers=1, attention=dict(num_heads=2), positional=dict(kind="none"),
                      head=dict(kind="sequence_classification", num_labels=5))
    position = build_model(cfg).embed.position
    assert [type(m).__name__ for m in position] == ["Linear", "GELU", "Linear"]
    assert (position[0].in_features, position[0].out_features, position[2].out_features) == (3, 128, 32)


def test_example_clouds_lie_in_the_unit_ball() -> None:
    """The protocol's example inputs: clouds of the configured size, every point within the unit
    ball and not all on its surface."""
    model = build_model(tiny_model_config())
    (points,) = model.example_inputs(3, torch.Generator().manual_seed(0))
    radii = points.norm(dim=-1)
    assert points.shape == (3, 64, 3) and float(radii.max()) <= 1.0 and float(radii.median()) < 0.95
