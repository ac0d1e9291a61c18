"""`carbrand serve`: the HTTP service and its web page (command, app, uploads, decoding, batching, settings)."""
