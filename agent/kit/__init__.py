"""The small kit both sides share beside the wire: logs, exit codes, reconnect backoff,
MQTT connection settings and key files. Neither side's internals are imported here."""
