"""Row statuses and failure reasons, end to end (engines, actors, Parquet, HTTP): plain strings in a
module without torch, so the HTTP ingress and job drivers can name them without loading the model."""

#: a result, or a failure with a reason
OK, ERROR = "ok", "error"
#: why a request failed: its own fault (a client error), the device's (retry later, elsewhere), the
#: client's leaving, or our bug
INVALID_REQUEST, OUT_OF_MEMORY, CANCELLED, INTERNAL = "invalid_request", "out_of_memory", "cancelled", "internal_error"
#: the device broke under the request (janus.engine.health): retry, on another process
DEVICE_LOST = "device_lost"
