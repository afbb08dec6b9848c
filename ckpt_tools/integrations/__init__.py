"""Recording from training frameworks, each in its own module and pip extra.

``ckpt_tools.integrations.lightning`` (extra ``[lightning]``) and
``ckpt_tools.integrations.transformers`` (extra ``[transformers]``) each hold a
``RecorderCallback``. Nothing here is imported by the core: importing this package
imports neither framework; each module imports its own when it is imported.
"""

__all__: list[str] = []
