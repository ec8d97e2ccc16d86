"""One autoresearch-style training run: data preparation, tokenizer, model, optimizer, loop."""
