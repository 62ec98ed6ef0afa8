"""Adapters from maskkern to other libraries. Each submodule imports without the library it adapts
and raises an ImportError naming that library only when it is used:

- ``maskkern.integrations.transformers``: Hugging Face transformers (``register``, ``apply``).
"""
