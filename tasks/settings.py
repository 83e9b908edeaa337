"""Names the Prefect side of zhllama shares: defined once, used by tasks, flows, deployments and the CLI."""

# Global concurrency limit the memory-heavy stages (merge, GGUF, quantize, evaluate) take a slot of.
MEMORY_LIMIT = "zhllama-memory-heavy"
# The process work pool every deployment runs on (`zhllama server` creates it).
WORK_POOL = "zhllama-process"
# The pool's queue the real model builds run on; its concurrency limit (1) lets one run at a time.
BUILD_QUEUE = "builds"
