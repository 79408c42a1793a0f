"""Shared test set-up: this folder is on sys.path (pytest's rootdir conftest rule), so test
modules in subfolders import the helpers in ``synthetic.py`` directly."""
