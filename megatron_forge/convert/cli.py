"""forge-convert: checkpoint conversion between megatron-forge, Hugging Face and TensorRT-LLM.

    forge-convert to-hf CKPT_DIR OUT_DIR [--iteration N] [--dtype bf16|fp16|fp32] [--tokenizer PATH]
    forge-convert from-hf HF_DIR CKPT_DIR [--tp N --pp N --ep N]
    forge-convert to-trtllm CKPT_DIR OUT_DIR --tp N [--pp N]
    forge-convert check-serving OUT_DIR [--reference CKPT_DIR [--iteration N]] [--no-forward]

(also ``python tools/convert_checkpoint.py ...``). Outputs are written to a temporary
directory and renamed when complete; a non-empty OUT_DIR is refused without --overwrite.
An OUT_DIR that is, contains or lies inside the input (or is or contains the run
directory the checkpoint belongs to) is always refused, and --overwrite replaces only
earlier exports: never a directory holding a training checkpoint or a run's metrics.
Checkpoints are read without running code from them (pickles are loaded with an
allowlist of types), so converting one someone shared is safe.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_forge.convert.files import parse_size
from megatron_forge.data.tokenizer import TokenizerLoadError
from megatron_forge.errors import ForgeError
from megatron_forge.utils import DTYPES


def _common(parser: argparse.ArgumentParser, source: str) -> None:
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=f"default: the dtype of {source}")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output")


def _checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ckpt_dir", help="checkpoint root (holds latest_checkpointed_iteration.txt)"
    )
    parser.add_argument("out_dir")
    parser.add_argument("--iteration", type=int, help="default: the latest complete one")
    parser.add_argument(
        "--tokenizer", help="tokenizer to ship and size the vocabulary; default: data.tokenizer"
    )
    _common(parser, "the checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forge-convert",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="torch_dist checkpoint -> Hugging Face directory")
    _checkpoint_args(to_hf)
    to_hf.add_argument("--max-shard-size", default="5GB", help="per safetensors file (5GB)")

    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> torch_dist checkpoint")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("ckpt_dir")
    helps = {
        "tp": "tensor parallelism you will train with: sets the vocabulary padding",
        "pp": "pipeline parallelism you will train with (checked against the layers)",
        "ep": "expert parallelism you will train with (checked against the experts)",
    }
    for flag, text in helps.items():
        from_hf.add_argument(f"--{flag}", type=int, default=1, help=text + " (default 1)")
    _common(from_hf, "the HF weights")

    trt = sub.add_parser("to-trtllm", help="torch_dist checkpoint -> TensorRT-LLM checkpoint")
    _checkpoint_args(trt)
    trt.add_argument("--tp", type=int, required=True, help="engine tensor parallelism")
    trt.add_argument("--pp", type=int, default=1, help="engine pipeline parallelism")

    check = sub.add_parser(
        "check-serving",
        help="can vLLM / TensorRT-LLM serve OUT_DIR, and does it compute what CKPT_DIR does?",
        description="Checks a Hugging Face directory (or TensorRT-LLM checkpoint): the files "
        "and shapes servers need, every tensor read for NaN/inf, then transformers loads it "
        "on CPU and runs a short prompt; with --reference the logits are compared with the "
        "checkpoint's own forward.",
    )
    check.add_argument("out_dir")
    check.add_argument(
        "--reference",
        metavar="CKPT_DIR",
        help="megatron-forge checkpoint the export came from: its forward (one rank, fp32) "
        "must give the same logits within the tolerance (both printed)",
    )
    check.add_argument("--iteration", type=int, help="of --reference; default: the latest")
    check.add_argument(
        "--atol",
        type=float,
        help="largest |logits difference| allowed against --reference; default 1e-4 x "
        "max(1, max |logit|), 2e-2 x (bf16) or 5e-3 x (fp16) when the export rounded the "
        "checkpoint's weights to that dtype",
    )
    check.add_argument(
        "--no-forward",
        action="store_true",
        help="skip transformers' forward (and --reference): it loads the whole model in fp32 "
        "into host memory, 4 bytes per parameter (~280 GB for 70B). The other checks, the "
        "scan of every tensor included, still run",
    )
    check.add_argument("--prompt", help="text of the forward pass; default: a short sentence")
    return parser


def run(args: argparse.Namespace) -> int:
    from megatron_forge.convert.serving import check_serving

    if args.command == "to-hf":
        from megatron_forge.convert.hf import export_hf

        out = export_hf(
            args.ckpt_dir,
            args.out_dir,
            args.iteration,
            args.dtype,
            args.tokenizer,
            args.overwrite,
            parse_size(args.max_shard_size),
        )
        # The pre-flight only: every tensor was checked finite as it was written, and the
        # forward needs the whole model in memory (check-serving runs it).
        ok, report = check_serving(out, scan=False, forward=False)
        print(report)
        iteration = f" --iteration {args.iteration}" if args.iteration is not None else ""
        print(
            f"Run the forward pass and compare it with the checkpoint's: forge-convert "
            f"check-serving {out} --reference {args.ckpt_dir}{iteration}"
        )
        return 0 if ok else 1
    if args.command == "from-hf":
        from megatron_forge.convert.from_hf import import_hf

        ckpt = import_hf(
            args.hf_dir, args.ckpt_dir, args.tp, args.pp, args.ep, args.dtype, args.overwrite
        )
        print(
            f"wrote {ckpt} (iteration 0, weights only). Continue pretraining with:\n"
            f"  python -m megatron_forge.train --config {ckpt}/config.yaml "
            "data.blend=[PREFIX_text_document] checkpoint.save=SAVE_DIR"
        )
        return 0
    if args.command == "to-trtllm":
        from megatron_forge.convert.trtllm import build_command, export_trtllm

        out = export_trtllm(
            args.ckpt_dir,
            args.out_dir,
            args.tp,
            args.pp,
            args.iteration,
            args.dtype,
            args.tokenizer,
            args.overwrite,
        )
        print(f"wrote {out}. Build an engine with:\n  {build_command(out, args.tp, args.pp)}")
        return 0
    ok, report = check_serving(
        args.out_dir,
        forward=not args.no_forward,
        reference=args.reference,
        iteration=args.iteration,
        atol=args.atol,
        prompt=args.prompt,
    )
    print(report)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # megatron-core warns when it is imported (by the conversions, lazily) that Transformer
    # Engine and apex are missing; conversion uses neither.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        return run(args)
    except (ForgeError, TokenizerLoadError) as err:
        print(f"{getattr(err, 'kind', 'error')}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
