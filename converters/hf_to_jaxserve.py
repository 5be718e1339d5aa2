"""Convert an HF checkpoint directory into a jaxserve checkpoint (orbax params + HF side files)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

from flax import nnx

from jaxserve.weights.loader import (
    CONVERTED_MARKER, CONVERTED_VERSION, PARAMS_DIR, load_model, nest_param,
)

# Everything but the weights travels as is: config, generation config, tokenizer, chat template.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def convert(src: str, out: str, dtype: str = "auto", quantization: str | None = None,
            quantize_lm_head: bool = False) -> dict:
    """Read src tensor by tensor, cast to dtype (quantizing the decoder projections, and the
    lm_head with quantize_lm_head, when asked, or keeping a compressed-tensors checkpoint's),
    and write an orbax checkpoint under out that loads without re-quantizing."""
    import orbax.checkpoint as ocp

    start = time.perf_counter()
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise ValueError(f"out: {out!r} is the source checkpoint itself; give a new directory")
    loaded = load_model(src, dtype=dtype, quantization=quantization,
                        quantize_lm_head=quantize_lm_head)
    if os.path.exists(out) and os.path.samefile(loaded.path, out):
        raise ValueError(f"out: {out!r} is the source checkpoint itself; give a new directory")
    os.makedirs(out, exist_ok=True)
    tree: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)):
        nest_param(tree, path, var.get_value())
    params_dir = os.path.abspath(os.path.join(out, PARAMS_DIR))
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, tree)
    for name in SIDE_FILES:
        f = os.path.join(loaded.path, name)
        if os.path.isfile(f):
            shutil.copy2(f, os.path.join(out, name))
    info = {
        "format": "jaxserve-orbax",
        "version": CONVERTED_VERSION,
        "dtype": loaded.dtype,
        "architecture": loaded.config.architecture,
        "source": os.path.abspath(loaded.path),
        "quantization": dataclasses.asdict(loaded.quant) if loaded.quant else None,
        "convert_seconds": round(time.perf_counter() - start, 3),
    }
    with open(os.path.join(out, CONVERTED_MARKER), "w") as f:
        json.dump(info, f, indent=2)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="HF checkpoint directory (or hub id when a network exists)")
    parser.add_argument("out", help="output directory for the jaxserve checkpoint")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="parameter dtype to store (auto: the checkpoint's own)",
    )
    parser.add_argument(
        "--quantization", "-q", default=None, choices=["int8", "int4", "fp8", "w8a8"],
        help="quantize the decoder projections while converting (stored quantized)",
    )
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="with --quantization: store the lm_head quantized too")


def run(args: argparse.Namespace) -> int:
    info = convert(args.src, args.out, args.dtype, args.quantization, args.quantize_lm_head)
    print(json.dumps({"out": args.out, **info}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m converters.hf_to_jaxserve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
