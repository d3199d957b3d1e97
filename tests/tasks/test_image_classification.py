"""Image classification with the ViT: IDX reading, patches, augmentation, exact resume, DDP,
metrics against a direct loop, the confusion matrix, `classify`, clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from anyformer.config import ConfigError, apply_overrides
from anyformer.data.images import FASHION_MNIST_DIR, read_idx
from anyformer.tasks.image_classification import augment, to_model_input
from anyformer.training import Trainer
from anyformer.training.config import default_run_config
from tests.training_helpers import check_ddp_matches_one_process, interrupted_copy

pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn (pip install scikit-learn)")
HAS_FASHION = Path(FASHION_MNIST_DIR).is_dir()


def vit_config(tmp: Path, *extra: str):
    return apply_overrides(default_run_config(), [
        "--task.kind=image_classification", "--data.corpus=digits", "--data.val_fraction=0.2", "--model.arch=vit",
        "--model.options.image_size=8", "--model.options.patch_size=4", "--model.options.channels=1", "--model.max_seq_len=5",
        "--model.positional.kind=learned", "--model.dim=32", "--model.num_layers=2", "--model.attention.num_heads=2",
        "--model.ffn.hidden_dim=64", "--model.head.kind=sequence_classification", "--train.batch_size=16",
        "--train.max_steps=8", "--train.max_minutes=null", "--train.warmup_steps=2", "--train.eval_every=4",
        "--train.eval_batches=4", "--train.log_every=2", "--train.dtype=float32", "--train.optimizer=adamw",
        "--train.samples=0", "--train.lr=3e-3", f"--train.out_dir={tmp / 'run'}", "--train.threads=1", *extra,
    ])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trainer:
    tmp = tmp_path_factory.mktemp("vit")
    t = Trainer(vit_config(tmp), run_dir=tmp / "run", verbose=False)
    t.fit()
    return t


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_idx_files_read_back(tmp_path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(images, 0x08))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    wide = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "w-idx1").write_bytes(_idx_bytes(wide, 0x0C))
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), images)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), images)
    assert read_idx(tmp_path / "w-idx1").tolist() == [1, -2, 70000]
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(images, 0x08)[:-3])
    with pytest.raises(ValueError, match="promises shape"):
        read_idx(tmp_path / "short")


@pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_has_its_published_sizes() -> None:
    from anyformer.data.images import fashion_mnist

    train, test, classes = fashion_mnist()
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    # the published set is balanced: 6,000 training and 1,000 test images per class
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert classes[0] == "T-shirt/top" and classes[9] == "Ankle boot"


def test_patches_reassemble_to_the_image() -> None:
    """With the projection set to copy pixels, each patch token holds its p x p pixels, in
    row-major patch order after the class token: putting them back gives the image."""
    from anyformer.models.vit import PatchEmbedding
    from anyformer.nn.positional.base import PositionalEncoding

    p, c, size = 4, 2, 12
    emb = PatchEmbedding(c, p, c * p * p, size, dropout=0.0)
    with torch.no_grad():
        emb.proj.weight.copy_(torch.eye(c * p * p).view(c * p * p, c, p, p))
        emb.proj.bias.zero_()

    images = torch.randn(3, c, size, size)
    tokens, positions = emb(images, PositionalEncoding(None, PositionalEncoding.Options()))  # adds nothing
    assert tokens.shape == (3, 1 + (size // p) ** 2, c * p * p) and positions[0].tolist() == list(range(10))
    g = size // p
    back = tokens[:, 1:].reshape(3, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(3, c, size, size)
    assert torch.equal(back, images)


def test_augmentation_shifts_within_the_bound_and_can_mirror() -> None:
    image = torch.zeros(9, 9, dtype=torch.uint8)
    image[4, 4] = 255
    seen = set()
    for seed in range(200):
        out = augment(image, 2, False, torch.Generator().manual_seed(seed))
        (y, x), = out.nonzero().tolist()
        assert abs(y - 4) <= 2 and abs(x - 4) <= 2
        seen.add((y, x))
    assert len(seen) == 25  # every shift in [-2, 2]^2 occurs
    asym = torch.zeros(5, 5, dtype=torch.uint8)
    asym[1, 0] = 7
    flips = {tuple(augment(asym, 0, True, torch.Generator().manual_seed(s)).nonzero()[0].tolist()) for s in range(50)}
    assert flips == {(1, 0), (1, 4)}
    assert torch.equal(augment(asym, 0, False, torch.Generator()), asym)


def test_pixels_map_to_minus_one_to_one() -> None:
    x = to_model_input(torch.tensor([[[0, 255], [51, 204]]], dtype=torch.uint8))
    assert x.shape == (1, 1, 2, 2)
    assert x.flatten().tolist() == pytest.approx([-1.0, 1.0, -0.6, 0.6])


def test_held_out_images_are_disjoint_and_hash_chosen(trained) -> None:
    from sklearn.datasets import load_digits

    from anyformer.data.split import held_out

    data = trained.data
    n = len(load_digits().target)
    assert len(data.train.labels) + len(data.val.labels) == n
    expect_val = [i for i in range(n) if held_out(f"digits/{i}", 0.2)]
    assert len(data.val.labels) == len(expect_val) and abs(len(expect_val) / n - 0.2) < 0.04
    digits = load_digits()
    assert data.val.labels.tolist() == digits.target[expect_val].tolist()


def test_evaluation_equals_a_direct_loop(trained) -> None:
    model, data = trained.model, trained.data
    scores = trained.task.evaluate(model, data, trained.env)
    model.eval()
    nll = correct = 0.0
    with torch.no_grad():
        for img, label in zip(data.val.images, data.val.labels.tolist()):
            logits = model(to_model_input(img[None]))[0].double()
            nll -= float(torch.log_softmax(logits, -1)[label])
            correct += int(logits.argmax()) == label
    n = len(data.val.labels)
    assert scores["accuracy"] == pytest.approx(correct / n)
    assert scores["val_loss"] == pytest.approx(nll / n, rel=1e-5)
    majority = int(torch.bincount(data.train.labels).argmax())
    assert scores["majority_accuracy"] == pytest.approx(float((data.val.labels == majority).double().mean()))
    limited = trained.task.evaluate(model, data, trained.env, batches=2)  # the first 32 images
    with torch.no_grad():
        first = model(to_model_input(data.val.images[:32])).argmax(-1)
    assert limited["accuracy"] == pytest.approx(float((first == data.val.labels[:32]).double().mean()))


def test_report_writes_the_confusion_matrix(trained, tmp_path) -> None:
    out = trained.task.report(trained.model, trained.data, trained.env, tmp_path)
    png = Path(out["confusion_matrix"])
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    with torch.no_grad():
        preds = trained.model(to_model_input(trained.data.val.images)).argmax(-1)
    assert out["held-out_accuracy"] == pytest.approx(float((preds == trained.data.val.labels).double().mean()))
    assert out["held-out_images"] == len(trained.data.val.labels)


@pytest.mark.parametrize("augmented", [False, True])
def test_trains_and_resumes_exactly(tmp_path, augmented) -> None:
    extra = ["--task.options.augment=true", "--task.options.flip=true"] if augmented else []
    cfg = vit_config(tmp_path, *extra)
    full = Trainer(cfg, run_dir=tmp_path / "full", verbose=False).fit()
    assert len(full.losses) == 8 and not (tmp_path / "full" / "tokenizer.json").exists()
    resumed = Trainer(cfg, run_dir=interrupted_copy(tmp_path / "full", tmp_path / "part"), resume=True, verbose=False).fit()
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-6)


def test_two_process_ddp_matches_one_process(tmp_path) -> None:
    """Augmentation draws come from each image's own seed, so any split over processes gives
    the same batches; the evaluation sums over processes."""
    cfg = vit_config(tmp_path, "--train.max_steps=4", "--train.eval_every=4", "--task.options.augment=true")
    check_ddp_matches_one_process(cfg, tmp_path, ("val_loss", "accuracy", "majority_accuracy"))


def test_eval_and_classify_commands(trained, tmp_path, capsys) -> None:
    from PIL import Image

    from anyformer.cli import main

    run = str(trained.run_dir)
    assert main(["eval", run]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion_held-out.png" in out
    image = trained.data.val.images[0].numpy()
    Image.fromarray(image).save(tmp_path / "digit.png")
    Image.fromarray(255 - np.repeat(np.repeat(image, 4, 0), 4, 1)).convert("RGB").save(tmp_path / "paper.jpg")
    assert main(["classify", run, str(tmp_path / "digit.png")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[0] for line in lines) == [str(i) for i in range(10)]
    assert sum(float(line.split()[1]) for line in lines) == pytest.approx(1.0, abs=5e-3)
    with torch.no_grad():
        expect = int(trained.model(to_model_input(trained.data.val.images[:1])).argmax())
    assert lines[0].split()[0] == str(expect)
    # a larger photo of dark ink on white: resized and inverted to the same image (up to resampling)
    assert main(["classify", run, str(tmp_path / "paper.jpg"), "--invert", "--top", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["classify", run, str(tmp_path / "notes.txt")]) != 0
    assert "not an image file" in capsys.readouterr().err
    assert main(["classify", run, str(tmp_path / "missing.png")]) != 0
    assert "no image file" in capsys.readouterr().err


def test_bad_settings_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="task 'image_classification' trains model.arch 'vit'"):
        vit_config(tmp_path, "--model.arch=encoder").validate()
    with pytest.raises(ConfigError, match="data.corpus fashion_mnist or digits"):
        vit_config(tmp_path, "--data.corpus=shakespeare").validate()
    with pytest.raises(ConfigError, match=r"set model.options.image_size=8"):
        Trainer(vit_config(tmp_path, "--model.options.image_size=28", "--model.options.patch_size=7", "--model.max_seq_len=17"),
                run_dir=tmp_path / "r", verbose=False)
    with pytest.raises(ConfigError, match="not a multiple of model.options.patch_size"):
        vit_config(tmp_path, "--model.options.patch_size=3").validate()
    with pytest.raises(ConfigError, match="task.options.shift"):
        Trainer(vit_config(tmp_path, "--task.options.shift=20"), run_dir=tmp_path / "r", verbose=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        Trainer(vit_config(tmp_path, "--data.corpus=fashion_mnist", f"--data.path={tmp_path / 'nothing'}"),
                run_dir=tmp_path / "r", verbose=False)


@pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_trains_and_reports_test_accuracy(tmp_path) -> None:
    cfg = vit_config(tmp_path, "--data.corpus=fashion_mnist", "--data.val_fraction=0.02", "--model.options.image_size=28",
                     "--model.options.patch_size=7", "--model.max_seq_len=17", "--train.max_steps=4", "--train.eval_batches=2")
    t = Trainer(cfg, run_dir=tmp_path / "run", verbose=False)
    result = t.fit()
    assert len(result.losses) == 4 and len(t.data.test.labels) == 10000
    out = t.task.report(t.model, t.data, t.env, tmp_path)
    assert out["test_images"] == 10000 and 0.0 <= out["test_accuracy"] <= 1.0
    assert Path(out["confusion_matrix"]).name == "confusion_test.png"


def test_read_image_keeps_the_aspect_and_refuses_broken_files(tmp_path, capsys) -> None:
    """A 17 x 300 image with a bright bar across its whole width: padded to a square before the
    resize, the bar stays a thin band in the middle rows (a squash would spread it over every
    row), and the resize is said; a truncated PNG is a one-line error naming the file."""
    from PIL import Image

    from anyformer.cli import main
    from anyformer.tasks.image_classification import read_image

    pixels = np.zeros((17, 300), dtype=np.uint8)
    pixels[4:13] = 255
    Image.fromarray(pixels, mode="L").save(tmp_path / "wide.png")
    notes: list[str] = []
    out = read_image(tmp_path / "wide.png", 8, notes=notes)
    rows = out.float().mean(1)  # squashed, every row would average 9/17 of 255 = 135
    assert rows[3:5].min() > 20 and rows.max() < 100 and rows[:2].max() < 5 and rows[6:].max() < 5, rows
    assert notes == ["resized from 300 x 17 to the model's 8 x 8, padded to a square with its border colour 0 first"]
    Image.fromarray(np.full((8, 8), 9, dtype=np.uint8), mode="L").save(tmp_path / "fits.png")
    notes.clear()
    assert bool((read_image(tmp_path / "fits.png", 8, notes=notes) == 9).all()) and notes == []
    data = (tmp_path / "wide.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    vit = Path(__file__).parents[1] / "fixtures" / "vit_run_before_arch_options"
    for command in (["classify", str(vit), str(tmp_path / "cut.png")], ["inspect", "attention", str(vit), "--image", str(tmp_path / "cut.png"),
                                                                          "--out", str(tmp_path / "maps.png")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "could not be decoded" in err and "cut.png" in err, err
