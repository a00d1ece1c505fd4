"""The SmolLM2 study: config, units, work, pipeline, cost, hardware, report."""
