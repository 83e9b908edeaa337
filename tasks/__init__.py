"""Thin Prefect wrappers over pipeline_lib: the one stage task (tasks.stage), caching (tasks.cache)."""
