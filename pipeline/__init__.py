"""Ray Data jobs around the Janus engines: sources, shard sinks, resume, job config.

Submodules are imported where used; importing this package stays cheap (no Ray, no torch).
"""
