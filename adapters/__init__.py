"""Trainer and model glue for odb (imported as ``odb.adapters``); the core never imports it."""
