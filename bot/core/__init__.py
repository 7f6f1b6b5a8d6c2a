"""The platform-neutral core: requests and replies, conversations, presets, quotas, access, the service.

It imports no torch, no model code beyond the engine's torch-free contract (``model.engine.contract``),
no platform SDK and no adapter: front ends and backends plug in through :mod:`bot.core.frontend_api`.
"""
