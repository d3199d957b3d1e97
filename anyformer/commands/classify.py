"""`anyformer classify RUN INPUT`: a classification run's label probabilities for a text
(sequence_classification), an image file (image_classification), or the file of any task that
offers `classify_input(input, device) -> (model input, label names)` (point_cloud_classification:
a point or mesh file)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `classify` subcommand."""
    p = subparsers.add_parser("classify", help="label probabilities of a text, an image or a point cloud from a classification run")
    p.add_argument("run_dir", help="a folder written by `anyformer train` with task sequence_classification, image_classification or point_cloud_classification")
    p.add_argument("input", help="the text to classify (its first train.seq_len - 1 bytes are read), or for an image "
                                 "run the path of an image file (PNG, JPEG, ...; made grayscale and resized to the run's size), "
                                 "or for a point-cloud run a point file (.xyz, .npy) or mesh file (.obj, .stl, .ply, .off, ...)")
    p.add_argument("--invert", action="store_true", help="image runs: invert the gray levels first (the data sets have "
                                                          "bright ink on black; use this for dark ink on white paper)")
    p.add_argument("--top", type=int, default=None, help="print only the most likely N labels")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every label with its probability, most likely first."""
    import torch

    from ..tasks import TASKS
    from ..training.run import load_run

    r = load_run(args.run_dir, args.checkpoint, args.device)
    kind = r.cfg.task.kind
    task = TASKS.get(kind)(r.cfg)
    if kind not in ("sequence_classification", "image_classification") and not hasattr(task, "classify_input"):
        raise ValueError(f"{args.run_dir} was trained for task {kind!r}; classify needs a classification run "
                         "(sequence_classification, image_classification, point_cloud_classification)")
    device = next(r.model.parameters()).device
    if hasattr(task, "classify_input"):
        inputs, labels = task.classify_input(args.input, device)
    elif kind == "image_classification":
        from ..tasks.image_classification import read_image, to_model_input

        v = r.cfg.model.arch_options
        inputs = to_model_input(read_image(args.input, v.image_size, invert=args.invert)[None]).to(device)
        labels = TASKS.get(kind)(r.cfg).class_names()  # type: ignore[attr-defined]
    else:
        if not args.input:
            raise ValueError("the text is empty; give the passage to classify")
        ids = r.tokenizer.encode(args.input)[: r.cfg.train.seq_len - 1]  # type: ignore[union-attr]
        cls_id = r.tokenizer.vocab_size  # type: ignore[union-attr]  # the id after the bytes (the task's <cls>)
        inputs = torch.tensor([[cls_id, *ids]], device=device)
        labels = TASKS.get(kind)(r.cfg).options.labels  # type: ignore[attr-defined]
    with torch.no_grad():
        probs = r.model(inputs).float().softmax(-1)[0]
    width = max(len(label) for label in labels) + 2
    for i in probs.argsort(descending=True).tolist()[: args.top]:
        print(f"{labels[i]:<{width}} {float(probs[i]):.3f}")
    return 0
