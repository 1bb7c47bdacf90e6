"""Sample text from a checkpoint.

    python -m gpt.generate RUN_OR_CHECKPOINT_DIR [--prompt "ROMEO:"] [--tokens 500] [--temperature 0.8]
"""
from __future__ import annotations

import sys

import torch

from gpt.checkpoint.writer import load_model
from gpt.cli import checkpoint_parser, user_errors
from gpt.data.tokenizer import load_tokenizer
from gpt.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = checkpoint_parser("gpt.generate", __doc__)
    parser.add_argument("--prompt", default="\n", help="the text the samples continue (not empty)")
    parser.add_argument("--tokens", type=int, default=500, help="new tokens per sample")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy, the likeliest token each time")
    parser.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    args = parser.parse_args(argv)
    with user_errors():
        for flag, value, least in (("--tokens", args.tokens, 0), ("--samples", args.samples, 1),
                                   ("--temperature", args.temperature, 0), ("--top-k", args.top_k, 0)):
            if not value >= least:  # a NaN temperature too
                raise UserError(f"{flag} {value}: at least {least}")
        if not args.prompt:
            raise UserError("--prompt is empty: the samples continue a text of at least one token (the default: a "
                            "newline)")
        model, meta, path = load_model(args.path, args.device)
        tokenizer = load_tokenizer(meta["data_dir"])
        prompt = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long, device=args.device)
    torch.manual_seed(args.seed)
    print(f"# {path} (step {meta['step']})", file=sys.stderr)
    for _ in range(args.samples):
        fits = prompt.size(1) + args.tokens <= model.cfg.block_size  # else slide the context, without a cache
        out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k or None,
                             use_cache=fits)
        print(tokenizer.decode(out[0].tolist()))
        print("---")


if __name__ == "__main__":
    main()
