"""Device side of the TPM-rooted identity: keys in the TPM, EST enrollment, mTLS MQTT."""

__version__ = "0.1.0"
