"""Run loggers (`logger=...`): start(config, output_dir), log(metrics), table(name, rows), summary(metrics), finish(ok)."""
