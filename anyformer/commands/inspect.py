"""`anyformer inspect attention RUN --prompt "..."`: the attention maps of every layer and head
of a trained run for one input, as a PNG grid, with each head's entropy and mean distance.
`anyformer inspect clusters RUN|MODEL --prompt "..."`: the token representations across depth,
their similarities, clusters and energy (anyformer/training/clusters.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import at_least


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` subcommand (with its `attention` view)."""
    p = subparsers.add_parser("inspect", help="look inside a trained run (attention maps)")
    views = p.add_subparsers(dest="view", required=True)
    a = views.add_parser("attention", help="attention maps of every layer and head for a prompt (or an image for a ViT run)")
    a.add_argument("run_dir", help="a folder written by `anyformer train`")
    a.add_argument("--prompt", help="the text whose attention is shown (text runs)")
    a.add_argument("--image", help="the image file whose attention is shown (ViT runs)")
    a.add_argument("--out", help="PNG to write (default RUN/attention.png)")
    a.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    a.add_argument("--device", default="auto")
    a.set_defaults(func=run)
    c = views.add_parser("clusters", help="token similarities, clusters and energy after every block (tokens as particles)")
    c.add_argument("target", help="a run folder, a model config YAML (random weights; the prompt's UTF-8 bytes are its "
                   "tokens; model keys can be overridden: --attention.options.beta=9), or a pretrained checkpoint (an "
                   "installed package name, a Hugging Face folder, a .gguf file)")
    c.add_argument("--prompt", help="the text whose tokens are followed")
    c.add_argument("--image", help="the image file whose patches are followed (ViT runs)")
    c.add_argument("--threshold", type=float, default=0.95, help="similarity at or above which two tokens are linked "
                   "(single-linkage clusters; default 0.95)")
    c.add_argument("--beta", type=float, default=1.0, help="inverse temperature of the energy (default 1)")
    c.add_argument("--loops", type=at_least(1), default=None, help="a looped model: run this many loops (past its trained ones)")
    c.add_argument("--every", type=at_least(1), default=1, help="report every N-th depth (and the last; default every one)")
    c.add_argument("--seed", type=int, default=0, help="a model config: the seed of its random weights")
    c.add_argument("--out", help="folder for clusters.json, similarity.png and clusters.png (default runs/clusters-NAME)")
    c.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=run_clusters, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    """Write the grid and print the per-head statistics."""
    from ..tasks import TASKS
    from ..training.inspect import attention_maps, head_statistics, plot_attention_grid
    from ..training.run import load_run

    r = load_run(args.run_dir, args.checkpoint, args.device)
    if (args.prompt is None) == (args.image is None):
        raise ValueError('give the input to look at: --prompt "TEXT" for a text run, or --image FILE for an image run (one of them)')
    task = TASKS.get(r.cfg.task.kind)(r.cfg)
    inputs, labels = task.inspect_input(args.prompt if args.image is None else args.image, r.tokenizer)
    inputs = inputs.to(next(r.model.parameters()).device)
    maps = attention_maps(r.model, inputs)
    out = Path(args.out) if args.out else r.checkpoint.parent.parent / "attention.png"
    plot_attention_grid(maps, out, labels, f"{args.run_dir} ({r.cfg.model.attention.kind} attention)")
    entropy, distance = head_statistics(maps)
    print(f"{len(maps)} layers x {entropy.shape[1]} heads, {maps[0].shape[-1]} tokens; grid written to {out}")
    print("layer  head  entropy (nats)  mean distance (tokens)")
    for i in range(entropy.shape[0]):
        for j in range(entropy.shape[1]):
            print(f"{i:>5}  {j:>4}  {float(entropy[i, j]):>14.3f}  {float(distance[i, j]):>22.2f}")
    return 0


def _clusters_input(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """(model, inputs, labels, description) of the target."""
    import torch

    from ..config import ModelConfig, apply_overrides, from_dict, read_yaml
    from ..tasks import TASKS
    from ..tasks.base import token_input

    if (args.prompt is None) == (args.image is None):
        raise ValueError('give the input to follow: --prompt "TEXT" (or --image FILE for an image run), one of them')
    target = Path(args.target)
    is_model_config = target.suffix in (".yaml", ".yml") and target.is_file()
    if args.overrides and not is_model_config:
        raise ValueError(f"overrides ({' '.join(args.overrides)}) apply to a model config YAML target; a run or a checkpoint "
                         "has its weights")
    if (target / "config.yaml").is_file():  # a training run
        from ..training.run import load_run

        r = load_run(target, args.checkpoint, args.device)
        task = TASKS.get(r.cfg.task.kind)(r.cfg)
        inputs, labels = task.inspect_input(args.prompt if args.image is None else args.image, r.tokenizer)
        return r.model, inputs, labels, f"{target.name} ({r.cfg.model.arch}, {r.cfg.model.attention.kind})"
    if args.image is not None:
        raise ValueError("--image reads image runs (a ViT run folder); give --prompt for this target")
    if is_model_config:  # random weights
        from ..models.builders import build_model

        data = read_yaml(target) or {}
        if not isinstance(data, dict) or {"model", "train"} & set(data):
            raise ValueError(f"{target} is not a model config (a run config trains first: anyformer train {target})")
        cfg = apply_overrides(from_dict(ModelConfig, data), args.overrides)
        torch.manual_seed(args.seed)
        model = build_model(cfg).to(args.device)
        ids = list(args.prompt.encode("utf-8"))
        if max(ids, default=0) >= cfg.vocab_size:
            raise ValueError(f"the prompt's bytes go up to {max(ids)}, past the model's vocabulary of {cfg.vocab_size}; "
                             "use ASCII text or a larger vocab_size")
        inputs, _ = token_input(ids, None, cfg.max_seq_len)
        labels = [chr(i) if 32 <= i < 127 else f"<{i}>" for i in ids] if len(ids) <= 24 else None
        return model, inputs, labels, f"{target.stem} (random weights, seed {args.seed})"
    from ..pretrained.loading import load_pretrained

    model, tokenizer = load_pretrained(args.target, device=args.device)
    limit = getattr(getattr(model, "config", None), "max_seq_len", 1 << 30)
    inputs, labels = token_input(tokenizer.encode(args.prompt), tokenizer, limit)
    return model, inputs, labels, Path(args.target).name


def run_clusters(args: argparse.Namespace) -> int:
    """Follow the tokens through the model; write the report and print a line per depth."""
    import torch

    from ..training.clusters import depth_states, write_cluster_report

    if not -1.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine similarity in [-1, 1], got {args.threshold}")
    if not args.beta > 0:
        raise ValueError(f"--beta must be positive, got {args.beta}")
    model, inputs, labels, title = _clusters_input(args)
    if args.loops is not None:
        stack = getattr(model, "stack", None)
        if not hasattr(stack, "eval_loops"):
            raise ValueError("--loops applies to a looped model (model.depth.kind=looped); this one has a fixed depth")
        if stack.step_embed is not None and args.loops > stack.step_embed.shape[0]:
            raise ValueError(f"this model learned a step embedding for {stack.step_embed.shape[0]} loops; --loops cannot go past it")
        stack.eval_loops = args.loops
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    states = depth_states(model, (inputs.to(device),))
    out = Path(args.out) if args.out else Path("runs") / f"clusters-{Path(args.target).stem}"
    if args.overrides:
        title += " " + " ".join(o.lstrip("-") for o in args.overrides)
    report = write_cluster_report(states, out, threshold=args.threshold, beta=args.beta, title=title, labels=labels, every=args.every)
    shown = "" if args.every == 1 else f", every {args.every}th shown"
    print(f"{report['tokens']} tokens of width {report['width']}, {len(states)} depths (the input, then every block "
          f"application{shown}); clusters at similarity >= {args.threshold:g}, energy at beta {args.beta:g}")
    print("depth  clusters  mean sim  min sim     energy")
    for r in report["depths"]:
        print(f"{r['depth']:>5}  {r['clusters']:>8}  {r['mean_similarity']:>8.4f}  {r['min_similarity']:>7.4f}  {r['energy']:>9.5f}")
    print(f"wrote {out / 'clusters.json'}, {out / 'similarity.png'}, {out / 'clusters.png'}")
    return 0
