"""Command-line tools that are not the runtime: the data preview, the demo corpus, tokenizer
training. They use the pillars; no pillar imports them."""
