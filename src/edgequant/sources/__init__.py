"""Models as users bring them: Hugging Face folders, GGUF files turned into faithful float folders,
their tokenizers, what `inspect` reports, and the importance matrix computed from a source."""
