"""Drop-in integrations: the SDPA backend provider (sdpa) and the Hugging Face transformers attention
backend (transformers). Importing this package imports neither transformers nor anything optional."""
