"""The framework's machinery: nothing here is public API.

User code imports from ``framework`` (and ``framework.fastapi``, ``framework.references``,
``framework.migrations``, ``framework.testing``); these modules may change at any release.
"""
