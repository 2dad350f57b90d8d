"""Aggregator side: the MQTT-connected server that runs rounds and merges expert updates.
Never imports torch or the exporter."""
