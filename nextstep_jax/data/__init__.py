"""Host-side data: text tokenizer, sequence layouts and built-in datasets."""
