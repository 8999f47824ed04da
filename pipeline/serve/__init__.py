"""Online serving on Ray Serve: an OpenAI-compatible ingress over the batch jobs' model actors.

``app.build_app`` is the application builder named in ``configs/serve*.yaml``.
"""
