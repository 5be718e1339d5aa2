"""The `jaxserve` command: demo, generate, convert, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

logger = logging.getLogger("jaxserve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party loggers that talk at INFO about nothing the user asked for: the backend probe
# ("Unable to initialize backend 'tpu': ... Failed to open libtpu.so") and ~40 orbax lines.
_NOISY_LOGGERS = ("absl", "jax._src.xla_bridge")

DEMO_PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a small village by the sea,",
    "A paged KV cache stores keys and values in blocks.",
    "JAX compiles one program per bucket of shapes;",
]


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")


def _generate(args: argparse.Namespace, model: str, prompts: list[str]) -> int:
    from jaxserve import LLM, SamplingParams
    from jaxserve.engine_flags import engine_args_from

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, n=args.n, seed=args.sampling_seed,
    )
    start = time.perf_counter()
    ea = engine_args_from(args, model)
    llm = LLM(**vars(ea))
    ready = time.perf_counter()
    outputs = llm.generate(prompts, params)
    done = time.perf_counter()
    for out in outputs:
        for c in out.outputs:
            print(json.dumps({"prompt": out.prompt, "index": c.index, "text": c.text,
                              "finish_reason": c.finish_reason}, ensure_ascii=False))
    n_out = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(json.dumps({
        "startup_s": round(ready - start, 2), "generate_s": round(done - ready, 3),
        "output_tokens": n_out, "output_tok_per_s": round(n_out / max(done - ready, 1e-9), 1),
        "stats": vars(llm.stats()),
    }))
    return 0


def configure_logging(level: str) -> None:
    """Timestamped lines for every command (the server's included); third-party noise off."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"--log-level: {level!r} is not a level (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=numeric, format=LOG_FORMAT, force=True)
    for name in _NOISY_LOGGERS:  # shown at DEBUG only
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG
                                         else max(numeric, logging.WARNING))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxserve")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from converters import hf_to_jaxserve
    from jaxserve.engine_flags import add_engine_args

    # --log-level works before or after the subcommand (the subcommand's copy wins when given).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--version", action="version", version=f"jaxserve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[common],
                          help="write the built-in random demo model and generate with it")
    demo.add_argument("--cache-dir", default=None, help="where the demo checkpoint is written")
    add_engine_args(demo)
    _add_sampling_args(demo)
    # Limits that fit its few short prompts: few buckets to compile (6 steps, 3 row counts),
    # and no prompt logprobs (the demo and `generate` never ask for them).
    demo.set_defaults(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
                      enable_prompt_logprobs=False)

    gen = sub.add_parser("generate", parents=[common], help="offline generation for a few prompts")
    gen.add_argument("model")
    gen.add_argument("prompts", nargs="+")
    add_engine_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(enable_prompt_logprobs=False)

    conv = sub.add_parser("convert", parents=[common],
                          help="HF checkpoint -> jaxserve (orbax) checkpoint")
    hf_to_jaxserve.add_arguments(conv)

    serve = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP + gRPC server")
    from jaxserve.serving.launcher import add_serve_args

    add_serve_args(serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error is one line on stderr (the traceback is logged at DEBUG)."""
    args = build_parser().parse_args(argv)
    try:
        configure_logging(args.log_level)
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's one error line
        logger.debug("the command failed", exc_info=True)
        kind = "" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: "
        print(f"jaxserve {args.command}: error: {kind}{exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from converters import hf_to_jaxserve

    if args.command == "demo":
        from jaxserve.demo import ensure_demo_model

        return _generate(args, ensure_demo_model(args.cache_dir), DEMO_PROMPTS)
    if args.command == "generate":
        return _generate(args, args.model, args.prompts)
    if args.command == "convert":
        return hf_to_jaxserve.run(args)
    from jaxserve.serving.launcher import serve as run_serve

    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
