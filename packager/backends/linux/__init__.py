"""The linux-container device class: Raspberry Pi boards and industrial PCs, an OCI image."""
