"""`tidal serve`: an OpenAI-compatible HTTP server for several models on one device, on `tidal.Scheduler`.

config.py (TOML and flags -> ServeConfig), protocol.py (requests and errors at the edge), responses.py
(response and chunk shapes), service.py (the bridge to the scheduler's thread), loading.py (the Service from
a config), status.py (GET /v1/tidal/status), metrics.py (GET /metrics), app.py (the FastAPI app factory),
server.py (uvicorn with the shutdown wired in), main.py (the command). See docs/SERVE.md. Nothing here is
imported by `import tidal`; FastAPI and uvicorn are the `serve` extra's.
"""
