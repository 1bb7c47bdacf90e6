"""Hugging Face `transformers` interchange: a trained model written as a stock architecture (`python -m gpt.export`),
and a run initialised from a local Hugging Face folder (`init=hf:PATH`). `architecture` maps the configs, `weights`
the parameter names, `tokenizer` writes the tokenizer, `folder` reads a folder to import."""
