"""Tools outside the kernel: the durable-nb command, the headless runner and its progress line,
and the status tables the widget and the command share."""
