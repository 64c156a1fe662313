"""`runner serve`: an OpenAI-compatible HTTP API over one loaded Session.

    api.py      OpenAI's request fields checked into a `GenerationRequest`, its response and error shapes
    stops.py    stop strings found in streamed text
    worker.py   the one thread that loads the model and answers queued requests in order (batch 1)
    app.py      the Starlette app: routes, API key, body limit, server-sent events

Only app.py imports the HTTP stack (starlette); uvicorn is imported by `runner serve` itself.
"""
