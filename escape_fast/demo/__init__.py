"""A local web page for escape_fast: annotate supports, predict queries, download the JSON.

    pip install -e ".[demo]"
    python -m escape_fast.demo [--port 8000] [--host 127.0.0.1] [--checkpoint RUN_DIR] [--device auto]

The page (static/) talks to a small Starlette app (server.py) that runs
escape_fast.Predictor; see README.md, "A page in the browser".
"""
