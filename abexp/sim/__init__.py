"""The delay simulation: the delayed-gradient engine, delay models, update rules, pipeline
stages, lr schedules and the quadratic stability oracle. The science, with no files, data or
processes: imports only the top-level modules (``config``, ``seeds``) and torch."""
