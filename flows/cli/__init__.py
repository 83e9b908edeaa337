"""The ``zhllama`` command line: the composition root, above ``flows``, ``tasks`` and ``pipeline_lib``.

``flows.cli.main:main`` is the console script. Each subcommand module here has
``register(subparsers)``; stage subcommands call ``pipeline_lib`` only, the build/run/server
subcommands call ``flows``. Modules are imported lazily, one per command line.
"""
