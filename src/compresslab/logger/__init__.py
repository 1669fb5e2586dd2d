"""Run loggers (`logger=...`): start(config, output_dir), log(metrics), summary(metrics), finish(ok)."""
