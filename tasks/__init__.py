"""Thin Prefect task wrappers over pipeline_lib (one per stage); see tasks.stages."""
