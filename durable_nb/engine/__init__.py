"""The executor: the logical clock, the execute-or-replay decision, retries, recording, and
durable_nb.map."""
