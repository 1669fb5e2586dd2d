"""Evaluators (`eval=...`): callables `(model, tokenizer) -> {"ppl/wikitext2": ...}`."""
