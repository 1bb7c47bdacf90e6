"""Training FLOPs per token of every model preset (configs/model/*.yaml), and the tokens/s one H100 in bf16 gives at
the MFU an eager step and a tuned one reach. Analytic (gpt.model.flops): nothing is built or run.

    python -m benchmarks.model_flops
    python -m benchmarks.model_flops --device "NVIDIA H200"

Writes benchmarks/results/model_flops.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, compose_config, save_results  # noqa: E402
from gpt.model.flops import flops_per_token, param_count, peak_flops  # noqa: E402

# The expected MFU, and its basis: the issue "GPU truth, third pass" read this step against nanoGPT's train.py and
# TorchTitan for gpt2_124m in bf16 on one H100: about 20-28% eager (train.precision=bf16), about 40% for a tuned
# loop (compile of the model with its loss, Flash or cuDNN attention: train=gpu). Not measured here.
EAGER, TUNED = (0.20, 0.28), 0.40
BASIS = ("MFU basis: gpt2_124m, bf16, one H100, read against nanoGPT's train.py and TorchTitan (not measured): "
         f"eager {EAGER[0]:.0%}-{EAGER[1]:.0%}, tuned (train=gpu) about {TUNED:.0%}; narrower models (n_embd < 512) "
         "are bound by kernel launches and reach far less (no figure shown), wider ones more")
NARROW = 512  # n_embd below which the basis does not apply
CHAR_VOCAB = 65  # a preset whose vocabulary comes from the tokenizer: data=shakespeare_char's characters


def rows(device: str) -> list[dict]:
    peak = peak_flops(device, "bf16")
    if peak is None:
        raise SystemExit(f"no bf16 peak known for {device!r} (gpt/model/flops.py PEAK_TFLOPS)")
    out = []
    for path in sorted((REPO / "configs" / "model").glob("*.yaml")):
        model = compose_config([f"model={path.stem}"]).model
        assumed = model.vocab_size is None
        model = dataclasses.replace(model, vocab_size=model.vocab_size or CHAR_VOCAB)
        flops = flops_per_token(model)
        row = {"model": path.stem, "params_m": param_count(model)["total"] / 1e6, "vocab": model.vocab_size,
               "vocab_assumed": assumed, "block": model.block_size, "gflops_per_token": flops / 1e9}
        if model.n_embd >= NARROW:
            row.update(tokens_per_s_eager=[m * peak / flops for m in EAGER], tokens_per_s_tuned=TUNED * peak / flops)
        out.append(row)
    return out


def table(found: list[dict], device: str) -> str:
    lines = [f"| model | parameters (M) | vocabulary | block | training GFLOPs/token | tokens/s eager "
             f"({EAGER[0]:.0%}-{EAGER[1]:.0%} MFU) | tokens/s tuned ({TUNED:.0%} MFU) |", "|---" * 7 + "|"]
    for r in found:
        vocab = f"{r['vocab']:,}" + (" (characters)" if r["vocab_assumed"] else "")
        if "tokens_per_s_tuned" in r:
            low, high = r["tokens_per_s_eager"]
            speeds = f"{low:,.0f}-{high:,.0f} | {r['tokens_per_s_tuned']:,.0f}"
        else:
            speeds = "launch-bound | launch-bound"
        lines.append(f"| {r['model']} | {r['params_m']:,.1f} | {vocab} | {r['block']:,} | {r['gflops_per_token']:.3f} "
                     f"| {speeds} |")
    lines.append(f"\nOne {device} in bf16 ({peak_flops(device, 'bf16') / 1e12:,.0f} TFLOP/s dense peak). {BASIS}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="NVIDIA H100 80GB HBM3", help="a torch.cuda.get_device_name() string")
    args = parser.parse_args()
    found = rows(args.device)
    print(table(found, args.device))
    path = save_results("model_flops", {"device": args.device, "basis": BASIS, "eager_mfu": list(EAGER),
                                        "tuned_mfu": TUNED, "models": found})
    print(f"\nwritten: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
