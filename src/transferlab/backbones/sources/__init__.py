"""Backbone sources: one module per value of `backbone.source`, each defining `SOURCE`.

Modules here are discovered by name (see `registry.source_names`); a module whose name starts
with `_` is a helper, not a source.
"""
