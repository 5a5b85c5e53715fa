"""The site configuration: one TOML file.

``schema`` (the pydantic models, with ``fields``' value types), ``load`` (file to
:class:`~hpcstage.config.schema.Settings` and back), ``problems`` (every mistake, named by line
and key), ``tomlfile`` (key paths and lines in TOML text), ``rules`` (single-value checks shared
with the client commands). Nothing is imported here: ``hpcstage env`` reads the file with
``rules`` alone and must not pay for pydantic.
"""
