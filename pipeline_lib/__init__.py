"""zhllama: rebuild Chinese-LLaMA/Alpaca models from LLaMA plus the released LoRAs.

The library never imports Prefect; every stage is a plain function
``verb(inputs, *, out, ...) -> Result`` usable from a notebook, the CLI or a Prefect task.
"""

__version__ = "0.1.0"
