"""The OpenAI-compatible HTTP server (`kiln serve`): see README.md beside this file."""
