"""Serving (docs/design.md §5): an OpenAI / DeepSeek-compatible API over the shared engine's scheduler, API keys
and limits, a usage ledger in SQLite, a static chat page and a terminal chat client.
Needs the `serve` extra (FastAPI, uvicorn, prometheus-client, httpx)."""
