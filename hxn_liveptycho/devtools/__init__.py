"""Tools for the people who work on the package (not used at run time).

:mod:`hxn_liveptycho.devtools.layering` checks the import rules:
``python -m hxn_liveptycho.devtools.layering``.
"""
