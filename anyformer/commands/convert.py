"""`anyformer convert SRC DST`: a checkpoint (GGUF file or HF directory) -> a Hugging Face model directory."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

# Files of a HF / sentence-transformers directory that describe the tokenizer and pooling, copied as they are.
_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "chat_template.jinja", "generation_config.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
_SIDE_DIRS = ("1_Pooling", "2_Normalize")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` subcommand."""
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint (.gguf file or HF directory) into a Hugging Face model directory",
        description="Load SRC into anyformer (a .gguf file is dequantized) and write DST as a Hugging Face "
        "directory (config.json + model.safetensors + tokenizer files) that anyformer and transformers both load.",
    )
    p.add_argument("src", help="a .gguf file, a Hugging Face model directory, a run folder written by `anyformer train`, an installed "
                   "package shipping one, or (with --from tracr) a RASP program file")
    p.add_argument("dst", help="output directory (with --from tracr: a run folder that `anyformer predict` runs)")
    p.add_argument("--from", dest="source", choices=["checkpoint", "tracr"], default="checkpoint",
                   help="what SRC is: a checkpoint (default), or a RASP program file (program, vocab, max_seq_len) to "
                   "compile with tracr into anyformer weights (the optional extra [tracr])")
    p.add_argument("--dtype", default="float32", help="weight dtype to write: float32 (default), bfloat16, float16")
    p.add_argument("--force", action="store_true", help="overwrite a model already in DST")
    p.set_defaults(func=run)


def _add_token_ids(config: Path, **ids: int | None) -> None:
    """Record bos/eos token ids in config.json (generation in transformers reads them there)."""
    data = json.loads(config.read_text())
    for name, value in ids.items():
        if value is not None:
            data.setdefault(f"{name}_token_id", value)
    config.write_text(json.dumps(data, indent=2) + "\n")


def run_sampling(run: Path) -> dict | None:
    """The sampling settings a run's task shows its samples with (its options' temperature and
    top_k), as transformers' generation settings; None for a task without them."""
    from ..config import load_yaml
    from ..tasks import TASKS
    from ..training.config import RunConfig

    cfg = load_yaml(RunConfig, run / "config.yaml")
    options = getattr(TASKS.get(cfg.task.kind)(cfg), "options", None)
    if not hasattr(options, "temperature"):
        return None
    if options.temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(options.temperature), "top_k": int(getattr(options, "top_k", 0) or 0)}


def run(args: argparse.Namespace) -> int:
    """Convert and print where the files went."""
    from ..convert import save_pretrained
    from ..files import staged_folder
    from ..pretrained import load_pretrained
    from ..dtypes import parse_dtype
    from ..pretrained.loading import check_checkpoint_path, is_run_folder

    if args.source == "tracr":
        return run_tracr(args)
    start = time.perf_counter()
    src, dst = check_checkpoint_path(args.src), Path(args.dst)
    dtype = parse_dtype(args.dtype)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"DST {str(dst)!r} is a file; give a directory to write the model into")
    if src.is_dir() and dst.resolve() == src.resolve():
        raise ValueError("SRC and DST are the same directory; give a new DST")
    if (dst / "config.json").exists() and not args.force:
        raise ValueError(f"{str(dst)!r} already holds a model (config.json); pass --force to overwrite it")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "config.json").exists():
        raise ValueError(f"{str(dst)!r} holds other files (no model); give a new or empty folder")
    print(f"loading {src}", file=sys.stderr)
    model, tokenizer = load_pretrained(src, dtype=dtype, progress=True)
    run_folder = is_run_folder(src)
    # everything goes into a sibling folder first (save_pretrained converts and checks the model
    # and a run's tokenizer before it writes); DST is replaced only once it is complete
    sampling = run_sampling(src) if run_folder else None
    with staged_folder(dst, replace=True) as out:
        save_pretrained(model, out, tokenizer=tokenizer if run_folder or not src.is_dir() else None, sampling=sampling)
        if src.is_dir() and not run_folder:  # a HF directory's tokenizer and pooling files, as they are
            for name in _SIDE_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, out / name)
            for name in _SIDE_DIRS:
                if (src / name).is_dir():
                    shutil.copytree(src / name, out / name, dirs_exist_ok=True)
        _add_token_ids(out / "config.json", bos=getattr(tokenizer, "bos_id", None), eos=getattr(tokenizer, "eos_id", None))
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()) / 2**20
    n = sum(p.numel() for p in model.parameters())
    print(f"done: {n / 1e6:.1f}M parameters ({args.dtype}) in {time.perf_counter() - start:.1f} s -> {dst} ({size:.0f} MiB)")
    return 0


def run_tracr(args: argparse.Namespace) -> int:
    """Compile a RASP program with tracr and write its weights as a run folder of task 'program'."""
    from ..convert.tracr import compile_program, input_words, load_program, to_anyformer
    from ..files import staged_folder
    from ..models.builders import build_model
    from ..tokenizers.pair import PairTokenizer
    from ..tokenizers.words import WordTokenizer
    from ..training.config import RunConfig, TaskConfig, TrainConfig
    from ..training.run import write_run

    start = time.perf_counter()
    dst = Path(args.dst)
    if args.dtype != "float32":
        raise ValueError("--from tracr writes float32 weights (a compiled program relies on exact sums); leave out --dtype")
    if dst.exists() and not (dst.is_dir() and (args.force or not any(dst.iterdir()))):
        raise ValueError(f"{str(dst)!r} already exists; give a new folder, or pass --force to replace it")
    prog = load_program(args.src)
    print(f"compiling {prog.path} with tracr", file=sys.stderr)
    compiled = to_anyformer(compile_program(prog), input_words(prog))
    model = build_model(compiled.config)
    model.load_state_dict(compiled.state_dict)
    tokenizer = PairTokenizer(WordTokenizer(compiled.inputs), WordTokenizer(compiled.outputs or []))
    options = {"program": str(dst.resolve() / "program.py"), "outputs": compiled.outputs}
    cfg = RunConfig(model=compiled.config, task=TaskConfig(kind="program", options=options), train=TrainConfig(dtype="float32"))
    with staged_folder(dst, replace=True) as out:
        shutil.copy2(prog.path, out / "program.py")
        write_run(out, cfg, model, tokenizer, {"best_val_loss": None, "compiled_from": str(prog.path)})
    c = compiled.config
    print(f"done: {c.num_layers} layers, width {c.dim}, {c.attention.num_heads} heads, "
          f"{sum(p.numel() for p in model.parameters()):,} weights in {time.perf_counter() - start:.1f} s -> {dst} "
          f"(run it: anyformer predict {dst} \"{' '.join(compiled.inputs[2:4])}\")")
    return 0
