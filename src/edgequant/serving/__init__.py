"""An OpenAI-compatible REST server over any artifact's runner (see `app.py`)."""
